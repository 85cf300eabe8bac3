"""The formats a client asks for beyond the GLB and USDZ (API.md §3), each made from the GLB on its first request
and kept beside it: preview, glb_textured, obj and fbx on the Blender pool (converters/blender), stl and 3mf with
trimesh in a thread (pipeline/meshes.py).

Where the files live is a `Target`: a job's asset store (`AssetTarget`: the folder, or object storage, where the GLB
is fetched to a local scratch copy for the producer and the result is uploaded whole) or an example's folders
(`FileTarget`). The producers work on local files either way.

Made once: in this process, concurrent first requests of one file wait for the same task (which a client that
gives up does not cancel, so the file is still made for the next request); across processes, a file that exists is
never made again, and each is published whole (a temporary name and a rename, or one PUT), so two processes that
race both publish a whole file. A conversion that fails gives one sentence for the client, never a 500: 404 with it
when the model cannot be converted (remembered, so it is not tried again and again), 503 when the converter is
busy or missing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

from pipeline.errors import StageError
from pipeline.meshes import write_printable
from pipeline.storage import Asset, AssetStore, publish, temp_path_for

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


T = TypeVar("T")


class Target(Protocol):
    """Where a format made on request is read from (the GLB) and published to."""

    key: Hashable  # one per file: concurrent requests of it share one task
    label: str  # the job's or example's id, for the log
    local: bool  # its checks are local file system calls (else network round trips, run in a thread)

    def exists(self) -> bool: ...
    def has_source(self) -> bool: ...
    def source(self) -> AbstractContextManager[Path]: ...  # the GLB as a local file, for the producer
    def scratch(self) -> Path: ...  # where the producer writes
    def publish(self, tmp: Path) -> None: ...  # the producer's file, published whole


class FileTarget:
    """`path`, made from the GLB `glb`: an example's formats (shipped examples are read-only, so theirs go to a
    folder of their own)."""

    local = True

    def __init__(self, glb: Path, path: Path) -> None:
        self.glb, self.path = glb, path
        self.key: Hashable = path
        self.label = path.parent.name

    def exists(self) -> bool:
        return self.path.is_file()

    def has_source(self) -> bool:
        return self.glb.is_file()

    @contextmanager
    def source(self) -> Iterator[Path]:
        yield self.glb

    def scratch(self) -> Path:
        return temp_path_for(self.path)

    def publish(self, tmp: Path) -> None:
        publish(tmp, self.path)


class AssetTarget:
    """A job's `kind`, made from its GLB, in the job's asset store (pipeline.storage.open_asset_store): with a
    folder, the files themselves; with object storage, a scratch copy of the GLB in and an upload out."""

    def __init__(self, assets: AssetStore, job_id: str, kind: Asset) -> None:
        self.assets, self.job_id, self.kind = assets, job_id, kind
        self.key = (job_id, kind)
        self.label = job_id
        self.local = assets.local_path(job_id, kind) is not None

    def exists(self) -> bool:
        return self.assets.has(self.job_id, self.kind)

    def has_source(self) -> bool:
        return self.assets.has(self.job_id, Asset.glb)

    def source(self) -> AbstractContextManager[Path]:
        return self.assets.local_copy(self.job_id, Asset.glb)

    def scratch(self) -> Path:
        return self.assets.scratch_path(self.job_id, self.kind)

    def publish(self, tmp: Path) -> None:
        self.assets.publish_file(self.job_id, self.kind, tmp)


class FormatMaker:
    """Makes a target's format from its GLB on request; `converter` is the USDZ stage's backend (the Blender pool),
    whose `export` and `render_preview` make the Blender formats. One per process."""

    def __init__(self, converter: Any) -> None:
        self._converter = converter
        self._making: dict[Hashable, asyncio.Task[None]] = {}
        self._failed: dict[Hashable, str] = {}

    async def ensure(self, target: Target, kind: Asset) -> None:
        """Return once the target's file exists; FormatError when it cannot be made now (503) or at all (404)."""
        if await _checked(target, target.exists):
            return
        if not await _checked(target, target.has_source):
            raise FormatError(404, "Asset not found")
        key = target.key
        if (failed := self._failed.get(key)) is not None:
            raise FormatError(404, failed)
        task = self._making.get(key)
        if task is None:
            task = asyncio.create_task(self._make(target, kind), name=f"format-{kind.value}")
            self._making[key] = task
            task.add_done_callback(lambda _done: self._making.pop(key, None))
        try:
            await asyncio.shield(task)
        except StageError as exc:
            sentence = f"The {NAMES[kind]} could not be made: {_lower_first(exc.message)}"
            if exc.retryable:
                raise FormatError(503, sentence, {"Retry-After": str(RETRY_AFTER_S)}) from None
            raise FormatError(404, sentence) from None

    async def _make(self, target: Target, kind: Asset) -> None:
        # Published by a task that ended while this request checked (a network round trip for object storage):
        # found here, not made again.
        if not target.local and await _checked(target, target.exists):
            return
        tmp = target.scratch()
        began = time.monotonic()
        try:
            await _with_local(target.source(), lambda glb: self._produce(glb, tmp, kind))
            await asyncio.to_thread(target.publish, tmp)
            log.info("%s %s made in %.2f s", target.label, kind.value, time.monotonic() - began)
        except StageError as exc:
            log.warning("%s %s could not be made: %s", target.label, kind.value, exc.message)
            if not exc.retryable:
                self._failed[target.key] = f"The {NAMES[kind]} could not be made: {_lower_first(exc.message)}"
            raise
        except Exception:
            log.exception("%s %s failed with an unexpected error", target.label, kind.value)
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


async def _checked(target: Target, check: Callable[[], bool]) -> bool:
    """A target's check: inline on a local file system, in a thread when it is a round trip to object storage."""
    return check() if target.local else await asyncio.to_thread(check)


async def _with_local(copy: AbstractContextManager[Path], work: Callable[[Path], Awaitable[T]]) -> T:
    """`work(path)` inside `copy` (a local file of the GLB: a download to scratch with object storage), whose
    entry and exit may block on the network, so they run in a thread."""
    path = await asyncio.to_thread(copy.__enter__)
    try:
        return await work(path)
    finally:
        await asyncio.to_thread(copy.__exit__, None, None, None)


def _lower_first(message: str) -> str:
    """A converter's sentence ("The model could not ...") continued after a colon; "GLB ..." stays as it is."""
    return message if message[1:2].isupper() else message[:1].lower() + message[1:]
