"""Serving a file the way browsers and download tools expect: an ETag, 304 when the client's copy is current,
Range requests (Starlette's FileResponse), and `no-cache` so a client revalidates rather than trusts a stale copy."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fastapi import Request
from fastapi.responses import FileResponse, Response


def etag_of(stat: os.stat_result) -> str:
    """Changes whenever the file is replaced (a new inode from the atomic rename) or rewritten."""
    return '"' + hashlib.blake2b(f"{stat.st_ino}-{stat.st_size}-{stat.st_mtime_ns}".encode(),
                                 digest_size=12).hexdigest() + '"'


def file_response(request: Request, path: Path, media_type: str, *, filename: str | None = None,
                  disposition: str = "inline") -> Response | None:
    """The file (or 304), or None when there is no such file."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    etag = etag_of(stat)
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if etag in {t.strip() for t in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=304, headers=headers)
    return FileResponse(path, media_type=media_type, filename=filename, stat_result=stat, headers=headers,
                        content_disposition_type=disposition)
