"""The FastAPI app: the routes of API.md, its error bodies and status codes, CORS.

Every error under /api is `{"error": "..."}`; FastAPI's 422 and `{"detail": ...}` never reach a client.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import gc
import hashlib
import inspect
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from sqlalchemy import Connection
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.routing import Match, Route

from pipeline import schemas, webhooks
from pipeline.auth import ANYONE, RATE_HEADERS, SCOPE_KEY, Caller, Gate, Refused
from pipeline.events import event_stream, fixed_events, job_events, last_event_id
from pipeline.examples import SHIPPED_DIR, ExampleCatalog
from pipeline.formats import AssetTarget, FileTarget, FormatError, FormatMaker, Target
from pipeline.head import is_head, serve_head
from pipeline.jobs import (IdempotencyKey, IdempotencyMismatch, Job, JobOptions, JobStore, QueueFull, Source,
                           Stage, Status, Submission)
from pipeline.lifecycle import Lifecycle, caller_scope, scope_key
from pipeline.meshes import mesh_report
from pipeline.orchestrator import Orchestrator
from pipeline.quotas import LimitExceeded, Quotas
from pipeline.responses import file_response, object_response
from pipeline.settings import Settings, get_settings
from pipeline.stages import ModelState, Stages
from pipeline.uploads import IMAGE_TOO_LARGE, MAX_UPLOAD_BYTES, Upload, UploadError, decode_base64, read_upload
from pipeline.web import mount_web
from pipeline.storage import (BY_FILE_NAME, DISPOSITION, DOWNLOAD_SUFFIX, FILE_NAMES, MEDIA_TYPES, ON_DEMAND,
                              SERVED_ASSETS, Asset, AssetStore, is_example_id, is_job_id, open_asset_store)

log = logging.getLogger("grok3d.api")

NOT_CONFIGURED = "Image generation is not configured: set XAI_API_KEY"
MODEL_NOT_LOADED = "The 3D model is not loaded: import a TripoSR checkpoint (make import-model)"
IDEMPOTENCY_KEY_INVALID = "Idempotency-Key must be 1 to 255 printable ASCII characters"
IDEMPOTENCY_MISMATCH = ("This Idempotency-Key was already used with another request body: send the same body again, "
                        "or use a new key for a new request")
ALREADY_FINISHED = "The job has already finished"
EXAMPLES_READ_ONLY = "Examples cannot be deleted"
LIMIT_INVALID = "limit must be a whole number from 1 to 100"
STATUS_INVALID = "status must be one of queued, processing, complete, error"
CURSOR_INVALID = "Invalid cursor"
DEFAULT_LIMIT, MAX_LIMIT = 20, 100
_CREATED_AT = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}")


class ApiError(Exception):
    def __init__(self, status_code: int, message: str, headers: dict[str, str] | None = None) -> None:
        self.status_code = status_code
        self.message = message
        self.headers = headers


@dataclass
class Runtime:
    """What the routes need, built in the app's lifespan."""

    settings: Settings
    store: JobStore
    assets: AssetStore
    catalog: ExampleCatalog
    stages: Stages
    orchestrator: Orchestrator
    lifecycle: Lifecycle
    webhooks: webhooks.WebhookSender
    formats: FormatMaker
    gate: Gate
    example_meshes: dict = field(default_factory=dict)  # (example id, GLB mtime) -> its mesh report


StagesFactory = Callable[[Settings], Stages]


def create_app(stages_factory: StagesFactory, settings: Settings | None = None, *,
               swagger_assets_url: str | None = None) -> FastAPI:
    """The app; `stages_factory` builds the stage backends once the process runs (in the lifespan).

    `swagger_assets_url`: where the host serves Swagger UI's files (BentoML does, at /static_content), so the docs
    at /api/docs work offline; without it FastAPI's docs page loads them from a CDN.
    """
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await _start_runtime(settings, stages_factory(settings))
        app.state.runtime = runtime
        try:
            yield
        finally:
            await _stop_runtime(runtime)

    # FastAPI's own OpenTelemetry stays off: the host (BentoML) traces requests already, and twice costs twice.
    app = FastAPI(title="grok3d", version="0.1.0", lifespan=lifespan,
                  telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
                  docs_url=None if swagger_assets_url else "/api/docs", redoc_url=None,
                  openapi_url="/api/openapi.json")
    if swagger_assets_url:
        _install_local_docs(app, swagger_assets_url)
    app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list,
                       allow_methods=["GET", "HEAD", "POST", "DELETE"],
                       allow_headers=["*"], expose_headers=["ETag", "Content-Disposition", "Retry-After",
                                                            "Content-Range", "Accept-Ranges", "Idempotent-Replayed",
                                                            "WWW-Authenticate", *RATE_HEADERS])
    serve_head(app)  # every GET route answers HEAD; its middleware is the outermost
    _install_error_handlers(app)
    _install_routes(app)
    _document_no_422(app)
    mount_web(app)
    return app


