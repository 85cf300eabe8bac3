"""The formats a client asks for beyond the GLB and USDZ (API.md §3), each made from the GLB on its first request
and kept beside it: preview, glb_textured, obj and fbx on the Blender pool (converters/blender), stl and 3mf with
trimesh in a thread (pipeline/meshes.py).

Made once: in this process, concurrent first requests of one file wait for the same task (which a client that
gives up does not cancel, so the file is still made for the next request); across processes, a file that exists is
never made again, and each is published atomically (a temporary name, then a rename), so two processes that race
both publish a whole file. A conversion that fails gives one sentence for the client, never a 500: 404 with it
when the model cannot be converted (remembered, so it is not tried again and again), 503 when the converter is
busy or missing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from pipeline.errors import StageError
from pipeline.meshes import write_printable
from pipeline.storage import Asset, publish, temp_path_for

log = logging.getLogger("grok3d.formats")

NAMES = {Asset.preview: "preview picture", Asset.glb_textured: "textured GLB", Asset.obj: "OBJ", Asset.stl: "STL",
         Asset.threemf: "3MF", Asset.fbx: "FBX"}
BLENDER_EXPORTS = (Asset.glb_textured, Asset.obj, Asset.fbx)
PRINTABLE = (Asset.stl, Asset.threemf)
RETRY_AFTER_S = 5


class FormatError(Exception):
    """Why a format cannot be had: the HTTP status, the sentence, and headers for the answer."""

    def __init__(self, status_code: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.headers = headers


class FormatMaker:
    """Makes `target` from `glb` on request; `converter` is the USDZ stage's backend (the Blender pool), whose
    `export` and `render_preview` make the Blender formats. One per process."""

    def __init__(self, converter: Any) -> None:
        self._converter = converter
        self._making: dict[Path, asyncio.Task[None]] = {}
        self._failed: dict[Path, str] = {}

    async def ensure(self, glb: Path, target: Path, kind: Asset) -> None:
        """Return once `target` exists; FormatError when it cannot be made now (503) or at all (404)."""
        if target.is_file():
            return
        if not glb.is_file():
            raise FormatError(404, "Asset not found")
        if (failed := self._failed.get(target)) is not None:
            raise FormatError(404, failed)
        task = self._making.get(target)
        if task is None:
            task = asyncio.create_task(self._make(glb, target, kind), name=f"format-{kind.value}")
            self._making[target] = task
            task.add_done_callback(lambda _done: self._making.pop(target, None))
        try:
            await asyncio.shield(task)
        except StageError as exc:
            sentence = f"The {NAMES[kind]} could not be made: {_lower_first(exc.message)}"
            if exc.retryable:
                raise FormatError(503, sentence, {"Retry-After": str(RETRY_AFTER_S)}) from None
            raise FormatError(404, sentence) from None

    async def _make(self, glb: Path, target: Path, kind: Asset) -> None:
        tmp = temp_path_for(target)
        began = time.monotonic()
        try:
            await self._produce(glb, tmp, kind)
            await asyncio.to_thread(publish, tmp, target)
            log.info("%s %s made in %.2f s", target.parent.name, kind.value, time.monotonic() - began)
        except StageError as exc:
            log.warning("%s %s could not be made: %s", target.parent.name, kind.value, exc.message)
            if not exc.retryable:
                self._failed[target] = f"The {NAMES[kind]} could not be made: {_lower_first(exc.message)}"
            raise
        except Exception:
            log.exception("%s %s failed with an unexpected error", target.parent.name, kind.value)
            raise StageError("an internal error occurred, please try again later.", retryable=True) from None
        finally:
            tmp.unlink(missing_ok=True)

    async def _produce(self, glb: Path, out: Path, kind: Asset) -> None:
        if kind in PRINTABLE:
            await asyncio.to_thread(write_printable, glb, out, kind.value)
            return
        method = "render_preview" if kind is Asset.preview else "export"
        make = getattr(self._converter, method, None)
        if make is None or getattr(self._converter, "unavailable", False):
            raise StageError("this server has no Blender converter running.", retryable=True)
        if kind is Asset.preview:
            await make(glb, out)
        else:
            await make(glb, out, kind.value)


def _lower_first(message: str) -> str:
    """A converter's sentence ("The model could not ...") continued after a colon; "GLB ..." stays as it is."""
    return message if message[1:2].isupper() else message[:1].lower() + message[1:]
