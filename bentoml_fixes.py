"""Workarounds for BentoML 1.4.40: on the API's hot path, installed by service.py in every worker, and for the
processes that import the service's module without serving the API (`AppOnFirstUse`, at the end).

Status polls are what clients send most (every client, every second or so). Two of BentoML's middlewares cost more
than the route itself:
- Its TimeoutMiddleware (bentoml/_internal/server/http/traffic.py:13-50) schedules a timer with `loop.call_later`
  and a future for every request (traffic.py:28-29) and never cancels them, so each request leaves both alive for
  the whole timeout (60 s): at 5,000 requests/s that is hundreds of thousands of live objects, and the garbage
  collector's full passes over them stalled every request for up to 250 ms. `FirstByteTimeout` has the same
  contract (504 `{"error": ...}` when no response has started in time, no limit once it has) and cancels its timer
  as soon as the response starts or the request ends.
- Its metrics middleware (bentoml/_internal/server/http/instruments.py:142, RunnerTrafficMetricsMiddleware) counts
  every request in Prometheus' multiprocess files, skip_paths or not (they only skip the last-request timestamp,
  instruments.py:257; the counts at instruments.py:295-340 run for every path), about a fifth of a poll's cost.
  `skipping_metrics` makes skip_paths skip it all.

Both are swapped in where BentoML looks them up each time it builds an app's middleware stack: the
`middlewares` properties import them from their modules at call time (bentoml/_internal/server/base_app.py:148
for the timeout, _bentoml_impl/server/app.py:234 for the metrics).

Even so, a poll crossed BentoML's whole stack before it reached our app: its error middleware, metrics, tracing
and access log (which all skip the polls' paths, yet each looks at the request first), the timeout, its context
middleware, its exception middleware, its router and the mount of our app; a third of a poll's CPU time, measured.
`route_directly` sends the requests under given path prefixes straight to the mounted app, through
FirstByteTimeout alone (so a poll keeps its 504), by wrapping the app that a service's worker builds and hands
to uvicorn (Service.to_asgi, called at _bentoml_impl/worker/service.py:207). Everything else, lifespan included,
still goes through BentoML's app.

An upgrade of BentoML could move any of these and silently drop the fix, so:
- `install()` refuses any BentoML but the version this was written for, and says what to re-check;
- each replacement logs a line when BentoML builds it into a stack (so once per worker at start-up), and so does
  the direct route when a worker builds its app; tests/test_bentoml_fixes.py finds those lines for the workers of
  a served app, and checks that status polls are missing from its /metrics.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, Callable

from starlette.responses import JSONResponse

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]

log = logging.getLogger("grok3d.bentoml_fixes")
WRITTEN_FOR = "1.4.40"
# What an upgrade must re-check before WRITTEN_FOR moves (paths under site-packages).
RECHECK = (
    "1. bentoml/_internal/server/http/traffic.py: does TimeoutMiddleware still leave a call_later timer armed for "
    "every request, and does bentoml/_internal/server/base_app.py (`middlewares`) still import it from there when "
    "it builds a stack? "
    "2. bentoml/_internal/server/http/instruments.py: does RunnerTrafficMetricsMiddleware still count requests "
    "under its skip_paths, and does _bentoml_impl/server/app.py (`middlewares`) still import it from there? "
    "3. _bentoml_impl/worker/service.py: does a worker still build the app it serves with Service.to_asgi "
    "(_bentoml_sdk/service/factory.py), and do BentoML's middlewares still need nothing for the paths that "
    "route_directly sends past them? "
    "4. Does BentoML still meet a mounted app only where AppOnFirstUse's docstring says (bentoml.asgi_app, "
    "Service.to_asgi, Service.openapi_spec, Service.schema)? "
    "5. The workarounds that name BentoML lines in service.py, runners/triposr/service.py and "
    "runners/triposr/client.py. "
    "Then run tests/test_bentoml_fixes.py."
)


def _report(replacement: str, original: str) -> None:
    """One line per stack BentoML builds with the replacement in it: the proof, read by the tests, that it is."""
    log.info("%s is in BentoML's middleware stack in place of its %s (process %d)", replacement, original,
             os.getpid())


class FirstByteTimeout:
    """ASGI: 504 `{"error": ...}` when no response has started within `timeout` seconds; no limit once it has."""

    def __init__(self, app: Any, timeout: float, *, in_bentoml_stack: bool = True) -> None:
        self.app = app
        self.timeout = timeout
        if in_bentoml_stack:
            _report("FirstByteTimeout", "TimeoutMiddleware")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        task = asyncio.current_task()
        started = expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            task.cancel()

        # A plain timer rather than asyncio.timeout(): this runs for every request, and it is cheaper.
        timer = asyncio.get_running_loop().call_later(self.timeout, expire)

        async def send_and_stop_the_clock(message: dict[str, Any]) -> None:
            nonlocal started
            if not started:
                started = True
                timer.cancel()  # a response is under way: it may take as long as it needs
            await send(message)

        try:
            await self.app(scope, receive, send_and_stop_the_clock)
        except asyncio.CancelledError:
            if not expired or started:
                raise
            task.uncancel()
            await JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                               status_code=504)(scope, receive, send)
        finally:
            timer.cancel()


def skipping_metrics(base: type) -> type:
    """BentoML's metrics middleware class, made to pass requests under its skip_paths straight through."""

    class SkippingMetrics(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            _report("SkippingMetrics", base.__name__)

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["path"].startswith(tuple(self.skip_paths)):
                await self.app(scope, receive, send)
                return
            await super().__call__(scope, receive, send)

    return SkippingMetrics


class DirectPaths:
    """ASGI, in front of a service's whole BentoML app (`outer`): HTTP requests whose path starts with one of
    `prefixes` go straight to `inner`, the app the service mounts, with FirstByteTimeout's `timeout`; everything
    else (other paths, lifespan, websockets) to `outer`."""

    def __init__(self, outer: Any, inner: Any, prefixes: list[str], timeout: float) -> None:
        self.outer = outer
        self.direct = FirstByteTimeout(inner, timeout, in_bentoml_stack=False)
        self.prefixes = tuple(prefixes)
        log.info("requests under %s go straight to the mounted app, past BentoML's middleware stack (process %d)",
                 ", ".join(self.prefixes), os.getpid())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefixes):
            await self.direct(scope, receive, send)
        else:
            await self.outer(scope, receive, send)