def _document_no_422(app: FastAPI) -> None:
    """Invalid requests are 400 here (API.md): drop the 422 FastAPI documents for every route with parameters (the
    one 422 of ours, an Idempotency-Key reused with another body, stays)."""
    build = app.openapi

    def openapi() -> dict:
        schema = build()
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                responses = operation.get("responses", {})
                if "HTTPValidationError" in json.dumps(responses.get("422", {})):
                    responses.pop("422")
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _install_local_docs(app: FastAPI, assets_url: str) -> None:
    @app.get("/api/docs", include_in_schema=False)
    async def docs() -> Response:
        return get_swagger_ui_html(openapi_url=app.openapi_url, title="grok3d API",
                                   swagger_js_url=f"{assets_url}/swagger-ui-bundle.js",
                                   swagger_css_url=f"{assets_url}/swagger-ui.css",
                                   swagger_favicon_url=f"{assets_url}/favicon-light-32x32.png")


async def _start_runtime(settings: Settings, stages: Stages) -> Runtime:
    store = await asyncio.to_thread(JobStore, settings.store_url, lease_s=settings.lease_s,
                                    retention_s=settings.retention_s)
    assets = open_asset_store(settings)
    catalog = ExampleCatalog(SHIPPED_DIR, settings.promoted_examples_dir)
    for backend in (stages.image, stages.prepare, stages.reconstruct, stages.convert):
        if hasattr(backend, "start"):
            await backend.start()
    sender = webhooks.WebhookSender(store, secret=settings.webhook_secret,
                                    allow_private=settings.webhook_allow_private,
                                    timeout_s=settings.webhook_timeout_s, backoff_s=settings.webhook_backoff_s)
    lifecycle: Lifecycle | None = None

    def job_ended(job_id: str) -> None:
        sender.wake()
        if lifecycle is not None:
            lifecycle.job_ended(job_id)

    formats = FormatMaker(stages.convert)
    orchestrator = Orchestrator(store, assets, stages, image_concurrency=settings.image_concurrency,
                                reconstruct_concurrency=settings.reconstruct_concurrency,
                                max_running=settings.queue_max, on_end=job_ended, formats=formats)
    lifecycle = Lifecycle(store, assets, orchestrator, sweep_interval_s=settings.sweep_interval_s)
    await orchestrator.start()
    await sender.start()
    await lifecycle.start()
    gate = Gate(settings.auth, store, Quotas(settings.daily_job_limit, settings.retry_after_s))
    log.info("grok3d started: job store %s, assets in %s, %d jobs to resume",
             store.engine.url.render_as_string(hide_password=True), assets.location,
             await asyncio.to_thread(store.count_active))
    await _log_auth_mode(settings, gate)
    # Everything loaded so far (BentoML, numpy, scikit-image, ...) lives as long as the process: keep the cyclic
    # garbage collector from walking it again and again, which stalled every request for ~200 ms once a second.
    gc.collect()
    gc.freeze()
    return Runtime(settings, store, assets, catalog, stages, orchestrator, lifecycle, sender, formats, gate)


async def _log_auth_mode(settings: Settings, gate: Gate) -> None:
    if settings.auth == "open":
        log.warning("GROK3D_AUTH=open: anyone who can reach port %d can start jobs and spend the xAI budget "
                    "(up to GROK3D_DAILY_JOB_LIMIT=%s jobs a day); set GROK3D_AUTH=keys to require API keys",
                    settings.port, settings.daily_job_limit or "unlimited")
        return
    active = sum(key.active for key in await asyncio.to_thread(gate.keys.list))
    log.info("GROK3D_AUTH=keys: the job routes need an API key; %d active keys", active)
    if not active:
        log.warning("GROK3D_AUTH=keys and no API key exists yet: create one with `grok3d keys create --name NAME`")


