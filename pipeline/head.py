"""HEAD for every GET route: the request is routed and answered as a GET, and the body is dropped on the way out.

RFC 9110 §9.3.2: "The HEAD method is identical to GET except that the server MUST NOT send content in the
response", and the server SHOULD send the header fields it would have sent for the GET (Content-Length included),
with the same status. FastAPI routes declared with GET do not accept HEAD, so without this Safari, `curl -I` and
link checkers would meet a 405.

Two parts, both installed by `serve_head(app)`:
- `HeadAsGet`, the outermost middleware, answers HEAD through the GET route and drops the body. File responses
  need not read the file at all: `is_head(scope)` tells them the client asked for HEAD (pipeline/responses.py).
- `HeadRoute` makes the app's router report a full match for HEAD wherever GET would match. A host that mounts
  this app and asks it which paths it serves (BentoML's PassiveMount) would otherwise send HEAD / to its own
  index page, since our GET-only routes match HEAD only partially.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.datastructures import URLPath
from starlette.routing import BaseRoute, Match, NoMatchFound, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Set in the scope of a HEAD request that is being answered as a GET.
HEAD_KEY = "grok3d.head"


def is_head(scope: Scope) -> bool:
    """True when the client sent HEAD, even though the routes see GET."""
    return bool(scope.get(HEAD_KEY)) or scope.get("method") == "HEAD"


class HeadAsGet:
    """ASGI middleware: HEAD is served by the GET route of the same path, without its body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        scope = {**scope, "method": "GET", HEAD_KEY: True}
        ended = False

        async def send_headers_only(message: Message) -> None:
            nonlocal ended
            kind = message["type"]
            if kind == "http.response.start":
                await send(message)  # status and headers as for GET: Content-Length stays the GET's length
            elif kind == "http.response.pathsend" or (kind == "http.response.body" and not message.get("more_body")):
                if not ended:
                    ended = True
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            # Any other body chunk is the GET's content: dropped.

        await self.app(scope, receive, send_headers_only)


class HeadRoute(BaseRoute):
    """Matches HEAD wherever another route of `router` matches GET, and serves it as HEAD of that GET."""

    def __init__(self, router: Router) -> None:
        self.router = router

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return Match.NONE, {}
        as_get = {**scope, "method": "GET"}
        for route in self.router.routes:  # read at each request: routes added after serve_head count too
            if route is not self and route.matches(as_get)[0] is Match.FULL:
                return Match.FULL, {}
        return Match.NONE, {}

    def url_path_for(self, name: str, /, **path_params: object) -> URLPath:
        raise NoMatchFound(name, path_params)  # no name of its own to build a URL for

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Reached only without the middleware in front (HeadAsGet turns HEAD into GET before routing).
        await HeadAsGet(self.router)(scope, receive, send)


def serve_head(app: Starlette) -> None:
    """Every GET route of `app`, present and future, answers HEAD (call once, after the app's other middleware)."""
    app.router.routes.append(HeadRoute(app.router))
    app.add_middleware(HeadAsGet)
