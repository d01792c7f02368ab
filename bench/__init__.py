"""depthflow's benchmarks: ``python -m bench <tool> [options]`` from the repository root.

One module per tool (`throughput`, `floor_sweep`, `catch_up`, `replay`, `latency`,
`monitoring`, `scale`, `writer`), each with ``main(argv)``; `floor` is the fastest known way to
store depthflow's rows (the throughput floor), `observe` reads a running service from outside,
`probes` are HTTP clients run as processes of their own, `results` the typed results and their
JSON. The subprocess harness, scratch databases and the stand-in exchanges are shared with the
tests (`tests.harness`).
"""