async def _stop_runtime(runtime: Runtime) -> None:
    await runtime.lifecycle.stop()
    await runtime.orchestrator.stop()
    await runtime.webhooks.stop()
    stages = runtime.stages
    for backend in (stages.image, stages.prepare, stages.reconstruct, stages.convert):
        close = getattr(backend, "aclose", None) or getattr(backend, "close", None)
        if close is not None and inspect.iscoroutinefunction(close):
            await close()
    runtime.store.close()


def _error(status_code: int, message: str, headers: dict[str, str] | None = None,
           request: Request | None = None) -> JSONResponse:
    """API.md's error body; a keyed request's RateLimit fields go with it (pipeline/auth.py)."""
    keyed = request.scope.get(SCOPE_KEY) if request is not None else None
    if keyed:
        headers = {**keyed, **(headers or {})}
    return JSONResponse({"error": message}, status_code=status_code, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status_code, exc.message, exc.headers, request)

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused) -> JSONResponse:
        return _error(exc.status_code, exc.message, exc.headers, request)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "Invalid request", request=request)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        messages = {404: "Not found", 405: "Method not allowed"}
        message = exc.detail if isinstance(exc.detail, str) and exc.status_code not in messages else \
            messages.get(exc.status_code, "Request failed")
        return _error(exc.status_code, message, getattr(exc, "headers", None), request)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, "Internal server error", request=request)


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


# The largest bodies read: a JSON body's picture is base64 (4 characters per 3 bytes); a form's is a file part.
# Either has room for the other fields (MAX_BODY_BYTES). A JSON body without a picture stays within MAX_BODY_BYTES.
MAX_JSON_BODY_BYTES = schemas.MAX_BODY_BYTES + (MAX_UPLOAD_BYTES + 2) // 3 * 4
MAX_FORM_BODY_BYTES = schemas.MAX_BODY_BYTES + MAX_UPLOAD_BYTES
FORM_FIELDS = ("prompt", "image", "resolution", "face_limit", "size_m")


async def _bounded_stream(request: Request, limit: int, message: str) -> AsyncIterator[bytes]:
    """The body's chunks, refused with 413 past `limit` whether or not the client declared its length."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, message)
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, message)
        yield chunk


async def _read_body(request: Request, limit: int) -> bytes:
    return b"".join([chunk async for chunk in _bounded_stream(request, limit, "Request body too large")])


def _is_form(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip().lower() == "multipart/form-data"


async def _read_generate(request: Request) -> tuple[schemas.GenerateRequest, bytes | None]:
    """The request of API.md §1 and its picture's bytes (None: a prompt job), from a JSON body or a form."""
    if _is_form(request):
        return await _read_form(request)
    body = await _read_body(request, MAX_JSON_BODY_BYTES)
    try:
        parsed = schemas.GenerateRequest.model_validate_json(body)
    except ValidationError as exc:
        # Past 64 KiB only a body with a picture is read: anything else is refused for its size, as before.
        raise (ApiError(413, "Request body too large") if len(body) > schemas.MAX_BODY_BYTES
               else ApiError(400, schemas.request_error(exc))) from None
    if parsed.image is None:
        if len(body) > schemas.MAX_BODY_BYTES:  # API.md's 64 KiB for a prompt, as before pictures existed
            raise ApiError(413, "Request body too large")
        return _validated(lambda: parsed.with_image(False)), None
    picture = _upload_step(lambda: decode_base64(parsed.image))
    return _validated(lambda: parsed.with_image(True)).model_copy(update={"image": None}), picture


async def _read_form(request: Request) -> tuple[schemas.GenerateRequest, bytes | None]:
    """multipart/form-data: the picture as a file part named `image`, the other fields as text parts."""
    stream = _bounded_stream(request, MAX_FORM_BODY_BYTES, IMAGE_TOO_LARGE)
    parser = MultiPartParser(request.headers, stream, max_files=1, max_fields=len(FORM_FIELDS),
                             max_part_size=schemas.MAX_BODY_BYTES)
    try:
        form = await parser.parse()
    except MultiPartException:
        raise ApiError(400, "Invalid request body") from None
    try:
        fields = {name: value for name, value in form.multi_items() if name in FORM_FIELDS}
        image = fields.pop("image", None)
        if isinstance(image, UploadFile):
            if image.size is not None and image.size > MAX_UPLOAD_BYTES:
                raise ApiError(413, IMAGE_TOO_LARGE)
            picture = await image.read()
        elif isinstance(image, str):  # a text part: base64, as in JSON
            picture = _upload_step(lambda: decode_base64(image))
        else:
            picture = None
        parsed = _validated(lambda: schemas.GenerateRequest.model_validate(fields).with_image(picture is not None))
        return parsed, picture
    finally:
        await form.close()