# id(service) -> (mounted app, path prefixes, timeout), for the services that route_directly was called for.
_direct_routes: dict[int, tuple[Any, list[str], float]] = {}


def route_directly(service: Any, app: Any, prefixes: list[str], timeout: float) -> None:
    """Requests to `service` (a bentoml.Service) under `prefixes` skip BentoML's middleware stack and go to `app`,
    which the service mounts: only for paths that BentoML's access log, metrics and tracing skip anyway, and that
    need nothing of its request context, its max_concurrency or the service's own ASGI middlewares
    (`add_asgi_middleware`), and for a service without a path_prefix. Takes effect where install() has run."""
    _direct_routes[id(service)] = (app, list(prefixes), timeout)


def _serving(to_asgi: Callable) -> Callable:
    """Service.to_asgi, which a worker calls to build the app it serves: the service's AppOnFirstUse mounts are
    built first, and the result is wrapped in DirectPaths for the services that route_directly names."""

    def wrapped(self: Any, is_main: bool = True) -> Any:
        build_mounted_apps(self)
        app = to_asgi(self, is_main=is_main)
        direct = _direct_routes.get(id(self))
        if direct is None:
            return app
        mounted, prefixes, timeout = direct
        return DirectPaths(app, the_app(mounted), prefixes, timeout)  # polls go to the app itself

    wrapped._grok3d_serving = True  # type: ignore[attr-defined]
    return wrapped


def _describing(openapi_spec: Callable) -> Callable:
    """Service.openapi_spec's getter (/docs.json; `bentoml build` writes it to apis/openapi.yaml,
    bentoml/_internal/bento/bento.py:379-383), with the service's AppOnFirstUse mounts built first: BentoML merges a
    mounted FastAPI app's paths only when its check finds one, and that check, `LazyType.isinstance`
    (bentoml/_internal/types.py:186-206), answers False without looking at the object while fastapi is not imported
    (_bentoml_sdk/service/openapi.py:45)."""

    def wrapped(self: Any) -> Any:
        build_mounted_apps(self)
        return openapi_spec(self)

    wrapped._grok3d_describing = True  # type: ignore[attr-defined]
    return wrapped


def check_version(found: str) -> None:
    """Refuse a BentoML this module was not written for: its fixes could be silently dropped or wrong there."""
    if found != WRITTEN_FOR:
        raise RuntimeError(f"bentoml_fixes.py was written for BentoML {WRITTEN_FOR}, and this is BentoML {found}. "
                           f"Re-check, then set WRITTEN_FOR: {RECHECK}")


