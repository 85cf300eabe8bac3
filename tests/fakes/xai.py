"""A fake xAI image API: real HTTP on 127.0.0.1, for tests and `make dev`.

It checks requests the way `POST https://api.x.ai/v1/images/generations` does (bearer key, JSON content type,
known model, a prompt) and answers with a JPEG of one object on a light background, drawn with Pillow and
deterministic per prompt, either inline (`b64_json`, as a data URI like xAI) or as a URL it serves itself.
`b64_style` chooses how the inline picture is written: "data_uri" (the default), "plain" base64, or "wrapped", as
answers from the field arrive: a data URI whose base64 runs over MIME lines of 76 characters and lacks its padding.

It can be told to misbehave — 401, a 400 moderation refusal, 429 with `Retry-After`, 500, slow answers, or an
answer that is not an image — for the next N requests or always, through `FakeXai.fail(...)` or
`POST /_fake/faults`. Every request is recorded (`FakeXai.requests`, `GET /_fake/requests`).

    python -m tests.fakes.xai --port 8100 --api-key test-key
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import random
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import uvicorn
from PIL import Image, ImageDraw, ImageFilter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

KNOWN_MODELS = ("grok-imagine-image", "grok-imagine-image-pro", "grok-imagine-image-quality", "grok-2-image")
DEFAULT_API_KEY = "test-key"
FaultKind = Literal["unauthorized", "moderation", "rate_limit", "server_error", "slow", "not_image"]
FAULT_KINDS: tuple[str, ...] = FaultKind.__args__  # type: ignore[attr-defined]
MODERATION_MESSAGE = "Generated image rejected by content moderation."
B64Style = Literal["data_uri", "plain", "wrapped"]
B64_STYLES: tuple[str, ...] = B64Style.__args__  # type: ignore[attr-defined]


@dataclass
class Fault:
    """One programmed misbehaviour. `times=None` means every request from now on."""

    kind: FaultKind
    times: int | None = None
    retry_after: str | None = "1"  # the 429's Retry-After header (None: no header)
    delay_s: float = 1.0  # how long "slow" waits before answering normally
    message: str = MODERATION_MESSAGE  # the moderation refusal's text


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # parsed JSON when it parsed, else the raw text
    started: float  # time.monotonic() when the request arrived
    finished: float = 0.0
    status: int = 0


@dataclass
class _State:
    api_key: str
    image_size: int = 1024
    image_format: Literal["jpeg", "png"] = "jpeg"
    b64_style: B64Style = "data_uri"  # xAI sends data URIs; plain and wrapped base64 are accepted too
    faults: list[Fault] = field(default_factory=list)
    requests: list[RecordedRequest] = field(default_factory=list)
    files: dict[str, tuple[bytes, str]] = field(default_factory=dict)
    in_flight: int = 0
    max_in_flight: int = 0


def _xai_error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    # xAI's error bodies look like {"code": "<grpc-ish category>", "error": "<sentence>"}.
    return JSONResponse({"code": code, "error": message}, status_code=status, headers=headers)


def draw_object(prompt: str, size: int = 1024) -> Image.Image:
    """One object on a light background with a soft shadow; the same prompt always gives the same picture."""
    rng = random.Random(hashlib.sha256(prompt.encode()).digest())
    background = tuple(rng.randint(228, 245) for _ in range(3))
    image = Image.new("RGB", (size, size), background)
    s = size / 1024
    # A soft contact shadow under the object, as studio renders have.
    shadow = Image.new("L", (size, size), 0)
    ImageDraw.Draw(shadow).ellipse([300 * s, 760 * s, 724 * s, 840 * s], fill=110)
    shadow = shadow.filter(ImageFilter.GaussianBlur(24 * s))
    image.paste((90, 90, 90), mask=shadow)
    colour = tuple(rng.randint(20, 200) for _ in range(3))
    draw = ImageDraw.Draw(image)
    box = [280 * s, 260 * s, 744 * s, 790 * s]
    shape = rng.choice(["ellipse", "rectangle", "polygon"])
    if shape == "ellipse":
        draw.ellipse(box, fill=colour)
    elif shape == "rectangle":
        draw.rounded_rectangle(box, radius=int(60 * s), fill=colour)
    else:
        draw.polygon([(512 * s, 250 * s), (760 * s, 790 * s), (264 * s, 790 * s)], fill=colour)
    # A highlight so the object is not flat.
    light = tuple(min(255, c + 60) for c in colour)
    draw.ellipse([420 * s, 380 * s, 520 * s, 480 * s], fill=light)
    return image


def _b64(data: bytes, mime: str, style: str) -> str:
    encoded = base64.b64encode(data).decode()
    if style == "plain":
        return encoded
    if style == "wrapped":  # MIME lines of 76 characters (RFC 2045 §6.8), CRLF between them, padding dropped
        encoded = encoded.rstrip("=")
        encoded = "\r\n".join(encoded[i : i + 76] for i in range(0, len(encoded), 76))
    return f"data:{mime};base64,{encoded}"


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt.upper(), **({"quality": 90} if fmt == "jpeg" else {}))
    return buffer.getvalue()


class FakeXai:
    """The fake server. Use as a context manager, or `start()` / `stop()`."""

    def __init__(self, api_key: str = DEFAULT_API_KEY, host: str = "127.0.0.1", port: int = 0) -> None:
        self._state = _State(api_key=api_key)
        self._lock = threading.Lock()
        self._host, self._port = host, port
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.app = Starlette(
            routes=[
                Route("/v1/images/generations", self._generate, methods=["POST"]),
                Route("/files/{name}", self._file, methods=["GET"]),
                Route("/_fake/faults", self._admin_faults, methods=["POST", "DELETE"]),
                Route("/_fake/requests", self._admin_requests, methods=["GET"]),
                Route("/_fake/settings", self._admin_settings, methods=["POST"]),
            ]
        )

    # ---- control from Python -------------------------------------------------------------------
    @property
    def api_key(self) -> str:
        return self._state.api_key

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self._port}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        """Requests to the image API (downloads and admin calls excluded), oldest first."""
        with self._lock:
            return [r for r in self._state.requests if r.path.endswith("/images/generations")]

    @property
    def downloads(self) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self._state.requests if r.path.startswith("/files/")]

    @property
    def max_in_flight(self) -> int:
        """The most image requests the server was handling at the same moment."""
        return self._state.max_in_flight

    def fail(self, kind: FaultKind, times: int | None = None, **options: Any) -> None:
        """Misbehave for the next `times` image requests (None: always). Faults apply in the order given."""
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; one of {FAULT_KINDS}")
        with self._lock:
            self._state.faults.append(Fault(kind=kind, times=times, **options))

    def configure(self, **settings: Any) -> None:
        """Change `image_size`, `image_format` ("jpeg"/"png") or `b64_style` ("data_uri"/"plain"/"wrapped")."""
        with self._lock:
            for name, value in settings.items():
                if name not in {"image_size", "image_format", "b64_style"}:
                    raise ValueError(f"unknown setting {name!r}")
                if name == "b64_style" and value not in B64_STYLES:
                    raise ValueError(f"unknown b64_style {value!r}; one of {B64_STYLES}")
                setattr(self._state, name, value)

    def reset(self) -> None:
        with self._lock:
            self._state.faults.clear()
            self._state.requests.clear()
            self._state.max_in_flight = 0

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> FakeXai:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self._host, self._port))
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the fake xAI server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> FakeXai:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the image API -------------------------------------------------------------------------
    def _next_fault(self) -> Fault | None:
        with self._lock:
            for fault in self._state.faults:
                if fault.times is None:
                    return fault
                if fault.times > 0:
                    fault.times -= 1
                    return fault
        return None

    async def _generate(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        record = RecordedRequest(
            method=request.method,
            path=request.url.path,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            started=time.monotonic(),
        )
        with self._lock:
            self._state.requests.append(record)
            self._state.in_flight += 1
            self._state.max_in_flight = max(self._state.max_in_flight, self._state.in_flight)
        try:
            response = await self._answer(request, record)
        finally:
            with self._lock:
                self._state.in_flight -= 1
        record.finished, record.status = time.monotonic(), response.status_code
        return response

    async def _answer(self, request: Request, record: RecordedRequest) -> Response:
        rejected = self._check(record)
        if rejected is not None:
            return rejected
        fault = self._next_fault()
        if fault is not None:
            if fault.kind == "slow":
                await asyncio.sleep(fault.delay_s)
            else:
                return self._misbehave(fault, request, record.body)
        return self._image_answer(request, record.body)

    def _check(self, record: RecordedRequest) -> Response | None:
        """The validation the real API does, in its order: key, content type, body, model."""
        auth = record.headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return _xai_error(401, "Unauthenticated", "No API key provided. Send 'Authorization: Bearer <key>'.")
        key = auth.removeprefix("Bearer ")
        if key != self._state.api_key:
            # xAI answers a wrong key with 400, not 401.
            shown = key[:2] + "***" + key[-2:] if len(key) > 4 else "***"
            return _xai_error(
                400,
                "Client specified an invalid argument",
                f"Incorrect API key provided: {shown}. You can obtain an API key from https://console.x.ai.",
            )
        if record.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _xai_error(415, "Unsupported media type", "Expected request with `Content-Type: application/json`")
        body = record.body
        if not isinstance(body, dict) or not isinstance(body.get("prompt"), str):
            return _xai_error(422, "Unprocessable entity", "Failed to deserialize the JSON body: missing field `prompt`")
        if not body["prompt"].strip():
            return _xai_error(400, "Client specified an invalid argument", "The prompt must not be empty.")
        model = body.get("model", KNOWN_MODELS[0])
        if model not in KNOWN_MODELS:
            return _xai_error(
                404,
                "Some requested entity was not found",
                f"The model {model} does not exist or your team does not have access to it.",
            )
        if body.get("response_format", "url") not in ("url", "b64_json"):
            return _xai_error(422, "Unprocessable entity", "response_format must be one of `url`, `b64_json`")
        n = body.get("n", 1)
        if not isinstance(n, int) or not 1 <= n <= 10:
            return _xai_error(400, "Client specified an invalid argument", "n must be between 1 and 10")
        return None

    def _misbehave(self, fault: Fault, request: Request, body: Any) -> Response:
        if fault.kind == "unauthorized":
            return _xai_error(401, "Unauthenticated", "The API key is not valid or has been revoked.")
        if fault.kind == "moderation":
            return _xai_error(400, "Client specified an invalid argument", fault.message)
        if fault.kind == "rate_limit":
            headers = {"retry-after": fault.retry_after} if fault.retry_after is not None else None
            return _xai_error(429, "Too many requests", "Rate limit exceeded for grok-imagine-image.", headers)
        if fault.kind == "server_error":
            return _xai_error(500, "Internal error", "Service temporarily unavailable.")
        # not_image: a well-formed answer whose payload is not a picture.
        return self._image_answer(request, body, payload=(b"<html>not an image</html>", "text/html"))

    def _image_answer(self, request: Request, body: Any, payload: tuple[bytes, str] | None = None) -> Response:
        prompt = body["prompt"]
        if payload is None:
            fmt = self._state.image_format
            payload = (_encode(draw_object(prompt, self._state.image_size), fmt), f"image/{fmt}")
        data, mime = payload
        items = []
        for _ in range(body.get("n", 1)):
            if body.get("response_format", "url") == "b64_json":
                encoded = _b64(data, mime, self._state.b64_style)
                items.append({"b64_json": encoded, "revised_prompt": prompt, "mime_type": mime})
            else:
                name = f"xai-tmp-imgen-{uuid.uuid4()}.{mime.split('/')[1]}"
                with self._lock:
                    self._state.files[name] = (data, mime)
                url = str(request.base_url).rstrip("/") + f"/files/{name}"
                items.append({"url": url, "revised_prompt": prompt, "mime_type": mime})
        return JSONResponse({"data": items})

    async def _file(self, request: Request) -> Response:
        name = request.path_params["name"]
        record = RecordedRequest("GET", request.url.path, dict(request.headers), None, time.monotonic())
        with self._lock:
            self._state.requests.append(record)
            found = self._state.files.get(name)
        if found is None:
            return Response("Not Found", status_code=404)
        return Response(found[0], media_type=found[1])

    # ---- admin endpoints (for `make dev` and other processes) ---------------------------------
    async def _admin_faults(self, request: Request) -> Response:
        if request.method == "DELETE":
            self.reset()
            return JSONResponse({"ok": True})
        spec = await request.json()
        try:
            self.fail(**spec)
        except (TypeError, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"ok": True})

    async def _admin_requests(self, request: Request) -> Response:
        return JSONResponse({"requests": [asdict(r) for r in self.requests], "max_in_flight": self.max_in_flight})

    async def _admin_settings(self, request: Request) -> Response:
        try:
            self.configure(**(await request.json()))
        except (TypeError, ValueError) as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"ok": True})


try:  # a pytest fixture, when pytest is around (the module also runs as a plain script)
    import pytest

    @pytest.fixture
    def fake_xai() -> Iterator[FakeXai]:
        """A running fake xAI server; `fake_xai.base_url` and `fake_xai.api_key` configure a client."""
        with FakeXai() as server:
            yield server

except ImportError:  # pragma: no cover - pytest is a dev dependency
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the fake xAI image API.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--api-key", default=DEFAULT_API_KEY)
    args = parser.parse_args()
    server = FakeXai(api_key=args.api_key, host=args.host, port=args.port)
    print(f"fake xAI at http://{args.host}:{args.port}/v1 (key {args.api_key!r})", flush=True)
    uvicorn.run(server.app, host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
