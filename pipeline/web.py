"""The demo page: `/` serves web/index.html, `/static/<name>` its script, its style and <model-viewer>.

Only the files named in STATIC are served, so web/package.json, web/node_modules and the rest of the repository
stay private. <model-viewer> comes from the npm package installed in web/node_modules (`npm ci --prefix web`); when
it is missing its route answers 404 and the page says in words that the 3D viewer is not installed.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from pipeline.responses import file_response

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
MODEL_VIEWER_DIST = Path("node_modules/@google/model-viewer/dist/model-viewer.min.js")

# URL name -> (path inside web/, media type). The model-viewer bundle includes three.js, so it is the only file
# the browser needs from node_modules.
STATIC: dict[str, tuple[Path, str]] = {
    "app.js": (Path("app.js"), "text/javascript; charset=utf-8"),
    "style.css": (Path("style.css"), "text/css; charset=utf-8"),
    "model-viewer.min.js": (MODEL_VIEWER_DIST, "text/javascript; charset=utf-8"),
}


def _serve(request: Request, path: Path, media_type: str) -> Response:
    """`no-cache` makes the browser revalidate on every load, so a deploy shows at once, while an unchanged 1 MB
    viewer costs a 304 and not a download."""
    response = file_response(request, path, media_type)
    if response is None:
        raise HTTPException(404)
    return response


def mount_web(app: FastAPI, web_dir: Path = WEB_DIR) -> None:
    """Add the page's routes to `app`; they stay out of the OpenAPI schema, which documents the API only."""

    @app.get("/", include_in_schema=False)
    async def index(request: Request) -> Response:
        return _serve(request, web_dir / "index.html", "text/html; charset=utf-8")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str, request: Request) -> Response:
        entry = STATIC.get(name)
        if entry is None:
            raise HTTPException(404)
        return _serve(request, web_dir / entry[0], entry[1])


def mount_bentoml_ui(app: FastAPI, index_html: Path, path: str = "/bentoml") -> None:
    """Serve BentoML's Swagger UI page at `path`, since our page owns "/".

    The page loads `./static_content/...` and `./docs.json`; from a path with no trailing slash those resolve
    to /static_content and /docs.json, which BentoML itself still serves. The caller (service.py) passes the
    page's file, so this module needs nothing from BentoML.
    """

    @app.get(path, include_in_schema=False)
    async def bentoml_ui(request: Request) -> Response:
        return _serve(request, index_html, "text/html; charset=utf-8")
