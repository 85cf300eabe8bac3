"""An asyncio pool of long-lived Blender worker processes: bounded queue, per-request timeout, restart on crash.

A caller that gives up (its task is cancelled: a client cancelled the job) frees its worker at once: the worker is
killed, the caller's cancellation goes on once it is dead (so nothing it was writing lands afterwards), and a fresh
worker takes the slot, as after a timeout.

This module runs in the service's interpreter and never imports bpy: each worker is a separate Blender Python
(`converters/blender/worker.py`) talking JSON lines over a socket pair, one request at a time. Blender's own
output (stdout and stderr) is drained into this module's logger at debug level.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from converters.blender.glbcheck import check_glb
from pipeline import lifeline
from pipeline.errors import StageError, StageUnavailable

log = logging.getLogger("grok3d.blender")

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MAX_GLB_BYTES = 256 * 2**20
DEFAULT_MAX_FACES = 1_000_000  # TripoSR at resolution 256 makes a few hundred thousand
START_TIMEOUT_S = 120.0
CLOSE_GRACE_S = 5.0


def default_python() -> Path:
    """The repository's .venv-blender interpreter (the service passes GROK3D_BLENDER_PYTHON when it is set)."""
    return REPO_ROOT / ".venv-blender" / "bin" / "python"


@dataclass(frozen=True)
class WorkerReport:
    """What a worker said about one request: timing, memory and the data blocks left after its reset."""

    pid: int
    seconds: float
    rss_mb: float
    counts: dict[str, int]
    result: dict[str, Any]


@dataclass
class _Request:
    op: str
    payload: dict[str, Any]
    future: asyncio.Future[WorkerReport] = field(repr=False)
    started: bool = False  # a worker has it
    released: asyncio.Event = field(default_factory=asyncio.Event, repr=False)  # no worker works on it any more


class _Worker:
    """One Blender process and its channel. Not shared: exactly one runner task drives it."""

    def __init__(self, python: Path, tmp_root: Path) -> None:
        self.python = python
        self.tmpdir = Path(tempfile.mkdtemp(prefix="worker-", dir=tmp_root))
        self.process: asyncio.subprocess.Process | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.output_tail: collections.deque[str] = collections.deque(maxlen=20)
        self._drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid if self.process else -1

    async def start(self) -> None:
        parent, child = socket.socketpair()
        # One core per worker: numpy's thread pools stay single-threaded like Cycles (set in usdz.py). The worker
        # dies with this process (pipeline/lifeline.py), even in the middle of a conversion, when it would not
        # see its channel close; so this must run on the thread that owns the pool (its event loop's).
        env = lifeline.child_env(dict(os.environ, PYTHONPATH=str(REPO_ROOT), TMPDIR=str(self.tmpdir),
                                      PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
                                      MKL_NUM_THREADS="1"))
        try:
            self.process = await asyncio.create_subprocess_exec(
                str(self.python), "-m", "converters.blender.worker", "--fd", str(child.fileno()),
                pass_fds=(child.fileno(),), stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=env, cwd=str(REPO_ROOT),
                start_new_session=True,  # its own process group: a kill reaches anything Blender started
            )
        finally:
            child.close()
        self._drain = asyncio.create_task(self._drain_output())
        self.reader, self.writer = await asyncio.open_unix_connection(sock=parent, limit=2**20)
        hello = await asyncio.wait_for(self._read_message(), START_TIMEOUT_S)
        if not hello.get("ready"):
            raise RuntimeError(f"unexpected greeting {hello!r}")
        log.info("Blender worker %d ready (%.0f MB)", self.pid, hello.get("rss_mb", 0.0))

    async def _drain_output(self) -> None:
        assert self.process and self.process.stdout
        async for raw in self.process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.output_tail.append(line)
            log.debug("blender[%d] %s", self.pid, line)

    async def _read_message(self) -> dict[str, Any]:
        assert self.reader
        line = await self.reader.readline()
        if not line:
            raise ConnectionError("the worker closed its channel")
        message: dict[str, Any] = json.loads(line)
        return message

    async def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        assert self.writer
        self.writer.write(json.dumps(message).encode() + b"\n")
        await self.writer.drain()
        return await self._read_message()

    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    async def stop(self, *, kill: bool) -> None:
        """Close the channel (the worker exits at EOF); kill its process group if asked or if it lingers."""
        if self.writer:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        if self.process and self.process.returncode is None:
            if not kill:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.process.wait(), CLOSE_GRACE_S)
            if self.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                await self.process.wait()
        if self._drain:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._drain, 2.0)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