def install() -> None:
    """Put both replacements in BentoML's place (its app factory looks them up in these modules when it builds each
    app); wrap Service.to_asgi so that route_directly takes effect, and it and Service.openapi_spec so that they see
    the apps of AppOnFirstUse mounts."""
    import bentoml
    import bentoml._internal.server.http.instruments as instruments
    import bentoml._internal.server.http.traffic as traffic
    from _bentoml_sdk import Service

    check_version(bentoml.__version__)
    traffic.TimeoutMiddleware = FirstByteTimeout
    if not getattr(Service.to_asgi, "_grok3d_serving", False):
        Service.to_asgi = _serving(Service.to_asgi)
    if not getattr(Service.openapi_spec.fget, "_grok3d_describing", False):
        Service.openapi_spec = property(_describing(Service.openapi_spec.fget))
    if not getattr(instruments.RunnerTrafficMetricsMiddleware, "_grok3d_skipping", False):
        instruments.RunnerTrafficMetricsMiddleware = skipping_metrics(instruments.RunnerTrafficMetricsMiddleware)
        instruments.RunnerTrafficMetricsMiddleware._grok3d_skipping = True


class AppOnFirstUse:
    """The API's ASGI app for BentoML to mount, built by `build()` the first time anything of it is used.

    `bentoml serve` imports the service's module in every process it starts (_bentoml_impl/server/serving.py:208 in
    its arbiter, _bentoml_impl/worker/service.py:186 in each worker), and two of them never serve the API: the
    arbiter, which supervises, and the TripoSR worker, on a GPU node in a deployment. Building the app there imported
    the whole pipeline, SQLAlchemy, FastAPI and aiohttp with it: about 0.8 CPU-s at every start of each (measured,
    `python -X importtime`) and their memory for the process's life.

    Where BentoML meets a mounted app:
    - at import, `bentoml.asgi_app` keeps it (_bentoml_sdk/decorators.py:126-140, then service/factory.py:144-148);
      its FastAPI check there (LazyType, bentoml/_internal/types.py:202-206) answers False while fastapi is not
      imported, so it skips `make_fastapi_class_views` (_bentoml_sdk/_internals.py:13-53), which changes nothing for a
      service without FastAPI class views (Grok3D has none: it returns at :28-29). Were fastapi imported first, the
      check would read `__class__` and build the app at import: tests/test_bentoml_fixes.py would see it built in
      more than the API worker.
    - where it is served or described, install()'s wrappers of Service.to_asgi (_serving: the worker's app, its
      router's per-request PassiveMount.matches at _bentoml_impl/server/mount.py:12-27, the lifespan at
      _bentoml_impl/server/app.py:493-497) and of Service.openapi_spec (_describing: /docs.json, and `bentoml build`'s
      apis/openapi.yaml) put the built app in its place first (`build_mounted_apps`);
    - Service.schema() (service/factory.py:294-314; `bentoml build` writes it, bento.py:385) checks
      `issubclass(app.__class__, Starlette)`, which `__class__` answers with the built app's class.
    Anything else is the built app's own: attributes read and set, calls.
    """

    __slots__ = ("_build", "_app")

    def __init__(self, build: Callable[[], Any]) -> None:
        object.__setattr__(self, "_build", build)
        object.__setattr__(self, "_app", None)

    def built(self) -> Any:
        """The app, built now if it was not yet."""
        if self._app is None:
            object.__setattr__(self, "_app", self._build())
            log.info("%s() built the mounted app on its first use (process %d)", self._build.__name__, os.getpid())
        return self._app

    @property  # type: ignore[misc]  # isinstance() and issubclass(x.__class__, ...) see the app's class
    def __class__(self) -> type:
        return type(self.built())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.built(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.built(), name, value)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.built()(scope, receive, send)


def the_app(app: Any) -> Any:
    """`app` itself, or the app an AppOnFirstUse stands for, built now if it was not yet."""
    return app.built() if type(app) is AppOnFirstUse else app


def build_mounted_apps(service: Any) -> None:
    """Put the built app in place of each AppOnFirstUse among `service.mount_apps` (a bentoml.Service's)."""
    service.mount_apps[:] = [(the_app(app), path, name) for app, path, name in service.mount_apps]
