"""The FastAPI app: the routes of API.md, its error bodies and status codes, CORS.

Every error under /api is `{"error": "..."}`; FastAPI's 422 and `{"detail": ...}` never reach a client.
"""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sqlalchemy import Connection
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match, Route

from pipeline import schemas
from pipeline.auth import ANYONE, RATE_HEADERS, SCOPE_KEY, Caller, Gate, Refused
from pipeline.examples import SHIPPED_DIR, ExampleCatalog
from pipeline.head import serve_head
from pipeline.jobs import Job, JobStore, QueueFull, Status, Stage
from pipeline.orchestrator import Orchestrator
from pipeline.quotas import LimitExceeded, Quotas
from pipeline.responses import file_response
from pipeline.settings import Settings, get_settings
from pipeline.stages import ModelState, Stages
from pipeline.web import mount_web
from pipeline.storage import (DISPOSITION, DOWNLOAD_SUFFIX, MEDIA_TYPES, SERVED_ASSETS, Asset, AssetStore,
                              is_example_id, is_job_id)

log = logging.getLogger("grok3d.api")

NOT_CONFIGURED = "Image generation is not configured: set XAI_API_KEY"
MODEL_NOT_LOADED = "The 3D model is not loaded: import a TripoSR checkpoint (make import-model)"


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
    gate: Gate


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
    app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origin_list, allow_methods=["GET", "HEAD", "POST"],
                       allow_headers=["*"], expose_headers=["ETag", "Content-Disposition", "Retry-After",
                                                            "Content-Range", "Accept-Ranges", "WWW-Authenticate",
                                                            *RATE_HEADERS])
    serve_head(app)  # every GET route answers HEAD; its middleware is the outermost
    _install_error_handlers(app)
    _install_routes(app)
    _document_no_422(app)
    mount_web(app)
    return app


def _document_no_422(app: FastAPI) -> None:
    """Invalid requests are 400 here (API.md): drop the 422 FastAPI documents for every route with parameters."""
    build = app.openapi

    def openapi() -> dict:
        schema = build()
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
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
    store = await asyncio.to_thread(JobStore, settings.store_url, lease_s=settings.lease_s)
    assets = AssetStore(settings.jobs_dir)
    catalog = ExampleCatalog(SHIPPED_DIR, settings.promoted_examples_dir)
    for backend in (stages.image, stages.prepare, stages.reconstruct, stages.convert):
        if hasattr(backend, "start"):
            await backend.start()
    orchestrator = Orchestrator(store, assets, stages, image_concurrency=settings.image_concurrency,
                                reconstruct_concurrency=settings.reconstruct_concurrency,
                                max_running=settings.queue_max)
    await orchestrator.start()
    gate = Gate(settings.auth, store, Quotas(settings.daily_job_limit, settings.retry_after_s))
    log.info("grok3d started: data in %s, %d jobs to resume", settings.data_dir,
             await asyncio.to_thread(store.count_active))
    await _log_auth_mode(settings, gate)
    # Everything loaded so far (BentoML, numpy, scikit-image, ...) lives as long as the process: keep the cyclic
    # garbage collector from walking it again and again, which stalled every request for ~200 ms once a second.
    gc.collect()
    gc.freeze()
    return Runtime(settings, store, assets, catalog, stages, orchestrator, gate)


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
    await runtime.orchestrator.stop()
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


