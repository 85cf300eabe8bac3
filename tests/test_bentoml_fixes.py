"""bentoml_fixes: FirstByteTimeout on a real uvicorn server (a 504 in API.md's error shape when no response starts
in time, no limit once one has, and no timer left behind per request: BentoML's own leaves one for 60 s); both
replacements found in the middleware stacks that the workers of a served app build; DirectPaths, and status polls
routed past BentoML's stack in the API worker of a served app; the app built in that worker alone, on first use;
and no install on a BentoML it was not written for."""

from __future__ import annotations

import asyncio
import threading
import time

import bentoml
import bentoml._internal.server.http.traffic as traffic
import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

import bentoml_fixes
from bentoml_fixes import DirectPaths, FirstByteTimeout
from tests.server import Server, free_port


async def slow(request):
    await asyncio.sleep(2)
    return JSONResponse({"late": True})


async def streaming(request):
    async def body():
        for _ in range(4):
            yield b"x" * 10
            await asyncio.sleep(0.3)  # 1.2 s in all: longer than the timeout, after the response started
    return StreamingResponse(body())


async def quick(request):
    # Timers still armed (cancelled ones may wait in asyncio's heap until it compacts itself).
    armed = sum(1 for timer in asyncio.get_running_loop()._scheduled if not timer.cancelled())
    return JSONResponse({"ok": True, "timers": armed})


@pytest.fixture(scope="module", params=[FirstByteTimeout])
def url(request):
    app = request.param(Starlette(routes=[Route("/slow", slow), Route("/stream", streaming),
                                             Route("/quick", quick)]), timeout=0.5)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", loop="asyncio"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_no_response_in_time_is_a_504_with_an_error_body(url):
    r = httpx.get(url + "/slow", timeout=10)
    assert r.status_code == 504
    assert r.json() == {"error": "Not able to process the request in 0.5 seconds"}


def test_a_started_response_may_take_longer(url):
    r = httpx.get(url + "/stream", timeout=10)
    assert r.status_code == 200 and r.content == b"x" * 40


def test_no_timer_is_left_behind_per_request(url):
    with httpx.Client(base_url=url) as c:
        for _ in range(300):
            last = c.get("/quick").json()
    assert last["timers"] < 10  # BentoML's middleware would hold ~300 here


def test_both_replacements_are_in_the_stacks_of_a_served_app(tmp_path):
    """Each replacement logs when BentoML builds it into a worker's stack: if an upgrade bypassed the swap, or
    service.py stopped installing it, no line would name that worker. And polls are missing from /metrics."""
    env = {"GROK3D_STAGES": "tests.stages:sleepy", "XAI_API_KEY": "test-key"}
    with Server(tmp_path, env, triposr_worker=True) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        assert c.get("/livez").status_code == 200  # BentoML's health routes, beside our app at "/"
        srv.wait_for("/readyz", timeout_s=60)  # 200 once the model's state is known
        log = srv.log()
        for service in ("grok3d", "triposr"):
            pid = srv.worker(service).pid
            for replacement, original in (("FirstByteTimeout", "TimeoutMiddleware"),
                                          ("SkippingMetrics", "RunnerTrafficMetricsMiddleware")):
                assert f"{replacement} is in BentoML's middleware stack in place of its {original} (process {pid})" \
                    in log, f"{replacement} is not in the {service} worker's stack"
        direct = "requests under /api/status/ go straight to the mounted app, past BentoML's middleware stack"
        routed = [line for line in log.splitlines() if direct in line]
        assert len(routed) == 1 and f"(process {srv.worker('grok3d').pid})" in routed[0]  # the API worker alone
        # The app is built where it is served: not in BentoML's arbiter, not in the TripoSR worker (AppOnFirstUse).
        built = [line for line in log.splitlines() if "build_app() built the mounted app on its first use" in line]
        assert len(built) == 1 and f"(process {srv.worker('grok3d').pid})" in built[0], built
        for _ in range(3):
            c.get("/api/status/0123456789ab")
            c.get("/api/examples")
        metrics = c.get("/metrics").text
        assert 'endpoint="/api/examples"' in metrics  # what is not skipped is counted
        assert 'endpoint="/api/status/' not in metrics


def test_direct_paths_send_only_http_under_their_prefixes_to_the_mounted_app():
    seen: list[tuple[str, str, str]] = []

    def app(name):
        async def asgi(scope, receive, send):
            seen.append((name, scope["type"], scope.get("path", "")))
            if scope["type"] == "http":
                if scope["path"].endswith("/slow"):
                    await asyncio.sleep(1)
                await JSONResponse({"by": name})(scope, receive, send)
        return asgi

    routed = DirectPaths(app("bentoml"), app("ours"), ["/api/status/"], timeout=0.3)

    async def main():
        transport = httpx.ASGITransport(app=routed)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            assert (await c.get("/api/status/abc")).json() == {"by": "ours"}
            assert (await c.get("/api/status")).json() == {"by": "bentoml"}  # not under the prefix
            assert (await c.get("/metrics")).json() == {"by": "bentoml"}
            slow = await c.get("/api/status/slow")  # the direct route keeps the first-byte timeout
            assert slow.status_code == 504 and slow.json() == {"error": "Not able to process the request in 0.3 "
                                                                        "seconds"}
        await routed({"type": "lifespan"}, None, None)

    asyncio.run(main())
    assert ("bentoml", "lifespan", "") in seen  # BentoML's app runs the lifespan (its startup hooks, ours)


def test_an_app_on_first_use_is_built_once_and_then_is_that_app():
    builds: list[Starlette] = []

    def build() -> Starlette:
        builds.append(Starlette(routes=[Route("/quick", quick)]))
        return builds[-1]

    app = bentoml_fixes.AppOnFirstUse(build)
    assert builds == []  # BentoML keeping it (asgi_app, the service's mount_apps) builds nothing
    assert isinstance(app, Starlette) and issubclass(app.__class__, Starlette)  # BentoML's checks see the app's class
    assert [r.path for r in app.routes] == ["/quick"]
    app.state.runtime = "set through the proxy"
    assert builds[0].state.runtime == "set through the proxy"

    async def main() -> dict:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return (await c.get("/quick")).json()

    assert asyncio.run(main())["ok"] is True
    assert len(builds) == 1 and type(app) is bentoml_fixes.AppOnFirstUse


def test_install_refuses_a_bentoml_it_was_not_written_for(monkeypatch):
    before = traffic.TimeoutMiddleware
    monkeypatch.setattr(bentoml, "__version__", "1.4.41")
    with pytest.raises(RuntimeError) as refused:
        bentoml_fixes.install()
    assert traffic.TimeoutMiddleware is before  # nothing swapped
    message = str(refused.value)
    assert "written for BentoML 1.4.40, and this is BentoML 1.4.41" in message
    for what in ("traffic.py", "base_app.py", "instruments.py", "_bentoml_impl/server/app.py",
                 "_bentoml_impl/worker/service.py", "tests/test_bentoml_fixes.py"):
        assert what in message
