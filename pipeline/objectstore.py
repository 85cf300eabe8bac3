"""A job's files on S3-compatible object storage (GROK3D_ASSETS_URL=s3://bucket/prefix), through obstore.

The same narrow interface as the folder store (`pipeline.storage.AssetStore`), object for file: `<prefix>/<job_id>/
image.jpg`, `model.glb`, ... An object is published whole: a PUT either stores the whole object or nothing, and a
reader never sees part of one (S3 API, PutObject: "Amazon S3 never adds partial objects"; a large file goes up in a
multipart upload, which becomes visible only at CompleteMultipartUpload). Each object carries its media type and
Content-Disposition, so a presigned download (`presign`) gets API.md's headers from the storage itself; Range and
If-None-Match are the S3 API's own (GetObject).

Credentials and region come from the standard variables AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION (read
by obstore's S3Store); GROK3D_S3_ENDPOINT names a server other than AWS (SeaweedFS, Garage, R2, moto in the tests).
Producers that need files (Blender) work on local scratch copies under `scratch`.

Every method blocks on the network: async callers run them in a thread (`iter_range` is the async exception).
"""

from __future__ import annotations

import secrets
import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit

import obstore
from obstore.store import S3Store

from pipeline.storage import (DISPOSITION, DOWNLOAD_SUFFIX, FILE_NAMES, STORED_MEDIA_TYPES, Asset, ObjectInfo,
                              is_job_id)

CHUNK = 256 * 1024  # streamed downloads: pieces of this size


class S3AssetStore:
    def __init__(self, store: S3Store, scratch: Path, *, location: str) -> None:
        self.store = store
        self.scratch = scratch
        self.location = location  # s3://bucket/prefix, for the log
        self.scratch.mkdir(parents=True, exist_ok=True)

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
        folder = self.scratch / job_id
        folder.mkdir(parents=True, exist_ok=True)
        name = FILE_NAMES[asset]
        stem, dot, suffix = name.rpartition(".")
        return folder / f".{stem}.{secrets.token_hex(4)}.tmp{dot}{suffix}"  # the extension last, as Blender wants

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
        """Nothing is ever half-written in the bucket; scratch copies of an interrupted stage are local."""
        if is_job_id(job_id):
            shutil.rmtree(self.scratch / job_id, ignore_errors=True)

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
