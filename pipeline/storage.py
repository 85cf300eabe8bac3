"""Where a job's files live, and how they are written: ids are validated before any path is built, and every
file is written to a temporary name and renamed into place, so nothing half-written is ever served. Published
files get the permissions the umask gives, as any file a program creates.

Two asset stores share one narrow interface (`AssetStore` below is the folder; `pipeline.objectstore.S3AssetStore`
the S3-compatible object store), chosen by GROK3D_ASSETS_URL through `open_asset_store`. What callers may use:
`has`, `write`, `read`, `stat`, `read_range`, `local_path` (None off the local disk), `scratch_path` + `publish_file`
(a producer such as Blender writes a local file, then it is published whole), `local_copy` (a local file to read,
for a producer that needs a path), `remove_temporaries`, `remove_stale_temporaries` (the sweep's), `delete_job`,
`presign`."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.settings import Settings

JOB_ID_RE = re.compile(r"[0-9a-f]{8}")
EXAMPLE_ID_RE = re.compile(r"ex_[a-z0-9][a-z0-9-]{0,62}")
EXAMPLE_PREFIX = "ex_"


class Asset(str, Enum):
    """The files a job produces, in the order its stages produce them, then the formats made on first request."""

    upload = "upload"  # the picture a client sent, as sent (not served: `image` is its JPEG)
    image = "image"  # the picture from xAI, or the upload upright as JPEG
    input = "input"  # the matted, framed picture TripoSR sees (kept for debugging, not served)
    glb = "glb"
    usdz = "usdz"
    preview = "preview"  # a render of the mesh, made with the USDZ
    glb_textured = "glb_textured"  # the GLB with the USDZ's baked texture and UVs
    obj = "obj"  # a zip of OBJ, MTL and the baked texture
    stl = "stl"
    threemf = "3mf"
    fbx = "fbx"


FILE_NAMES = {Asset.upload: "upload", Asset.image: "image.jpg", Asset.input: "input.png", Asset.glb: "model.glb",
              Asset.usdz: "model.usdz", Asset.preview: "preview.jpg", Asset.glb_textured: "model_textured.glb",
              Asset.obj: "model.obj.zip", Asset.stl: "model.stl", Asset.threemf: "model.3mf", Asset.fbx: "model.fbx"}
# Registered media types where there is one (model/stl and model/3mf: IANA; model/vnd.usdz+zip: Apple's); FBX has
# none, so it goes as plain bytes.
MEDIA_TYPES = {Asset.image: "image/jpeg", Asset.glb: "model/gltf-binary", Asset.usdz: "model/vnd.usdz+zip",
               Asset.preview: "image/jpeg", Asset.glb_textured: "model/gltf-binary", Asset.obj: "application/zip",
               Asset.stl: "model/stl", Asset.threemf: "model/3mf", Asset.fbx: "application/octet-stream"}
# The download's name is `{job_id}.{suffix}`.
DOWNLOAD_SUFFIX = {Asset.image: "jpg", Asset.glb: "glb", Asset.usdz: "usdz", Asset.preview: "preview.jpg",
                   Asset.glb_textured: "textured.glb", Asset.obj: "obj.zip", Asset.stl: "stl", Asset.threemf: "3mf",
                   Asset.fbx: "fbx"}
# Pictures and USDZ open inline (Safari hands an inline USDZ to AR Quick Look); model files download.
DISPOSITION = {asset: "attachment" for asset in MEDIA_TYPES} | {Asset.image: "inline", Asset.usdz: "inline",
                                                                Asset.preview: "inline"}
SERVED_ASSETS = tuple(MEDIA_TYPES)
# Made on a client's first request for them (pipeline/formats.py), from the GLB.
ON_DEMAND = (Asset.preview, Asset.glb_textured, Asset.obj, Asset.stl, Asset.threemf, Asset.fbx)
# The path form of the asset URLs, /api/jobs/{job_id}/{name}: each name ends in its file's extension.
BY_FILE_NAME = {FILE_NAMES[asset]: asset for asset in SERVED_ASSETS}
# What an object store records for each file (the upload keeps its own bytes: a JPEG, PNG or WebP).
STORED_MEDIA_TYPES = {**MEDIA_TYPES, Asset.input: "image/png", Asset.upload: "application/octet-stream"}


def new_job_id() -> str:
    return secrets.token_hex(4)


def is_job_id(value: str) -> bool:
    return JOB_ID_RE.fullmatch(value) is not None


def is_example_id(value: str) -> bool:
    return EXAMPLE_ID_RE.fullmatch(value) is not None


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see either nothing or the whole file, even after a crash. The file
    gets the permissions any new file gets (0666 less the umask), not a temporary file's private 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def create_temp(path: Path, suffix: str = ".tmp") -> tuple[int, Path]:
    """A new temporary sibling of `path` (ending in `suffix`), open for writing. Not tempfile.mkstemp: its mode
    0600, meant for shared folders such as /tmp, would stay with the file through the rename, and a web server or
    another user could not read what we publish. Here the kernel applies the umask to 0666, as for any file a
    program creates (the service's files and the grok3d command's downloads alike)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def temp_path_for(path: Path) -> Path:
    """A temporary sibling of `path` for producers that write files themselves (then `publish` it). It keeps the
    extension last, because writers such as Blender's USD exporter choose the format by it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")


def publish(tmp: Path, path: Path) -> None:
    """Move a producer's finished file into place, durably, with the permissions the umask gives (0644 under the
    usual 022), whatever mode the producer created it with."""
    with open(tmp, "rb") as f:
        os.fchmod(f.fileno(), new_file_mode())
        os.fsync(f.fileno())
    os.replace(tmp, path)


def new_file_mode() -> int:
    """0666 less the process's umask: the mode open() gives a new file."""
    return 0o666 & ~current_umask()