async def _read_upload(picture: bytes) -> Upload:
    """Decoding takes a moment for a large picture: off the event loop."""
    try:
        return await asyncio.to_thread(read_upload, picture)
    except UploadError as exc:
        raise ApiError(exc.status_code, exc.message) from None


# The form of API.md §1 as OpenAPI documents a file upload.
_FORM_SCHEMA = {"type": "object", "properties": {
    "image": {"type": "string", "format": "binary", "description": "JPEG, PNG or WebP"},
    "prompt": {"type": "string", "description": "an optional caption"},
    "resolution": {"type": "integer", "minimum": schemas.RESOLUTION_RANGE[0], "maximum": schemas.RESOLUTION_RANGE[1]},
    "face_limit": {"type": "integer", "minimum": schemas.FACE_LIMIT_RANGE[0], "maximum": schemas.FACE_LIMIT_RANGE[1]},
    "size_m": {"type": "number", "minimum": schemas.SIZE_M_RANGE[0], "maximum": schemas.SIZE_M_RANGE[1]},
}, "required": ["image"]}


def _validated(build: Callable[[], schemas.GenerateRequest]) -> schemas.GenerateRequest:
    try:
        return build()
    except ValidationError as exc:
        raise ApiError(400, schemas.request_error(exc)) from None


def _upload_step(step: Callable[[], object]):
    try:
        return step()
    except UploadError as exc:
        raise ApiError(exc.status_code, exc.message) from None


async def _check_image_backend(runtime: Runtime) -> None:
    if getattr(runtime.stages.image, "unavailable", False):
        raise ApiError(503, NOT_CONFIGURED)


async def _check_model(runtime: Runtime) -> None:
    """503 before a job is accepted that could not finish. The model's state is the one the reconstruct stage
    already knows (no round trip to the model on the submission path)."""
    status = await runtime.stages.reconstruct.status()
    if status.state in (ModelState.missing, ModelState.failed):
        raise ApiError(503, MODEL_NOT_LOADED)


def _options(settings: Settings, request: schemas.GenerateRequest) -> JobOptions:
    """What the job runs with, defaults filled in, so its status shows them."""
    return JobOptions(resolution=request.resolution or settings.triposr_mc_resolution, face_limit=request.face_limit,
                      size_m=request.size_m or settings.model_size_m)


def _create_upload_job(runtime: Runtime, request: schemas.GenerateRequest, upload: Upload,
                       key: IdempotencyKey | None, caller: Caller) -> Submission:
    """Create the job with its picture and the picture's JPEG: the files join the job inside the creating
    transaction, so no orchestrator ever claims an upload job without its picture (blocking: run in a thread).
    A folder store stages them first (a rename then joins them); an object store writes them whole there."""
    assets = runtime.assets
    files = {Asset.upload: upload.data, Asset.image: upload.jpeg}
    staged = {asset: assets.stage(data) for asset, data in files.items()} if hasattr(assets, "stage") else {}
    try:
        def join(job_id: str) -> None:
            for asset, data in files.items():
                if asset in staged:
                    assets.adopt(staged[asset], job_id, asset)
                else:
                    assets.write(job_id, asset, data)

        return runtime.store.submit(request.prompt, queue_max=runtime.settings.queue_max, source=Source.upload,
                                    callback_url=request.callback_url, idempotency=key,
                                    options=_options(runtime.settings, request), on_insert=join,
                                    api_key_id=caller.key_id, admit=runtime.gate.admission(caller))
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)


def _example_status(runtime: Runtime, job_id: str) -> schemas.JobStatus:
    example = runtime.catalog.get(job_id)
    if example is None:
        raise ApiError(404, "Job not found")
    entry = example.entry
    return schemas.JobStatus(job_id=job_id, status=Status.complete.value, stage=Stage.complete.value,
                             progress=100, created_at=entry.created_at, prompt=entry.prompt)


