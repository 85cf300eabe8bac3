"""grok3d's deployment manifest: the API service, which mounts the FastAPI app of pipeline/ and depends on the
TripoSR service. Nothing else lives here: the pipeline knows nothing of BentoML."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import _bentoml_impl.server as _bentoml_server  # where BentoML keeps its UI page
import bentoml
from starlette.exceptions import HTTPException
from starlette.responses import PlainTextResponse

import bentoml_fixes
from pipeline import lifeline
from pipeline.logs import setup_logging
from pipeline.settings import get_settings
from pipeline.stages import ModelState
from runners.triposr.service import TripoSRService

if TYPE_CHECKING:
    from fastapi import FastAPI

# Every process of the service dies with the one that started it (BentoML issue #4193: a `kill -9` of `bentoml
# serve` leaves its workers running). `bentoml serve` imports this module (_bentoml_impl/server/serving.py:208)
# before it creates the circus watchers that start the workers (:265, :348) with a copy of its environment
# (circus/watcher.py:283), from its main thread; each worker imports it first thing
# (_bentoml_impl/worker/service.py:186).
lifeline.hold()
setup_logging()
settings = get_settings()
# Cheaper middlewares for the hot path (see bentoml_fixes.py). Every worker of both services imports this module.
bentoml_fixes.install()


def build_app() -> FastAPI:
    """The FastAPI app of pipeline/, with the real stages (or GROK3D_STAGES' stand-ins), mounted at "/".

    Imported and built on first use (bentoml_fixes.AppOnFirstUse): only the API's worker and `bentoml build` use it,
    not BentoML's arbiter nor the TripoSR worker, which import this module too."""
    from pipeline.api import create_app
    from pipeline.backends import default_stages
    from pipeline.web import mount_bentoml_ui
    from runners.triposr.client import TripoSRStage

    def triposr_stage() -> TripoSRStage:
        return TripoSRStage(bentoml.get_current_service().triposr, max_batch_size=settings.triposr_max_batch_size,
                            max_latency_s=settings.triposr_max_latency_ms / 1000, url=settings.triposr_url)

    # BentoML serves Swagger UI's files at /static_content (_bentoml_impl/server/app.py:204-208): our /api/docs uses
    # them, so the docs work offline.
    built = create_app(lambda s: default_stages(s, triposr_stage()), settings, swagger_assets_url="/static_content")
    # Our page owns "/", so BentoML's own UI moves to /bentoml (it still reads /docs.json and /static_content): our
    # app is mounted before BentoML adds its index route (_bentoml_impl/server/app.py:192-193 before :213), which so
    # never answers; the page is its index_page's file (app.py:163-170).
    mount_bentoml_ui(built, Path(_bentoml_server.__file__).parent / "main-openapi.html")
    return built


app = bentoml_fixes.AppOnFirstUse(build_app)


# Status polls are the hot path (every client polls every second or so): they skip the access log, the
# per-request metrics and tracing, which together cost more than the route itself, and go straight to our app
# (bentoml_fixes.route_directly). Job state changes are logged by the orchestrator instead.
POLL_PATHS = ["/api/status/"]


class ReadyzNote:
    """Adds a line to a 200 from /readyz (BentoML's own answer is a bare newline and its route cannot be replaced:
    `bentoml/_internal/server/base_app.py` fixes the path), so a probe's log shows what the server is running
    with: today, that test stages stand in for the real ones."""

    def __init__(self, app: Callable, note: str) -> None:
        self.app = app
        self.body = f"{note}\n".encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] != "/readyz":
            await self.app(scope, receive, send)
            return
        started: dict = {}

        async def noted(message: dict) -> None:
            if message["type"] == "http.response.start":
                started.update(message)
                if message["status"] != 200:
                    await send(message)
                return
            if started.get("status") != 200:
                await send(message)
            elif not message.get("more_body", False):
                await PlainTextResponse(self.body)(scope, receive, send)

        await self.app(scope, receive, noted)


def triposr_dependency(triposr_service: type) -> Any:
    """The TripoSR service as a dependency: run by `bentoml serve` beside this one, or, with GROK3D_TRIPOSR_URL, a
    deployment of its own elsewhere (its GPU nodes scale apart from the API's CPU nodes).

    With a URL the service class is still named, so that the client takes its traffic timeout and connection
    settings (a URL alone gets a 60 s timeout and a connection renewed under requests in flight:
    _bentoml_impl/client/proxy2.py, RemoteProxy.__init__) and speaks JSON to it, the Picture's bytes as base64
    (runners/triposr/wire.py); `bentoml serve` starts no worker for a dependency with a URL
    (_bentoml_impl/server/serving.py: all_services(exclude_urls=True)), and importing the service's module loads no
    torch: the model's code is imported by its worker only."""
    if settings.triposr_url:
        return bentoml.depends(triposr_service, url=settings.triposr_url)
    return bentoml.depends(triposr_service)


def api_service(triposr_service: type) -> type:
    """The API service, depending on `triposr_service` (the real TripoSR service; tests pass a stand-in with the
    same API to put slow or failing batches behind real BentoML batching)."""

    @bentoml.service(
        name="grok3d",
        workers=1,
        traffic={"timeout": settings.request_timeout_s},  # to the first byte only: bentoml_fixes.FirstByteTimeout
        http={"port": settings.port},
        logging={"access": {"enabled": True, "skip_paths": POLL_PATHS}},
        tracing={"excluded_urls": POLL_PATHS},
    )
    @bentoml.asgi_app(app, path="/")
    class Grok3D:
        triposr = triposr_dependency(triposr_service)

        async def __is_ready__(self) -> bool:
            """API.md: ready once the model has loaded or none is configured; while it loads, if it is broken, or
            while the TripoSR service of GROK3D_TRIPOSR_URL cannot be reached, 503 with the reason (raising gives
            /readyz that body instead of BentoML's generic one: its readyz awaits this unguarded and answers False
            with a fixed sentence, _bentoml_impl/server/app.py:440-451). The model's state comes from the TripoSR
            client's watch: no round trip here."""
            runtime = getattr(app.state, "runtime", None)
            if runtime is None:
                raise HTTPException(503, "grok3d is starting")
            status = await runtime.stages.reconstruct.status()
            if status.unreachable:
                raise HTTPException(503, f"The TripoSR service cannot be reached ({status.unreachable})")
            if status.state is ModelState.loading:
                raise HTTPException(503, "The TripoSR model is still loading")
            if status.state is ModelState.failed:
                raise HTTPException(503, f"The TripoSR model could not be loaded: {status.detail}")
            return True

    bentoml_fixes.route_directly(Grok3D, app, POLL_PATHS, settings.request_timeout_s)
    if settings.stages_factory:
        Grok3D.add_asgi_middleware(ReadyzNote, note=f"ready, with test stages: GROK3D_STAGES={settings.stages_factory}")
    return Grok3D


Grok3D = api_service(TripoSRService)
