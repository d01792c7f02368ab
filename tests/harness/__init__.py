"""Helpers shared by the tests and the benchmarks (`bench/`): one harness, imported by both.

- `processes`: `depthflow serve` and `depthflow simulate` as real subprocesses, logs in a file.
- `databases`: scratch PostgreSQL databases (created, migrated with Alembic, dropped) and Redis
  key namespaces.
- `prometheus`: ``/prometheus`` scrapes.
- `frames`: combined-stream depth frames built by hand.
- `hostile_exchange`: a scriptable Binance stand-in (every frame and snapshot answer decided by
  the caller), and real-shaped events for it.
- `real_data`: Binance's own recordings as depthflow recordings.
"""
