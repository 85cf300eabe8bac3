"""The progress of a job on stderr: a bar redrawn in place on a terminal, one line per change elsewhere (a log, a
pipe, CI), so stdout stays free for the paths a script reads."""

from __future__ import annotations

import sys
from typing import TextIO

# API.md's stage names, with the backend that does the work.
STAGE_WORDS = {
    "queued": "queued",
    "initializing": "initializing",
    "generating_image": "generating_image: the picture (xAI Grok)",
    "generating_3d": "generating_3d: the 3D model (TripoSR)",
    "converting_usdz": "converting_usdz: the AR file (Blender)",
    "complete": "complete",
    "error": "error",
}
WIDTH = 24


def describe(status: dict) -> str:
    key = "queued" if status.get("status") == "queued" else str(status.get("stage"))
    return STAGE_WORDS.get(key, key)


class ProgressBar:
    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self._last: tuple[int, str] | None = None
        self._drawn = 0

    def update(self, status: dict) -> None:
        progress = int(status.get("progress") or 0)
        words = describe(status)
        if (progress, words) == self._last:
            return
        self._last = (progress, words)
        filled = WIDTH * max(0, min(progress, 100)) // 100
        line = f"[{'#' * filled}{'-' * (WIDTH - filled)}] {progress:3d}%  {words}"
        if self.live:
            # Pad over the previous line's tail; \r keeps the bar on one line.
            self.stream.write("\r" + line.ljust(self._drawn))
            self._drawn = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.live and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = 0