def status_body(runtime: Runtime, job: Job) -> dict:
    """The status object of API.md §2, field by field from the job (JobStatus documents it; the hot path does not
    re-validate a row the store wrote)."""
    return runtime.store.status_of(job)


async def _example_mesh(runtime: Runtime, example_id: str) -> dict | None:
    """An example's mesh report, read once per GLB file (examples do not change in place, only when promoted)."""
    example = runtime.catalog.get(example_id)
    path = example.path(Asset.glb) if example is not None else None
    try:
        key = (example_id, path.stat().st_mtime_ns) if path is not None else None
    except FileNotFoundError:
        return None
    if key not in runtime.example_meshes:
        runtime.example_meshes[key] = await asyncio.to_thread(lambda: mesh_report(path.read_bytes()))
    return runtime.example_meshes[key]


def _job_getter(runtime: Runtime, job_id: str) -> Callable[[Connection], Job | None]:
    """The blocking read of a job, for Gate.enter to run after the key check (in its transaction, if any)."""
    return lambda conn: runtime.store.get(job_id, conn=conn) if is_job_id(job_id) else None


async def _get_job(runtime: Runtime, request: Request, job_id: str) -> tuple[Caller, Job | None]:
    """The caller and the job `job_id`, if it is theirs (in keys mode another key's job is "not found")."""
    caller, job = await runtime.gate.enter(request, _job_getter(runtime, job_id))
    return caller, job if job is not None and caller.owns(job) else None


def _errors(*codes: int) -> dict[int | str, dict]:
    return {code: {"model": schemas.ErrorBody} for code in codes}


