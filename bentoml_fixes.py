"""Workarounds for BentoML 1.4.40 on the API's hot path, installed by service.py in every worker.

Status polls are what clients send most (every client, every second or so). Two of BentoML's middlewares cost more
than the route itself:
- Its TimeoutMiddleware schedules a timer with `loop.call_later` and a future for every request and never cancels
  them, so each request leaves both alive for the whole timeout (60 s): at 5,000 requests/s that is hundreds of
  thousands of live objects, and the garbage collector's full passes over them stalled every request for up to
  250 ms. `FirstByteTimeout` has the same contract (504 `{"error": ...}` when no response has started in time, no
  limit once it has) and cancels its timer as soon as the response starts or the request ends.
- Its metrics middleware counts every request in Prometheus' multiprocess files, skip_paths or not (they only skip
  the last-request timestamp), about a fifth of a poll's cost. `skipping_metrics` makes skip_paths skip it all.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from starlette.responses import JSONResponse

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]


class FirstByteTimeout:
    def __init__(self, app: Any, timeout: float) -> None:
        self.app = app
        self.timeout = timeout

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
        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http" and scope["path"].startswith(tuple(self.skip_paths)):
                await self.app(scope, receive, send)
                return
            await super().__call__(scope, receive, send)

    return SkippingMetrics


def install() -> None:
    """Put both in BentoML's place (its app factory looks them up in these modules when it builds each app)."""
    import bentoml._internal.server.http.instruments as instruments
    import bentoml._internal.server.http.traffic as traffic

    traffic.TimeoutMiddleware = FirstByteTimeout
    if not getattr(instruments.RunnerTrafficMetricsMiddleware, "_grok3d_skipping", False):
        instruments.RunnerTrafficMetricsMiddleware = skipping_metrics(instruments.RunnerTrafficMetricsMiddleware)
        instruments.RunnerTrafficMetricsMiddleware._grok3d_skipping = True
