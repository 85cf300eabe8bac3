"""Serving a file the way browsers, download tools and link checkers expect (RFC 9110):

- `ETag` (a new one whenever the file is replaced) and `Cache-Control: no-cache`, so a client revalidates rather
  than trusts a stale copy; `If-None-Match` answers 304 (§13.1.2).
- Range requests (§14): which ranges to send is decided here, the bytes are sent by Starlette's FileResponse (one
  part, or multipart/byteranges for several). A range unit other than `bytes` is ignored (the whole file, 200);
  an invalid or unsatisfiable byte range answers 416 with `Content-Range: bytes */LENGTH`; never 400.
- HEAD: the same status and headers as GET, and no body; the file is not read (pipeline/head.py routes HEAD here).

Objects in object storage (`object_response`) follow the same rules, their bytes streamed through.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from pipeline.head import is_head

if TYPE_CHECKING:
    from pipeline.storage import ObjectInfo

# More ranges than this in one request are ignored and the whole file is sent (§14.2: a server MAY ignore Range);
# no client of ours asks for more, and many small ranges are a known way to make a server work for nothing.
MAX_RANGES = 16
RANGE_NOT_SATISFIABLE = "Range not satisfiable"
ByteRange = tuple[int, int]  # first and last byte positions, both included, as in Content-Range

_INT_RANGE = re.compile(r"([0-9]+)-([0-9]*)")  # §14.1.2 int-range: first-pos "-" [ last-pos ]
_SUFFIX_RANGE = re.compile(r"-([0-9]+)")  # §14.1.2 suffix-range: "-" suffix-length


class RangeNotSatisfiable(Exception):
    """The Range header holds a byte range that is invalid, or none that lies within the file (§15.5.17: 416)."""


def etag_of(stat: os.stat_result) -> str:
    """Changes whenever the file is replaced (a new inode from the atomic rename) or rewritten."""
    return '"' + hashlib.blake2b(f"{stat.st_ino}-{stat.st_size}-{stat.st_mtime_ns}".encode(),
                                 digest_size=12).hexdigest() + '"'


def byte_ranges(header: str, length: int) -> list[ByteRange] | None:
    """The ranges of a `Range` header to send from a file of `length` bytes, sorted and with overlapping or
    adjacent ranges merged (§14.6 allows coalescing); None when the header is to be ignored and the whole file
    sent. Raises RangeNotSatisfiable for an invalid byte range or when none is satisfiable.

    §14.1: a range unit is case-insensitive, and a unit the server does not understand MUST be ignored (§14.2).
    §14.1.1: `first-last` with last < first is invalid. §14.1.2: a range is satisfiable when its first position
    lies within the file, or when it is a suffix of non-zero length; a last position past the end means the end.
    """
    unit, equals, range_set = header.partition("=")
    if not equals or unit.strip().lower() != "bytes" or length == 0:
        return None  # not a byte range, or nothing to take a range of
    # A list may hold empty elements, which a recipient MUST ignore (§5.6.1.2).
    specs = [spec.strip() for spec in range_set.split(",") if spec.strip()]
    if not specs:
        raise RangeNotSatisfiable("no range given")
    if len(specs) > MAX_RANGES:
        return None
    ranges: list[ByteRange] = []
    for spec in specs:
        if (int_range := _INT_RANGE.fullmatch(spec)) is not None:
            first, last = int(int_range[1]), int(int_range[2]) if int_range[2] else None
            if last is not None and last < first:
                raise RangeNotSatisfiable(f"invalid range {spec}")
            if first < length:
                ranges.append((first, length - 1 if last is None else min(last, length - 1)))
        elif (suffix := _SUFFIX_RANGE.fullmatch(spec)) is not None:
            if int(suffix[1]) > 0:
                ranges.append((max(0, length - int(suffix[1])), length - 1))
        else:
            raise RangeNotSatisfiable(f"invalid range {spec}")
    if not ranges:
        raise RangeNotSatisfiable("no range lies within the file")
    return _coalesce(ranges)


def _coalesce(ranges: list[ByteRange]) -> list[ByteRange]:
    merged: list[ByteRange] = []
    for first, last in sorted(ranges):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def _none_match(header: str, etag: str) -> bool:
    """§13.1.2 If-None-Match: `*`, or any listed tag equal to ours by weak comparison (W/ ignored)."""
    tags = {tag.strip().removeprefix("W/") for tag in header.split(",")}
    return "*" in tags or etag in tags


def _if_range_holds(header: str, etag: str, last_modified: str, mtime: float) -> bool:
    """§13.1.5 If-Range: an entity tag must match ours by strong comparison (a weak tag never does); a date must
    equal Last-Modified exactly and be a strong validator, i.e. at least a second old (§8.8.2.2)."""
    value = header.strip()
    if value.startswith(('"', "W/")):
        return value == etag
    return value == last_modified and time.time() - mtime >= 1.0


class _DecidedFileResponse(FileResponse):
    """Starlette's FileResponse, sending what this module decided: the request's Range and If-Range are replaced
    by the chosen ranges (or removed, for the whole file), and a HEAD routed as GET is a HEAD again, so the file
    is not read."""

    def __init__(self, *args: object, ranges: list[ByteRange] | None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._ranges = ranges

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(name, value) for name, value in scope["headers"] if name not in (b"range", b"if-range")]
        if self._ranges:
            spec = ",".join(f"{first}-{last}" for first, last in self._ranges)
            headers.append((b"range", f"bytes={spec}".encode("latin-1")))
        method = "HEAD" if is_head(scope) else scope["method"]
        await super().__call__({**scope, "headers": headers, "method": method}, receive, send)


def _decide(request: Request, etag: str, modified: float, size: int) -> tuple[dict[str, str], Response | None,
                                                                           list[ByteRange] | None]:
    """The validators' headers, and either an answer already (304, 416) or the ranges to send (None: the whole)."""
    last_modified = email.utils.formatdate(modified, usegmt=True)
    headers = {"ETag": etag, "Last-Modified": last_modified, "Cache-Control": "no-cache", "Accept-Ranges": "bytes"}
    # §13.2.2: If-None-Match is evaluated first; Range only applies to a GET whose If-Range (if any) holds.
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None and _none_match(if_none_match, etag):
        return headers, Response(status_code=304, headers={"ETag": etag, "Cache-Control": "no-cache"}), None
    range_header, if_range = request.headers.get("range"), request.headers.get("if-range")
    if range_header is not None and (if_range is None or _if_range_holds(if_range, etag, last_modified, modified)):
        try:
            return headers, None, byte_ranges(range_header, size)
        except RangeNotSatisfiable:
            return headers, JSONResponse({"error": RANGE_NOT_SATISFIABLE}, status_code=416,
                                         headers={**headers, "Content-Range": f"bytes */{size}"}), None
    return headers, None, None


