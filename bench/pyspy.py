"""Sampling a process with py-spy (not a dependency: ``pip install py-spy`` anywhere)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Profile", "PySpy"]


@dataclass(frozen=True)
class Profile:
    """The functions with the most samples: own (leaf) and inclusive shares."""

    file: str
    samples: int
    own: list[tuple[str, float]]
    inclusive: list[tuple[str, float]]
    error: str = ""


class PySpy:
    """``py-spy record`` of ``pid`` for ``seconds`` (raw collapsed stacks, 50 Hz, without
    stopping the process)."""

    def __init__(self, binary: str, pid: int, seconds: float, out: Path) -> None:
        self._argv = [binary, "record", "--pid", str(pid), "--duration", str(int(seconds))]
        self._argv += ["--rate", "50", "--format", "raw", "--output", str(out), "--nonblocking"]
        self._out = out
        self._process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self._process = await asyncio.create_subprocess_exec(
            *self._argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )

    async def finish(self, top: int = 25) -> Profile:
        process = self._process
        assert process is not None
        try:
            await asyncio.wait_for(process.wait(), 30)
        except TimeoutError:
            process.kill()
            await process.wait()
        if not self._out.exists():
            return Profile(str(self._out), 0, [], [], f"py-spy exited {process.returncode}")
        own: dict[str, int] = {}
        inclusive: dict[str, int] = {}
        total = 0
        for line in self._out.read_text().splitlines():
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = stack.split(";")
            own[frames[-1]] = own.get(frames[-1], 0) + n
            for frame in set(frames):
                inclusive[frame] = inclusive.get(frame, 0) + n

        def ranked(table: Mapping[str, int]) -> list[tuple[str, float]]:
            best = sorted(table.items(), key=lambda kv: -kv[1])[:top]
            return [(name, n / total) for name, n in best]

        return Profile(str(self._out), total, ranked(own), ranked(inclusive))