def _install_routes(app: FastAPI) -> None:
    # The body is read by hand (413 while streaming, before it is all in memory), then validated by its model,
    # whose errors map to API.md's exact 400s.
    @app.post("/api/generate", response_model=schemas.GenerateResponse,
              responses=_errors(400, 401, 413, 422, 429, 503),
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": schemas.GenerateRequest.model_json_schema()},
                  "multipart/form-data": {"schema": _FORM_SCHEMA}}},
                  "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                  "schema": {"type": "string", "maxLength": 255},
                                  "description": "The same key and body within 24 hours return the same job_id "
                                                 "and start nothing new (API.md §1)."}]})
    async def generate(request: Request) -> Response:
        runtime = _runtime(request)
        caller, _ = await runtime.gate.enter(request)
        body, picture = await _read_generate(request)
        upload = await _read_upload(picture) if picture is not None else None
        key = _idempotency_key(request, body, upload.data if upload is not None else None)
        if body.callback_url is not None:
            await _check_callback(runtime, body.callback_url)
        if upload is None:
            await _check_image_backend(runtime)
        await _check_model(runtime)
        try:
            if upload is None:
                submission = await asyncio.to_thread(runtime.store.submit, body.prompt,
                                                     queue_max=runtime.settings.queue_max,
                                                     callback_url=body.callback_url, idempotency=key,
                                                     options=_options(runtime.settings, body),
                                                     api_key_id=caller.key_id, admit=runtime.gate.admission(caller))
            else:
                submission = await asyncio.to_thread(_create_upload_job, runtime, body, upload, key, caller)
        except QueueFull:
            raise ApiError(429, "Too many jobs queued, retry later",
                           {"Retry-After": str(runtime.settings.retry_after_s)}) from None
        except IdempotencyMismatch:
            raise ApiError(422, IDEMPOTENCY_MISMATCH) from None
        except LimitExceeded as exc:
            log.info("job refused%s: %s", f" (key {caller.key.name})" if caller.key else "", exc.message)
            raise runtime.gate.refusal(exc, caller) from None
        job = submission.job
        if submission.replayed:
            log.info("job %s: Idempotency-Key replayed, nothing new started", job.job_id)
        else:
            runtime.orchestrator.wake()
            log.info("job %s queued%s", job.job_id, f" (key {caller.key.name})" if caller.key else "")
        # Stripe's header: this answer is the one given to the key's first request.
        headers = {**caller.headers, **({"Idempotent-Replayed": "true"} if submission.replayed else {})}
        return JSONResponse({"job_id": job.job_id, "status": job.status.value}, headers=headers)

    # The hot path. This APIRoute documents it (the id's parameter by hand); a plain Starlette route with the
    # same endpoint serves it, see below.
    @app.get("/api/status/{job_id:path}", response_model=schemas.JobStatus, responses=_errors(401, 404, 429),
             openapi_extra={"parameters": [{"name": "job_id", "in": "path", "required": True,
                                            "schema": {"type": "string"}}]})
    async def status(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        runtime = _runtime(request)
        if is_example_id(job_id):  # examples are public in both modes
            body = _example_status(runtime, job_id).model_dump()
            body["mesh"] = await _example_mesh(runtime, job_id)
            return JSONResponse(body)
        caller, job = await _get_job(runtime, request, job_id)
        if job is None:
            raise ApiError(404, "Job not found")
        return JSONResponse(status_body(runtime, job), headers=caller.headers)

    # Served by a plain Starlette route placed first: FastAPI's per-request machinery costs more than the lookup
    # itself, and clients poll this route every second. The route above only documents it in the OpenAPI schema.
    app.router.routes.insert(0, Route("/api/status/{job_id:path}", status, methods=["GET"]))

    @app.get("/api/asset/{job_id:path}", responses=_errors(400, 401, 404, 429, 503))
    async def asset(job_id: str, request: Request) -> Response:
        caller = await _asset_caller(request, job_id)
        asset_type = request.query_params.get("asset_type")
        kind = next((a for a in SERVED_ASSETS if a.value == asset_type), None)
        if kind is None:
            raise ApiError(400, "Invalid asset type")
        return await _serve_asset(request, job_id, kind, caller)

    # The same files at URLs that end in their extension (AR Quick Look has refused URLs without one on some iOS
    # releases): /api/jobs/{job_id}/model.usdz, model.glb, image.jpg, ... (storage.FILE_NAMES).
    @app.get("/api/jobs/{job_id}/{name}", responses=_errors(401, 404, 429, 503))
    async def asset_file(job_id: str, name: str, request: Request) -> Response:
        caller = await _asset_caller(request, job_id)
        kind = BY_FILE_NAME.get(name)
        if kind is None:
            raise ApiError(404, "Not found")
        return await _serve_asset(request, job_id, kind, caller)

    @app.get("/api/examples", response_model=schemas.ExamplesResponse)
    async def examples(request: Request) -> schemas.ExamplesResponse:
        runtime = _runtime(request)
        return schemas.ExamplesResponse(examples=[
            schemas.Example(job_id=ex.job_id, name=ex.entry.name, description=ex.entry.description,
                            image_url=f"/api/asset/{ex.job_id}?asset_type=image")
            for ex in runtime.catalog.all()
        ])

    _install_lifecycle_routes(app)

    # Unknown paths under /api answer in API.md's shape; a known path with another method is a 405.
    @app.api_route("/api", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                   include_in_schema=False)
    @app.api_route("/api/{rest:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"],
                   include_in_schema=False)
    async def unknown(request: Request) -> Response:
        for route in request.app.router.routes:
            if getattr(route, "endpoint", None) is unknown:
                continue
            match, _ = route.matches(request.scope)
            if match is Match.PARTIAL:
                raise ApiError(405, "Method not allowed")
        raise ApiError(404, "Not found")


def _idempotency_key(request: Request, body: schemas.GenerateRequest,
                     picture: bytes | None = None) -> IdempotencyKey | None:
    """The request's Idempotency-Key (Stripe's header), with the caller's scope and a hash of the request as
    validated (so spacing or key order in the JSON does not make it another request) and of its picture."""
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not 1 <= len(key) <= 255 or not all(0x20 <= ord(c) < 0x7F for c in key):
        raise ApiError(400, IDEMPOTENCY_KEY_INVALID)
    digest = hashlib.sha256(json.dumps(body.model_dump(mode="json", exclude={"image"}), sort_keys=True,
                                       separators=(",", ":")).encode())
    if picture is not None:
        digest.update(hashlib.sha256(picture).digest())
    return IdempotencyKey(scope_key(caller_scope(request)), key, digest.hexdigest())


async def _check_callback(runtime: Runtime, url: str) -> None:
    if runtime.settings.webhook_secret is None:
        raise ApiError(503, webhooks.NOT_CONFIGURED)
    try:
        await webhooks.check_callback_url(url, runtime.settings.webhook_allow_private)
    except webhooks.UnsafeCallback as exc:
        raise ApiError(400, exc.message) from None