def file_response(request: Request, path: Path, media_type: str, *, filename: str | None = None,
                  disposition: str = "inline") -> Response | None:
    """The file (200 or 206), 304, or 416 with API.md's error body; None when there is no such file."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    headers, answer, ranges = _decide(request, etag_of(stat), stat.st_mtime, stat.st_size)
    if answer is not None:
        return answer
    return _DecidedFileResponse(path, media_type=media_type, filename=filename, stat_result=stat, headers=headers,
                                content_disposition_type=disposition, ranges=ranges)


ReadRange = Callable[[int, int], AsyncIterator[bytes]]  # first, last (included) -> the bytes, in pieces


def object_response(request: Request, info: ObjectInfo, read: ReadRange, media_type: str, *, filename: str,
                    disposition: str = "inline") -> Response:
    """An object that is not a local file (object storage), streamed through with the same rules as a file: the
    whole (200), one range (206 with Content-Range), several (206, multipart/byteranges, §14.6), 304 or 416.
    HEAD reads nothing from the store."""
    headers, answer, ranges = _decide(request, info.etag, info.modified, info.size)
    if answer is not None:
        return answer
    headers["Content-Disposition"] = f'{disposition}; filename="{filename}"'
    head = is_head(request.scope)
    if not ranges:
        body = _empty() if head or info.size == 0 else read(0, info.size - 1)
        return StreamingResponse(body, media_type=media_type, headers={**headers, "Content-Length": str(info.size)})
    if len(ranges) == 1:
        first, last = ranges[0]
        headers.update({"Content-Range": f"bytes {first}-{last}/{info.size}", "Content-Length": str(last - first + 1)})
        return StreamingResponse(_empty() if head else read(first, last), status_code=206, media_type=media_type,
                                 headers=headers)
    boundary = secrets.token_hex(13)
    parts = [(f"--{boundary}\r\nContent-Type: {media_type}\r\nContent-Range: bytes {first}-{last}/{info.size}"
              "\r\n\r\n").encode("latin-1") for first, last in ranges]
    closing = f"\r\n--{boundary}--\r\n".encode("latin-1")
    length = sum(len(p) for p in parts) + sum(last - first + 1 for first, last in ranges) + \
        2 * (len(ranges) - 1) + len(closing)

    async def multipart() -> AsyncIterator[bytes]:
        for n, ((first, last), part) in enumerate(zip(ranges, parts)):
            yield (b"\r\n" if n else b"") + part
            async for chunk in read(first, last):
                yield chunk
        yield closing

    headers["Content-Length"] = str(length)
    return StreamingResponse(_empty() if head else multipart(), status_code=206,
                             media_type=f"multipart/byteranges; boundary={boundary}", headers=headers)


async def _empty() -> AsyncIterator[bytes]:
    yield b""
