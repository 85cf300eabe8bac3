"""The FastAPI app of pipeline/ served in the test process: uvicorn on a loopback port, in a thread, with test stages.

For API-contract tests that gain nothing from `bentoml serve` (which costs seconds to start and two worker
processes): the routes, their bodies and codes, the store, the orchestrator are the same code either way. What
needs BentoML itself (its health routes, metrics, batching, the dependency between the services, kill -9) stays
with tests/server.py's real server. Same interface as tests.server.Server: `url`, `port`, `data_dir`, `log()`.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import uvicorn

from pipeline.api import create_app
from pipeline.backends import default_stages
from pipeline.settings import Settings
from tests.server import free_port, lend_environment, take_back_environment

APP_LOGGER = logging.getLogger("grok3d")


class AppServer:
    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, *, log_name: str = "server.log") -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / log_name
        # Settings and the test stages read the environment: set it for the server's lifetime (lent: a `bentoml
        # serve` started meanwhile does not inherit it, tests/server.py), then restore it.
        self.env = {"GROK3D_DATA_DIR": str(data_dir), **(env or {})}
        if "GROK3D_STAGES" in self.env:
            self.env.setdefault("GROK3D_ALLOW_TEST_STAGES", "1")
        self._saved: dict[str, str | None] | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._handler: logging.Handler | None = None
        self._level = logging.NOTSET

    def start(self, *, timeout_s: float = 30.0) -> AppServer:
        self._saved = lend_environment(self.env)
        self._handler = logging.FileHandler(self.log_path)
        self._handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] [%(name)s] %(message)s"))
        logging.getLogger().addHandler(self._handler)
        # The app's own records at INFO, as `bentoml serve` logs them; the root logger's level stays as it was (at
        # INFO, every httpx request of every later test went into pytest's reports).
        self._level = APP_LOGGER.level
        APP_LOGGER.setLevel(logging.INFO)
        settings = Settings()
        settings.data_dir = settings.data_dir.resolve()
        app = create_app(lambda s: default_stages(s, None), settings)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None, lifespan="on",
                                access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name=f"app-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the app did not start:\n{self.log()[-3000:]}")
            time.sleep(0.02)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(30)
        if self._handler is not None:
            APP_LOGGER.setLevel(self._level)
            logging.getLogger().removeHandler(self._handler)
            self._handler.close()
        if self._saved is not None:
            take_back_environment(self._saved)
        self._server = self._thread = self._handler = self._saved = None

    def __enter__(self) -> AppServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
