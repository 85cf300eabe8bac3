"""HTTP semantics of the file routes against the real `bentoml serve` (issue 12): HEAD on every GET route
(RFC 9110 §9.3.2), Range requests (§14) with If-Range (§13.1.5), and If-None-Match (§13.1.2)."""

from __future__ import annotations

import email.utils
import socket
import time
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.server import Server, wait_job

EXAMPLE = "ex_mars-habitat"
# Headers that differ between any two answers, whatever the method.
VOLATILE = {"date", "server", "x-bentoml-request-id", "traceparent", "content-type-boundary"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {"GROK3D_STAGES": "tests.stages:sleepy", "XAI_API_KEY": "test-key",
           "GROK3D_CORS_ORIGINS": "http://allowed.example"}
    with Server(tmp_path_factory.mktemp("http"), env) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


@pytest.fixture(scope="module")
def job_id(client: httpx.Client) -> str:
    job = client.post("/api/generate", json={"prompt": "a red teapot"}).json()["job_id"]
    assert wait_job(client, job)["status"] == "complete"
    return job


@pytest.fixture(scope="module")
def glb(client: httpx.Client, job_id: str) -> tuple[str, bytes, httpx.Headers]:
    """A job's GLB: its URL, its bytes and the headers of a plain GET."""
    url = f"/api/asset/{job_id}?asset_type=glb"
    full = client.get(url)
    assert full.status_code == 200 and len(full.content) > 40
    return url, full.content, full.headers


def raw_head(server: Server, path: str, headers: str = "") -> tuple[str, bytes]:
    """A HEAD written on a socket, read to the end: the status line and headers, and every byte after them."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"HEAD {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{headers}\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head.decode("latin-1"), rest


def stable(headers: httpx.Headers) -> dict[str, str]:
    return {name: value for name, value in headers.items() if name not in VOLATILE}


# -- HEAD ------------------------------------------------------------------------------------------------------

def get_routes(job_id: str) -> list[str]:
    return [
        "/", "/static/app.js", "/static/style.css", "/bentoml", "/api/docs", "/api/openapi.json", "/api/examples",
        f"/api/status/{job_id}", f"/api/status/{EXAMPLE}", "/api/status/ffffffff",
        f"/api/asset/{job_id}?asset_type=image", f"/api/asset/{job_id}?asset_type=glb",
        f"/api/asset/{job_id}?asset_type=usdz", f"/api/asset/{EXAMPLE}?asset_type=usdz",
        f"/api/asset/{job_id}", "/api/asset/ffffffff?asset_type=glb", "/api/nope", "/api/generate",
    ]


def test_every_get_route_answers_head_with_the_same_status_and_headers(client: httpx.Client, job_id: str) -> None:
    for path in get_routes(job_id):
        get, head = client.get(path), client.head(path)
        assert head.status_code == get.status_code, path
        assert stable(head.headers) == stable(get.headers), path
        assert head.content == b""


@pytest.mark.parametrize("asset_type", ["glb", "usdz"])
def test_head_sends_no_body_on_the_wire(server: Server, client: httpx.Client, job_id: str, asset_type: str) -> None:
    path = f"/api/asset/{job_id}?asset_type={asset_type}"
    size = len(client.get(path).content)
    head, rest = raw_head(server, path)
    assert head.startswith("HTTP/1.1 200 ")
    assert f"content-length: {size}" in head.lower()  # the GET's length (§9.3.2), with no content after it
    assert rest == b""
    head, rest = raw_head(server, path, "Range: bytes=0-9\r\n")
    assert head.startswith("HTTP/1.1 206 ") and "content-range: bytes 0-9/" in head.lower() and rest == b""
    head, rest = raw_head(server, "/api/asset/ffffffff?asset_type=glb")
    assert head.startswith("HTTP/1.1 404 ") and rest == b""


def test_head_with_conditions_and_cors(client: httpx.Client, glb: tuple[str, bytes, httpx.Headers]) -> None:
    url, _, headers = glb
    assert client.head(url, headers={"If-None-Match": headers["etag"]}).status_code == 304
    r = client.head(url, headers={"Origin": "http://allowed.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://allowed.example"
    r = client.options(url, headers={"Origin": "http://allowed.example", "Access-Control-Request-Method": "HEAD"})
    assert r.status_code == 200


# -- Range -----------------------------------------------------------------------------------------------------
# (Range header, expected status, expected ranges as Python slices of the file, or None for the whole file).
# L stands for the file's length.
RANGE_CASES = [
    ("bytes=0-0", 206, [(0, 1)]),  # the first byte
    ("bytes=0-9", 206, [(0, 10)]),
    ("bytes=5-", 206, [(5, None)]),  # from 5 to the end
    ("bytes=-5", 206, [(-5, None)]),  # the last five bytes
    ("BYTES=0-3", 206, [(0, 4)]),  # range units are case-insensitive (§14.1)
    ("bytes=0-{L+100}", 206, [(0, None)]),  # a last position past the end means the end (§14.1.2)
    ("bytes=-{L+100}", 206, [(0, None)]),  # a suffix longer than the file is the whole file, as a range
    ("bytes=2-3,", 206, [(2, 4)]),  # empty list elements are ignored (§5.6.1.2)
    ("bytes=0-1,4-5", 206, [(0, 2), (4, 6)]),  # several ranges: multipart/byteranges
    ("bytes=4-5,0-1", 206, [(0, 2), (4, 6)]),  # in the file's order
    ("bytes=0-1 ,, 4-5", 206, [(0, 2), (4, 6)]),
    ("bytes=0-3,2-5", 206, [(0, 6)]),  # overlapping ranges coalesced (§14.6)
    ("bytes=0-1,2-3", 206, [(0, 4)]),  # adjacent ranges too
    ("bytes=0-1,{L}-", 206, [(0, 2)]),  # only the satisfiable range is sent
    ("bytes=-0", 416, None),  # a suffix of zero bytes is unsatisfiable
    ("bytes={L}-", 416, None),  # past the end
    ("bytes={L}-{L+10}", 416, None),
    ("bytes=5-2", 416, None),  # last < first: invalid (§14.1.1)
    ("bytes=abc", 416, None),
    ("bytes=1-2-3", 416, None),
    ("bytes=", 416, None),
    ("bytes=0-1,5-2", 416, None),
    ("chars=0-1", 200, None),  # a unit we do not understand is ignored (§14.2)
    ("items=0-1", 200, None),
    ("bytes", 200, None),
    (",".join(f"{2 * i}-{2 * i}" for i in range(17)).join(["bytes=", ""]), 200, None),  # too many: ignored
]


def _resolve(header: str, length: int) -> str:
    return header.replace("{L+100}", str(length + 100)).replace("{L+10}", str(length + 10)).replace(
        "{L}", str(length))


def _parts(response: httpx.Response) -> list[tuple[str, bytes]]:
    """(Content-Range, content) of each part of a multipart/byteranges body (RFC 9110 §14.6)."""
    media_type, _, boundary = response.headers["content-type"].partition("; boundary=")
    assert media_type == "multipart/byteranges"
    body = response.content
    assert int(response.headers["content-length"]) == len(body)
    chunks = body.split(b"--" + boundary.encode())
    assert chunks[0] in (b"", b"\r\n") and chunks[-1].startswith(b"--")
    parts = []
    for chunk in chunks[1:-1]:
        head, _, content = chunk.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        assert fields["Content-Type"] == "model/gltf-binary"
        parts.append((fields["Content-Range"], content.removesuffix(b"\r\n")))
    return parts


@pytest.mark.parametrize("header, status, expected", RANGE_CASES, ids=[c[0][:24] for c in RANGE_CASES])
def test_range_table(client: httpx.Client, glb: tuple[str, bytes, httpx.Headers], header: str, status: int,
                     expected: list[tuple[int, int | None]] | None) -> None:
    url, full, _ = glb
    length = len(full)
    r = client.get(url, headers={"Range": _resolve(header, length)})
    assert r.status_code == status, r.text[:200]
    if status == 200:
        assert r.content == full and "content-range" not in r.headers
        return
    if status == 416:
        assert r.headers["content-range"] == f"bytes */{length}"
        assert r.json() == {"error": "Range not satisfiable"}
        return
    slices = [slice(first, last) for first, last in expected]
    spans = [range(length)[s] for s in slices]
    wanted = [(f"bytes {span[0]}-{span[-1]}/{length}", full[s]) for span, s in zip(spans, slices)]
    if len(wanted) == 1:
        assert (r.headers["content-range"], r.content) == wanted[0]
        assert r.headers["content-type"] == "model/gltf-binary"
        assert int(r.headers["content-length"]) == len(r.content)
    else:
        assert _parts(r) == wanted


def test_if_range(client: httpx.Client, glb: tuple[str, bytes, httpx.Headers]) -> None:
    """§13.1.5: the range is sent only while the client's validator is current; otherwise the whole file."""
    url, full, headers = glb
    etag, last_modified = headers["etag"], headers["last-modified"]
    current = client.get(url, headers={"Range": "bytes=0-3", "If-Range": etag})
    assert current.status_code == 206 and current.content == full[:4]
    for stale in ('"0123456789abcdef01234567"', "W/" + etag,  # another version; a weak tag never matches
                  email.utils.formatdate(0, usegmt=True)):  # a date that is not the file's
        r = client.get(url, headers={"Range": "bytes=0-3", "If-Range": stale})
        assert r.status_code == 200 and r.content == full, stale
    # The file's own Last-Modified, a strong validator once the file is a second old (§8.8.2.2).
    time.sleep(1.1)
    r = client.get(url, headers={"Range": "bytes=0-3", "If-Range": last_modified})
    assert r.status_code == 206 and r.content == full[:4]
    # Without Range, If-Range does nothing.
    assert client.get(url, headers={"If-Range": '"stale"'}).content == full


def test_if_none_match_comes_before_range(client: httpx.Client, glb: tuple[str, bytes, httpx.Headers]) -> None:
    url, full, headers = glb
    etag = headers["etag"]
    for value in (etag, f'"other", {etag}', "W/" + etag, "*"):  # weak comparison; `*` is any version (§13.1.2)
        r = client.get(url, headers={"If-None-Match": value, "Range": "bytes=0-3"})
        assert r.status_code == 304 and r.content == b"" and r.headers["etag"] == etag, value
    assert client.get(url, headers={"If-None-Match": '"other"'}).content == full


def test_range_on_the_examples_and_the_page(client: httpx.Client) -> None:
    example = client.get(f"/api/asset/{EXAMPLE}?asset_type=image")
    part = client.get(f"/api/asset/{EXAMPLE}?asset_type=image", headers={"Range": "bytes=-2"})
    assert part.status_code == 206 and part.content == example.content[-2:] == b"\xff\xd9"
    page = client.get("/", headers={"Range": "bytes=0-14"})
    assert page.status_code == 206 and page.content.lower() == b"<!doctype html>"
    assert client.get("/", headers={"Range": "bytes=5-2"}).status_code == 416