def current_umask() -> int:
    """The umask, read without changing it where Linux shows it (/proc/self/status, since Linux 4.7). Elsewhere it
    is set and put back at once, which another thread creating a file at that instant could notice."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@dataclass(frozen=True)
class ObjectInfo:
    """What a download needs to know before it reads a byte: size, a strong validator, and the time of the write
    (seconds since the epoch)."""

    size: int
    etag: str
    modified: float


def remove_older_than(paths: Iterable[Path], age_s: float) -> int:
    """Remove the files among `paths` last modified more than `age_s` seconds ago (leftovers of a crash; one that
    another process removes meanwhile is skipped); how many went."""
    now, removed = time.time(), 0
    for path in paths:
        try:
            if path.is_file() and now - path.stat().st_mtime > age_s:
                path.unlink()
                removed += 1
        except FileNotFoundError:
            pass
    return removed


STAGED_PREFIX = ".staged-"
STAGED_MAX_AGE_S = 3600.0  # a staged file this old was left by a crash: no submission takes that long


class AssetStore:
    """Job folders under `$GROK3D_DATA_DIR/jobs/` (or the folder GROK3D_ASSETS_URL names)."""

    def __init__(self, jobs_dir: Path) -> None:
        self.root = jobs_dir
        self.location = str(jobs_dir)  # for the log
        self.root.mkdir(parents=True, exist_ok=True)
        self.remove_stale_temporaries()

    def stage(self, data: bytes) -> Path:
        """Write a file for a job that does not exist yet, durably, beside the job folders; `adopt` gives it to the
        job once its id is known (inside the transaction that creates it)."""
        path = self.root / f"{STAGED_PREFIX}{secrets.token_hex(8)}"
        write_atomic(path, data)
        return path

    def adopt(self, staged: Path, job_id: str, asset: Asset) -> None:
        """Move a staged file into its job's folder: a rename, cheap enough to run inside a transaction."""
        path = self.path(job_id, asset)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staged, path)

    def remove_stale_temporaries(self) -> int:
        """The sweep's (and start-up's): staged files a crash left between staging and adoption; another process may
        be staging right now. A producer's temporary files are in its job's folder, removed when the job resumes or
        goes."""
        return remove_older_than(self.root.glob(f"{STAGED_PREFIX}*"), STAGED_MAX_AGE_S)

    def job_dir(self, job_id: str) -> Path:
        if not is_job_id(job_id):  # the only guard between a URL and the file system
            raise ValueError(f"not a job id: {job_id!r}")
        return self.root / job_id

    def path(self, job_id: str, asset: Asset) -> Path:
        return self.job_dir(job_id) / FILE_NAMES[asset]

    def has(self, job_id: str, asset: Asset) -> bool:
        return self.path(job_id, asset).is_file()

    def write(self, job_id: str, asset: Asset, data: bytes) -> Path:
        path = self.path(job_id, asset)
        write_atomic(path, data)
        return path

    def read(self, job_id: str, asset: Asset) -> bytes:
        return self.path(job_id, asset).read_bytes()

    def stat(self, job_id: str, asset: Asset) -> ObjectInfo | None:
        from pipeline.responses import etag_of  # the one definition of a file's tag

        try:
            st = self.path(job_id, asset).stat()
        except FileNotFoundError:
            return None
        return ObjectInfo(st.st_size, etag_of(st), st.st_mtime)

    def read_range(self, job_id: str, asset: Asset, first: int, last: int) -> bytes:
        with open(self.path(job_id, asset), "rb") as f:
            f.seek(first)
            return f.read(last - first + 1)

    def local_path(self, job_id: str, asset: Asset) -> Path | None:
        """The file itself: served with sendfile, read by producers in place."""
        return self.path(job_id, asset)

    def scratch_path(self, job_id: str, asset: Asset) -> Path:
        """Where a producer writes `asset` before `publish_file` moves it into place."""
        return temp_path_for(self.path(job_id, asset))

    def publish_file(self, job_id: str, asset: Asset, tmp: Path) -> None:
        publish(tmp, self.path(job_id, asset))

    @contextmanager
    def local_copy(self, job_id: str, asset: Asset) -> Iterator[Path]:
        """A local file holding `asset`, for a producer that reads paths: here the file itself."""
        yield self.path(job_id, asset)

    def remove_temporaries(self, job_id: str) -> None:
        """Leftovers of a stage interrupted by a crash."""
        folder = self.job_dir(job_id)
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp*"):
                tmp.unlink(missing_ok=True)

    def delete_job(self, job_id: str) -> None:
        """Every file of the job (retention, deletion), whatever is there; OSError when some could not go."""
        try:
            shutil.rmtree(self.job_dir(job_id))
        except FileNotFoundError:
            pass

    def job_ids(self) -> list[str]:
        """The jobs that have files here (the sweep compares them with the store's rows)."""
        try:
            return [entry.name for entry in self.root.iterdir() if entry.is_dir() and is_job_id(entry.name)]
        except FileNotFoundError:
            return []

    def presign(self, job_id: str, asset: Asset, seconds: int) -> str | None:
        """A short-lived URL a client may download from directly; a folder has none."""
        return None


def open_asset_store(settings: Settings) -> AssetStore:
    """GROK3D_ASSETS_URL: unset, today's folder under the data folder; a path, that folder; `s3://bucket/prefix`,
    the S3-compatible object store (pipeline/objectstore.py)."""
    url = settings.assets_url
    if url and url.startswith("s3://"):
        from pipeline.objectstore import S3AssetStore

        return S3AssetStore.from_url(url, endpoint=settings.s3_endpoint, scratch=settings.data_dir / "scratch")
    return AssetStore(Path(url.removeprefix("file://")) if url else settings.jobs_dir)
