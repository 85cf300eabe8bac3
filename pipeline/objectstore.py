"""A job's files on S3-compatible object storage (GROK3D_ASSETS_URL=s3://bucket/prefix), through obstore.

The same narrow interface as the folder store (`pipeline.storage.AssetStore`), object for file: `<prefix>/<job_id>/
image.jpg`, `model.glb`, ... An object is published whole: a PUT either stores the whole object or nothing, and a
reader never sees part of one (S3 API, PutObject: "Amazon S3 never adds partial objects"; a large file goes up in a
multipart upload, which becomes visible only at CompleteMultipartUpload). Each object carries its media type and
Content-Disposition, so a presigned download (`presign`) gets API.md's headers from the storage itself; Range and
If-None-Match are the S3 API's own (GetObject).

Credentials and region come from the standard variables AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION (read
by obstore's S3Store); GROK3D_S3_ENDPOINT names a server other than AWS (SeaweedFS, Garage, R2, moto in the tests).

Producers that need files (Blender) work on local scratch copies under `scratch` ($GROK3D_DATA_DIR/scratch), each
removed when its use ends. A process keeps its copies in a folder of its own, `scratch/proc-<random>/`, named
`<job_id>.<file>`, which it holds an exclusive flock(2) on (its `.lock` file) for its life: the kernel lets go of
the lock when the process dies, however it dies, so the sweep (`remove_stale_temporaries`, at start-up and every
GROK3D_SWEEP_INTERVAL_S) removes every process folder whose lock it can take (a `kill -9` in the middle of a
conversion left its copies there) and never one in use, even where replicas share the data folder.

Every method blocks on the network: async callers run them in a thread (`iter_range` is the async exception).
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import shutil
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import obstore
from obstore.store import S3Store

from pipeline.storage import (DISPOSITION, DOWNLOAD_SUFFIX, FILE_NAMES, STORED_MEDIA_TYPES, Asset, ObjectInfo,
                              is_job_id, remove_older_than)

CHUNK = 256 * 1024  # streamed downloads: pieces of this size
OWN_PREFIX = "proc-"  # a process's scratch folder: scratch/proc-<random>/
LOCK_NAME = ".lock"  # in it: the file its process holds an exclusive flock on
UNLOCKED_GRACE_S = 60.0  # a process folder without its lock file yet is being made: a minute is plenty
OLD_COPY_S = 3600.0  # the per-job scratch folders of earlier versions (scratch/<job_id>/): files this old are left


class S3AssetStore:
    def __init__(self, store: S3Store, scratch: Path, *, location: str) -> None:
        self.store = store
        self.scratch = scratch
        self.location = location  # s3://bucket/prefix, for the log
        self.scratch.mkdir(parents=True, exist_ok=True)
        self._own: Path | None = None  # this process's scratch folder, made on first use
        self._own_lock: int | None = None  # the open lock file that holds it
        self._own_guard = threading.Lock()

    # -- scratch ---------------------------------------------------------------------------------------------

    def _own_folder(self) -> Path:
        """This process's scratch folder, locked (see the module's docstring). A sweep of another process may remove
        a folder between its mkdir and its lock: then the lock file is gone or not where it was, and a new one is
        made."""
        with self._own_guard:
            while self._own is None:
                folder = self.scratch / f"{OWN_PREFIX}{secrets.token_hex(6)}"
                try:
                    folder.mkdir(parents=True)
                    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
                except (FileExistsError, FileNotFoundError):  # a name taken, or swept between the two calls
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    if os.stat(folder / LOCK_NAME).st_ino != os.fstat(fd).st_ino:
                        raise FileNotFoundError(folder)
                except (BlockingIOError, FileNotFoundError):  # being swept, or swept: another folder
                    os.close(fd)
                    continue
                self._own, self._own_lock = folder, fd
            return self._own

    def remove_stale_temporaries(self) -> int:
        """Remove the scratch folders of processes that have ended (their copies outlived them: a crash, a kill)
        and what earlier versions left; the number of folders removed. Blocking: call it in a thread."""
        removed = 0
        try:
            entries = list(self.scratch.iterdir())
        except FileNotFoundError:
            return 0
        for entry in entries:
            if entry == self._own or not entry.is_dir():
                continue
            if entry.name.startswith(OWN_PREFIX):
                removed += self._remove_if_unlocked(entry)
            elif is_job_id(entry.name):  # scratch/<job_id>/: earlier versions made one per job, and left it
                removed += _remove_old_files(entry, OLD_COPY_S)
        return removed

    def _remove_if_unlocked(self, folder: Path) -> int:
        try:
            fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:  # being made right now, or its maker died before it locked it
            try:
                young = time.time() - folder.stat().st_mtime < UNLOCKED_GRACE_S
            except FileNotFoundError:
                return 0
            if young:
                return 0
            shutil.rmtree(folder, ignore_errors=True)
            return 1
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return 0  # its process is alive
                raise
            shutil.rmtree(folder, ignore_errors=True)  # under the lock: its would-be owner sees it go, and retries
            return 1
        finally:
            os.close(fd)

    @classmethod
    def from_url(cls, url: str, *, endpoint: str | None, scratch: Path) -> S3AssetStore:
        parts = urlsplit(url)
        config = {"endpoint": endpoint} if endpoint else {}
        # A non-AWS server on plain HTTP (a cluster-internal SeaweedFS, the tests' moto) must be allowed explicitly.
        options = {"allow_http": True} if endpoint and endpoint.startswith("http://") else {}
        store = S3Store(parts.netloc, prefix=parts.path.strip("/") or None, config=config, client_options=options)
        return cls(store, scratch, location=url)

    def key(self, job_id: str, asset: Asset) -> str:
        if not is_job_id(job_id):  # the only guard between a URL and the bucket
            raise ValueError(f"not a job id: {job_id!r}")
        return f"{job_id}/{FILE_NAMES[asset]}"

    def _attributes(self, job_id: str, asset: Asset) -> dict[str, str]:
        attributes = {"Content-Type": STORED_MEDIA_TYPES[asset], "Cache-Control": "no-cache"}
        if asset in DISPOSITION:
            attributes["Content-Disposition"] = (f'{DISPOSITION[asset]}; '
                                                 f'filename="{job_id}.{DOWNLOAD_SUFFIX[asset]}"')
        return attributes

    # -- the interface of pipeline.storage.AssetStore -------------------------------------------------------

    def has(self, job_id: str, asset: Asset) -> bool:
        return self.stat(job_id, asset) is not None

    def write(self, job_id: str, asset: Asset, data: bytes) -> None:
        obstore.put(self.store, self.key(job_id, asset), data, attributes=self._attributes(job_id, asset))

    def read(self, job_id: str, asset: Asset) -> bytes:
        return bytes(obstore.get(self.store, self.key(job_id, asset)).bytes())

    def stat(self, job_id: str, asset: Asset) -> ObjectInfo | None:
        try:
            meta = obstore.head(self.store, self.key(job_id, asset))
        except FileNotFoundError:
            return None
        return ObjectInfo(meta["size"], meta["e_tag"] or f'"{meta["size"]}"', meta["last_modified"].timestamp())

    def read_range(self, job_id: str, asset: Asset, first: int, last: int) -> bytes:
        # obstore's end is exclusive; a byte range's last position is included (RFC 9110 §14.1.2).
        return bytes(obstore.get_range(self.store, self.key(job_id, asset), start=first, end=last + 1))

    async def iter_range(self, job_id: str, asset: Asset, first: int, last: int) -> AsyncIterator[bytes]:
        """The bytes first..last, streamed from the store as they arrive."""
        result = await obstore.get_async(self.store, self.key(job_id, asset),
                                         options={"range": (first, last + 1)})
        async for chunk in result.stream(min_chunk_size=CHUNK):
            yield bytes(chunk)

    def local_path(self, job_id: str, asset: Asset) -> Path | None:
        return None  # not on this machine: downloads stream through, or redirect

    def scratch_path(self, job_id: str, asset: Asset) -> Path:
        """A new local file name for `asset` of the job, in this process's scratch folder; whoever asks for it
        removes it (`publish_file` does, as does `local_copy`)."""
        if not is_job_id(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        name = FILE_NAMES[asset]
        stem, dot, suffix = name.rpartition(".")
        # The extension last, as Blender wants.
        return self._own_folder() / f"{job_id}.{stem}.{secrets.token_hex(4)}.tmp{dot}{suffix}"

    def publish_file(self, job_id: str, asset: Asset, tmp: Path) -> None:
        try:
            obstore.put(self.store, self.key(job_id, asset), tmp, attributes=self._attributes(job_id, asset))
        finally:
            tmp.unlink(missing_ok=True)

    @contextmanager
    def local_copy(self, job_id: str, asset: Asset) -> Iterator[Path]:
        copy = self.scratch_path(job_id, asset)
        try:
            with open(copy, "wb") as f:
                for chunk in obstore.get(self.store, self.key(job_id, asset)).stream(min_chunk_size=CHUNK):
                    f.write(chunk)
            yield copy
        finally:
            copy.unlink(missing_ok=True)

    def remove_temporaries(self, job_id: str) -> None:
        """Nothing is ever half-written in the bucket; scratch copies of an interrupted stage are local: this
        process's own (another process's go with their use, or with the process, see remove_stale_temporaries)."""
        if is_job_id(job_id) and self._own is not None:
            for copy in self._own.glob(f"{job_id}.*"):
                copy.unlink(missing_ok=True)

    def delete_job(self, job_id: str) -> None:
        folder = self.key(job_id, Asset.image).rpartition("/")[0] + "/"
        keys = [meta["path"] for batch in obstore.list(self.store, prefix=folder) for meta in batch]
        if keys:
            obstore.delete(self.store, keys)
        self.remove_temporaries(job_id)

    def job_ids(self) -> list[str]:
        """The jobs that have objects here: the first level of the prefix (S3 ListObjectsV2 with a delimiter)."""
        listing = obstore.list_with_delimiter(self.store)
        return [name for name in (p.rstrip("/").rpartition("/")[2] for p in listing["common_prefixes"])
                if is_job_id(name)]

    def presign(self, job_id: str, asset: Asset, seconds: int) -> str | None:
        """A GET URL signed with this store's credentials, valid for `seconds` (SigV4 query authentication)."""
        return obstore.sign(self.store, "GET", self.key(job_id, asset), timedelta(seconds=seconds))


def _remove_old_files(folder: Path, age_s: float) -> int:
    """Files in `folder` older than `age_s`, then the folder if that emptied it; 1 when the folder went."""
    remove_older_than(folder.iterdir(), age_s)
    try:
        folder.rmdir()
    except OSError:  # not empty (a copy still in use), or gone already
        return 0
    return 1