async def _read_body(request: Request) -> bytes:
    """The body, refused with 413 past 64 KiB whether or not the client declared its length."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > schemas.MAX_BODY_BYTES:
        raise ApiError(413, "Request body too large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > schemas.MAX_BODY_BYTES:
            raise ApiError(413, "Request body too large")
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_generate(body: bytes) -> schemas.GenerateRequest:
    try:
        return schemas.GenerateRequest.model_validate_json(body)
    except ValidationError as exc:
        raise ApiError(400, schemas.request_error(exc)) from None


async def _check_backends(runtime: Runtime) -> None:
    """503 before a job is accepted that could not finish. The model's state is the one the reconstruct stage
    already knows (no round trip to the model on the submission path)."""
    if getattr(runtime.stages.image, "unavailable", False):
        raise ApiError(503, NOT_CONFIGURED)
    status = await runtime.stages.reconstruct.status()
    if status.state in (ModelState.missing, ModelState.failed):
        raise ApiError(503, MODEL_NOT_LOADED)


def _example_status(runtime: Runtime, job_id: str) -> schemas.JobStatus:
    example = runtime.catalog.get(job_id)
    if example is None:
        raise ApiError(404, "Job not found")
    entry = example.entry
    return schemas.JobStatus(job_id=job_id, status=Status.complete.value, stage=Stage.complete.value,
                             progress=100, created_at=entry.created_at, prompt=entry.prompt)


# The status object of API.md §2, field by field from the job (JobStatus documents it; the hot path does not
# re-validate a row the store wrote).
STATUS_FIELDS = tuple(schemas.JobStatus.model_fields)


def status_body(job: Job) -> dict:
    return {name: getattr(job, name) for name in STATUS_FIELDS}


def _job_getter(runtime: Runtime, job_id: str) -> Callable[[Connection | None], Job | None]:
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
              responses=_errors(400, 401, 413, 429, 503),
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": schemas.GenerateRequest.model_json_schema()}}}})
    async def generate(request: Request) -> Response:
        runtime = _runtime(request)
        caller, _ = await runtime.gate.enter(request)
        body = _parse_generate(await _read_body(request))
        await _check_backends(runtime)
        try:
            job = await asyncio.to_thread(runtime.store.create, body.prompt, queue_max=runtime.settings.queue_max,
                                          api_key_id=caller.key_id, admit=runtime.gate.admission(caller))
        except QueueFull:
            raise ApiError(429, "Too many jobs queued, retry later",
                           {"Retry-After": str(runtime.settings.retry_after_s)}) from None
        except LimitExceeded as exc:
            log.info("job refused%s: %s", f" (key {caller.key.name})" if caller.key else "", exc.message)
            raise runtime.gate.refusal(exc, caller) from None
        runtime.orchestrator.wake()
        log.info("job %s queued%s", job.job_id, f" (key {caller.key.name})" if caller.key else "")
        return JSONResponse(schemas.GenerateResponse(job_id=job.job_id, status=job.status).model_dump(mode="json"),
                            headers=caller.headers)

    # The hot path. This APIRoute documents it (the id's parameter by hand); a plain Starlette route with the
    # same endpoint serves it, see below.
    @app.get("/api/status/{job_id:path}", response_model=schemas.JobStatus, responses=_errors(401, 404, 429),
             openapi_extra={"parameters": [{"name": "job_id", "in": "path", "required": True,
                                            "schema": {"type": "string"}}]})
    async def status(request: Request) -> Response:
        job_id = request.path_params["job_id"]
        runtime = _runtime(request)
        if is_example_id(job_id):  # examples are public in both modes
            return JSONResponse(_example_status(runtime, job_id).model_dump())
        caller, job = await _get_job(runtime, request, job_id)
        if job is None:
            raise ApiError(404, "Job not found")
        return JSONResponse(status_body(job), headers=caller.headers)

    # Served by a plain Starlette route placed first: FastAPI's per-request machinery costs more than the lookup
    # itself, and clients poll this route every second. The route above only documents it in the OpenAPI schema.
    app.router.routes.insert(0, Route("/api/status/{job_id:path}", status, methods=["GET"]))

    @app.get("/api/asset/{job_id:path}", responses=_errors(400, 401, 404, 429))
    async def asset(job_id: str, request: Request) -> Response:
        runtime = _runtime(request)
        # Examples are public in both modes; in keys mode the key is checked before anything else.
        example = is_example_id(job_id)
        caller, job = (ANYONE, None) if example else await _get_job(runtime, request, job_id)
        asset_type = request.query_params.get("asset_type")
        kind = next((a for a in SERVED_ASSETS if a.value == asset_type), None)
        if kind is None:
            raise ApiError(400, "Invalid asset type")
        if example:
            entry = runtime.catalog.get(job_id)
            if entry is None:
                raise ApiError(404, "Job not found")
            path = entry.path(kind)
        elif job is not None:
            path = runtime.assets.path(job_id, kind)
        else:
            raise ApiError(404, "Job not found")
        response = _file_response(request, path, job_id, kind)
        response.headers.update(caller.headers)
        return response

    @app.get("/api/examples", response_model=schemas.ExamplesResponse)
    async def examples(request: Request) -> schemas.ExamplesResponse:
        runtime = _runtime(request)
        return schemas.ExamplesResponse(examples=[
            schemas.Example(job_id=ex.job_id, name=ex.entry.name, description=ex.entry.description,
                            image_url=f"/api/asset/{ex.job_id}?asset_type=image")
            for ex in runtime.catalog.all()
        ])

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


def _file_response(request: Request, path, job_id: str, kind: Asset) -> Response:
    response = file_response(request, path, MEDIA_TYPES[kind], filename=f"{job_id}.{DOWNLOAD_SUFFIX[kind]}",
                             disposition=DISPOSITION[kind])
    if response is None:
        raise ApiError(404, "Asset not found")
    return response