class BlenderPool:
    """GLB -> USDZ conversions, further formats and preview renders on `workers` warm Blender processes
    (pipeline.stages.Converter)."""

    def __init__(
        self,
        workers: int = 2,
        timeout_s: float = 300.0,
        bake_size: int = 1024,
        python: Path | str | None = None,
        queue_max: int = 64,
        max_glb_bytes: int = DEFAULT_MAX_GLB_BYTES,
        max_faces: int = DEFAULT_MAX_FACES,
        preview_size: int = 512,
    ) -> None:
        self.workers = int(workers)
        self.timeout_s = float(timeout_s)
        self.bake_size = int(bake_size)
        self.python = Path(python) if python is not None else default_python()
        self.max_glb_bytes = max_glb_bytes
        self.max_faces = max_faces
        self.preview_size = preview_size
        if self.workers < 1 or not (self.bake_size == 0 or self.bake_size >= 16) or self.timeout_s <= 0:
            raise ValueError("workers >= 1, bake_size 0 (no baking) or >= 16, and timeout_s > 0 are required")
        self._queue: asyncio.Queue[_Request] = asyncio.Queue(maxsize=queue_max)
        self._slots: list[_Worker | None] = [None] * self.workers
        self._runners: list[asyncio.Task[None]] = []
        self._ids = itertools.count(1)
        self._tmp_root: Path | None = None
        self._closed = False

    # ----- lifecycle -----------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every worker and wait until each has imported Blender (the service calls this at startup)."""
        if self._runners:
            return
        if not self.python.exists():
            raise StageUnavailable(f"The Blender converter is not installed ({self.python} is missing).")
        self._tmp_root = Path(tempfile.mkdtemp(prefix="grok3d-blender-"))
        try:
            self._slots = list(await asyncio.gather(*(self._spawn() for _ in range(self.workers))))
        except BaseException:
            await self._stop_all(kill=True)
            raise
        self._runners = [asyncio.create_task(self._run(slot), name=f"blender-{slot}") for slot in range(self.workers)]

    async def close(self) -> None:
        """Fail queued requests, let running ones be cut off, stop every worker process, remove temp files."""
        self._closed = True
        for runner in self._runners:
            runner.cancel()
        for runner in self._runners:
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        self._runners = []
        while not self._queue.empty():
            request = self._queue.get_nowait()
            if not request.future.done():
                request.future.set_exception(StageError("The converter is shutting down, retry later.", retryable=True))
        await self._stop_all(kill=False)
        if self._tmp_root:
            shutil.rmtree(self._tmp_root, ignore_errors=True)

    async def __aenter__(self) -> BlenderPool:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for health checks and tests)."""
        return [w.pid for w in self._slots if w is not None and w.alive()]

    # ----- public requests -----------------------------------------------------------------------------------
    async def convert(self, glb_path: Path, usdz_path: Path) -> None:
        """Write `usdz_path` (AR-ready USDZ, colours baked) from `glb_path`; StageError with a reason on failure."""
        await self.convert_with_report(glb_path, usdz_path)

    async def convert_with_report(self, glb_path: Path, usdz_path: Path, bake_size: int | None = None) -> WorkerReport:
        check_glb(Path(glb_path), self.max_glb_bytes, self.max_faces)
        payload = {"glb": str(Path(glb_path).resolve()), "out": str(Path(usdz_path).resolve()),
                   "bake_size": self.bake_size if bake_size is None else bake_size, "max_faces": self.max_faces}
        return await self._submit("convert", payload)

    async def export(self, glb_path: Path, out_path: Path, fmt: str) -> None:
        """Write `out_path` in `fmt` (converters/blender/formats.py: glb_textured, fbx, obj) from `glb_path`, with
        the USDZ's baked texture; StageError with a reason on failure."""
        await self.export_with_report(glb_path, out_path, fmt)

    async def export_with_report(self, glb_path: Path, out_path: Path, fmt: str) -> WorkerReport:
        check_glb(Path(glb_path), self.max_glb_bytes, self.max_faces)
        payload = {"glb": str(Path(glb_path).resolve()), "out": str(Path(out_path).resolve()), "format": fmt,
                   "bake_size": self.bake_size, "max_faces": self.max_faces}
        return await self._submit("export", payload)

    async def render_preview(self, glb_path: Path, jpeg_path: Path) -> None:
        """Write a square JPEG preview (Cycles on CPU, three-quarter view) of the GLB."""
        await self.render_preview_with_report(glb_path, jpeg_path)

    async def render_preview_with_report(self, glb_path: Path, jpeg_path: Path) -> WorkerReport:
        check_glb(Path(glb_path), self.max_glb_bytes, self.max_faces)
        payload = {"glb": str(Path(glb_path).resolve()), "out": str(Path(jpeg_path).resolve()),
                   "size": self.preview_size, "max_faces": self.max_faces}
        return await self._submit("render", payload)

    async def ping(self) -> WorkerReport:
        """A round trip through one worker: proves a worker is up and answering."""
        return await self._submit("ping", {})

    # ----- internals -----------------------------------------------------------------------------------------
    async def _submit(self, op: str, payload: dict[str, Any]) -> WorkerReport:
        if self._closed or not self._runners:
            raise StageUnavailable("The Blender converter is not running.")
        request = _Request(op, payload, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(request)
        except asyncio.QueueFull:
            raise StageError("The converter is busy (too many conversions queued), retry later.", retryable=True) from None
        try:
            return await request.future
        except asyncio.CancelledError:
            # The caller gave up (the future is cancelled with it). A queued request is skipped; a running one's
            # worker is killed by its runner: wait for that, so its output cannot land after the caller moved on.
            if request.started:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(request.released.wait(), 2 * CLOSE_GRACE_S)
            raise

    async def _spawn(self) -> _Worker:
        assert self._tmp_root
        worker = _Worker(self.python, self._tmp_root)
        try:
            await worker.start()
        except (OSError, RuntimeError, ConnectionError, ValueError, asyncio.TimeoutError) as exc:
            tail = " | ".join(worker.output_tail)
            await worker.stop(kill=True)
            log.error("Blender worker failed to start: %s; output: %s", exc, tail)
            raise StageUnavailable("The Blender converter could not start.") from exc
        return worker

    async def _run(self, slot: int) -> None:
        """One runner per worker slot: take a request, make sure the worker lives, ask it, settle the future."""
        while True:
            request = await self._queue.get()
            try:
                if request.future.done():  # the caller gave up while it was queued
                    continue
                outcome = await self._serve(slot, request)
                if not request.future.done():
                    if isinstance(outcome, BaseException):
                        request.future.set_exception(outcome)
                    else:
                        request.future.set_result(outcome)
            finally:
                self._queue.task_done()

    async def _serve(self, slot: int, request: _Request) -> WorkerReport | StageError:
        worker = self._slots[slot]
        if worker is None or not worker.alive():
            if worker is not None:
                await worker.stop(kill=True)
            try:
                worker = self._slots[slot] = await self._spawn()
            except StageError as exc:
                self._slots[slot] = None
                return exc
        message = {"id": next(self._ids), "op": request.op, **request.payload}
        request.started = True
        ask = asyncio.ensure_future(worker.ask(message))
        try:
            # The answer, the caller giving up (its future is cancelled), or the timeout, whichever comes first.
            done, _ = await asyncio.wait({ask, request.future}, timeout=self.timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if ask not in done:
                ask.cancel()
                if request.future.done():
                    log.info("Blender worker %d: %s abandoned by its caller; replacing the worker", worker.pid,
                             request.op)
                    await worker.stop(kill=True)
                    request.released.set()
                    await self._respawn(slot)
                    return StageError("The conversion was abandoned.")
                log.warning("Blender worker %d timed out after %.0f s on %s; replacing it", worker.pid,
                            self.timeout_s, request.op)
                await self._replace(slot)
                return StageError(f"The conversion took longer than {self.timeout_s:g} seconds and was stopped.")
            try:
                reply = ask.result()
            except (ConnectionError, OSError, ValueError) as exc:
                log.error("Blender worker %d died during %s (%s); output: %s", worker.pid, request.op, exc,
                          " | ".join(worker.output_tail))
                await self._replace(slot)
                return StageError("The converter crashed while processing this model.")
            return self._settle(worker, request, reply)
        finally:
            if not ask.done():
                ask.cancel()
            request.released.set()

    def _settle(self, worker: _Worker, request: _Request, reply: dict[str, Any]) -> WorkerReport | StageError:
        if reply.get("ok"):
            return WorkerReport(pid=worker.pid, seconds=float(reply["seconds"]), rss_mb=float(reply["rss_mb"]),
                                counts=dict(reply["counts"]), result=dict(reply.get("result") or {}))
        if reply.get("bug"):
            log.error("Blender worker %d failed on %s: %s", worker.pid, request.op, reply.get("error"))
            return StageError("The model could not be converted because of an internal error.")
        return StageError(str(reply.get("error") or "The model could not be converted."))

    async def _replace(self, slot: int) -> None:
        """Kill the slot's worker and start a fresh one; if that fails, the next request tries again."""
        worker = self._slots[slot]
        if worker is not None:
            await worker.stop(kill=True)
        await self._respawn(slot)

    async def _respawn(self, slot: int) -> None:
        try:
            self._slots[slot] = await self._spawn()
        except StageError:
            self._slots[slot] = None

    async def _stop_all(self, *, kill: bool) -> None:
        workers = [w for w in self._slots if w is not None]
        self._slots = [None] * self.workers
        await asyncio.gather(*(w.stop(kill=kill) for w in workers), return_exceptions=True)
