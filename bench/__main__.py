"""``python -m bench <tool> [options]`` from the repository root; ``python -m bench`` lists them."""

from __future__ import annotations

import importlib
import sys

# tool -> module; each module has ``main(argv) -> int``.
TOOLS = {
    "throughput": "bench.throughput",
    "catch-up": "bench.catch_up",
    "replay": "bench.replay",
    "latency": "bench.latency",
    "monitoring": "bench.monitoring",
    "scale": "bench.scale",
    "writer": "bench.writer",
    "floor": "bench.floor_sweep",
    # bench/peer.py: depthflow against cryptofeed (its own virtualenv; see that module).
    "peer": "bench.peer",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in TOOLS:
        print(__doc__)
        print("tools: " + ", ".join(TOOLS) + " (each takes --help)")
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
    tool: int = importlib.import_module(TOOLS[argv[0]]).main(argv[1:])
    return tool


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