def _encode_cursor(job: Job) -> str:
    return base64.urlsafe_b64encode(f"{job.created_at}|{job.job_id}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[str, str]:
    try:
        created_at, _, job_id = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().partition("|")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ApiError(400, CURSOR_INVALID) from None
    if not _CREATED_AT.fullmatch(created_at) or not is_job_id(job_id):
        raise ApiError(400, CURSOR_INVALID)
    return created_at, job_id


def _limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_LIMIT
    if not value.isdigit() or not 1 <= int(value) <= MAX_LIMIT:
        raise ApiError(400, LIMIT_INVALID)
    return int(value)


def _status_filter(value: str | None) -> Status | None:
    if value is None:
        return None
    try:
        return Status(value)
    except ValueError:
        raise ApiError(400, STATUS_INVALID) from None


def _install_lifecycle_routes(app: FastAPI) -> None:
    """API.md §5-§8: list, cancel, delete, live progress. Each route acts on the caller's jobs only
    (pipeline.lifecycle.caller_scope)."""

    @app.get("/api/jobs", response_model=schemas.JobList, responses=_errors(400, 401, 429))
    async def list_jobs(
        request: Request,
        limit: str | None = Query(None, description=f"jobs per page, 1 to {MAX_LIMIT} (default {DEFAULT_LIMIT})"),
        cursor: str | None = Query(None, description="the next_cursor of the previous page"),
        status: str | None = Query(None, description="only jobs in this status: queued, processing, complete, "
                                                     "error"),
    ) -> Response:
        runtime = _runtime(request)
        await runtime.gate.enter(request)
        size, wanted = _limit(limit), _status_filter(status)
        before = _decode_cursor(cursor) if cursor is not None else None
        found = await asyncio.to_thread(runtime.store.list_jobs, caller_scope(request), limit=size + 1,
                                        before=before, status=wanted)
        page = found[:size]
        return JSONResponse({"jobs": [status_body(runtime, job) for job in page],
                             "next_cursor": _encode_cursor(page[-1]) if len(found) > size else None})

    @app.post("/api/jobs/{job_id}/cancel", response_model=schemas.JobStatus, responses=_errors(401, 404, 409, 429))
    async def cancel_job(job_id: str, request: Request) -> Response:
        runtime = _runtime(request)
        await runtime.gate.enter(request)
        if is_example_id(job_id) and runtime.catalog.get(job_id) is not None:
            raise ApiError(409, ALREADY_FINISHED)
        outcome = await runtime.lifecycle.cancel(job_id, caller_scope(request)) if is_job_id(job_id) else None
        if outcome is None:
            raise ApiError(404, "Job not found")
        if not outcome.accepted:
            raise ApiError(409, ALREADY_FINISHED)
        return JSONResponse(status_body(runtime, outcome.job))

    @app.delete("/api/jobs/{job_id}", status_code=204, response_class=Response, responses=_errors(401, 403, 404, 429))
    async def delete_job(job_id: str, request: Request) -> Response:
        runtime = _runtime(request)
        await runtime.gate.enter(request)
        if is_example_id(job_id) and runtime.catalog.get(job_id) is not None:
            raise ApiError(403, EXAMPLES_READ_ONLY)
        if not (is_job_id(job_id) and await runtime.lifecycle.delete(job_id, caller_scope(request))):
            raise ApiError(404, "Job not found")
        return Response(status_code=204)

    # Documented here; served by the plain route inserted below, ahead of /api/status/{job_id:path}, which would
    # otherwise take ".../events" for an id.
    @app.get("/api/status/{job_id}/events", response_class=Response, responses={
        200: {"description": "Server-Sent Events: `status` per state change (data: the status object, id: the "
                             "change's number), then `end`; Last-Event-ID resumes (API.md §8)",
              "content": {"text/event-stream": {"schema": {"type": "string"}}}},
        **_errors(401, 404, 429)})
    async def events(job_id: str, request: Request) -> Response:
        runtime = _runtime(request)
        if is_example_id(job_id):
            stream = fixed_events(json.dumps(_example_status(runtime, job_id).model_dump(mode="json")))
        else:
            if (await _get_job(runtime, request, job_id))[1] is None:
                raise ApiError(404, "Job not found")
            stream = job_events(runtime.store, job_id, last_event_id(request.headers.get("last-event-id")))
        response = event_stream(stream, runtime.settings.sse_heartbeat_s)
        if is_head(request.scope):  # HEAD: the headers alone (the stream would hold the request open)
            return Response(status_code=200, headers=dict(response.headers))
        return response

    app.router.routes.insert(0, Route("/api/status/{job_id}/events", _served(events), methods=["GET"]))


def _served(endpoint):
    """A FastAPI endpoint with a path parameter `job_id`, as a plain Starlette endpoint."""

    async def serve(request: Request) -> Response:
        return await endpoint(request.path_params["job_id"], request)

    return serve


async def _object_response(request: Request, runtime: Runtime, job_id: str, kind: Asset) -> Response:
    """An asset in object storage: streamed through with API.md's rules, or, with GROK3D_ASSETS_REDIRECT_S, a GET is
    sent to a presigned URL of the object (which carries its own media type and Content-Disposition, and answers
    Range and If-None-Match itself). HEAD is answered here, since a URL signed for GET does not answer HEAD. A format
    made on request that is not there yet is made first (one HEAD for one that is)."""
    assets = runtime.assets
    info = await asyncio.to_thread(assets.stat, job_id, kind)
    if info is None and kind in ON_DEMAND:
        await _ensure_format(runtime, AssetTarget(assets, job_id, kind), kind)
        info = await asyncio.to_thread(assets.stat, job_id, kind)
    if info is None:
        raise ApiError(404, "Asset not found")
    seconds = runtime.settings.assets_redirect_s
    if seconds and not is_head(request.scope):
        url = await asyncio.to_thread(assets.presign, job_id, kind, seconds)
        if url:
            return Response(status_code=307, headers={"Location": url, "Cache-Control": "no-store"})
    return object_response(request, info, lambda first, last: assets.iter_range(job_id, kind, first, last),
                           MEDIA_TYPES[kind], filename=f"{job_id}.{DOWNLOAD_SUFFIX[kind]}",
                           disposition=DISPOSITION[kind])


async def _ensure_format(runtime: Runtime, target: Target, kind: Asset) -> None:
    try:
        await runtime.formats.ensure(target, kind)
    except FormatError as exc:
        raise ApiError(exc.status_code, exc.message, exc.headers) from None


async def _asset_caller(request: Request, job_id: str) -> Caller:
    """Examples are public in both modes; in keys mode a job's key is checked before anything else."""
    return ANYONE if is_example_id(job_id) else (await _runtime(request).gate.enter(request))[0]


async def _serve_asset(request: Request, job_id: str, kind: Asset, caller: Caller) -> Response:
    """A job's or an example's file, for a caller admitted already; a format made on demand is made first
    (pipeline/formats.py)."""
    runtime = _runtime(request)
    if is_example_id(job_id):
        example = runtime.catalog.get(job_id)
        if example is None:
            raise ApiError(404, "Job not found")
        path = example.path(kind)
        if kind in ON_DEMAND and not path.is_file():  # shipped examples are read-only: their formats go here
            path = runtime.settings.data_dir / "example-formats" / job_id / FILE_NAMES[kind]
            await _ensure_format(runtime, FileTarget(example.path(Asset.glb), path), kind)
    elif (job := await asyncio.to_thread(runtime.store.get, job_id) if is_job_id(job_id) else None) is not None \
            and caller.owns(job):
        path = runtime.assets.local_path(job_id, kind)
        if path is None:  # object storage: its files stream from there, or redirect
            response = await _object_response(request, runtime, job_id, kind)
            response.headers.update(caller.headers)
            return response
        if kind in ON_DEMAND:
            await _ensure_format(runtime, AssetTarget(runtime.assets, job_id, kind), kind)
    else:
        raise ApiError(404, "Job not found")
    response = _file_response(request, path, job_id, kind)
    response.headers.update(caller.headers)
    return response


def _file_response(request: Request, path, job_id: str, kind: Asset) -> Response:
    response = file_response(request, path, MEDIA_TYPES[kind], filename=f"{job_id}.{DOWNLOAD_SUFFIX[kind]}",
                             disposition=DISPOSITION[kind])
    if response is None:
        raise ApiError(404, "Asset not found")
    return response
