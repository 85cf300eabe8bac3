"""grok3d's log lines: every logger of ours lives under "grok3d" and writes to stderr at INFO, whatever the
host (BentoML, a CLI) configured for the root logger."""

from __future__ import annotations

import logging
import sys


def setup_logging(level: int = logging.INFO) -> None:
    logger = logging.getLogger("grok3d")
    if any(getattr(h, "_grok3d", False) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] [%(name)s] %(message)s"))
    handler._grok3d = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
