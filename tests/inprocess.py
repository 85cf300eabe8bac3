"""The FastAPI app of pipeline/ served in the test process: uvicorn on a loopback port, in a thread, with test stages.

For API-contract tests that gain nothing from `bentoml serve` (which costs seconds to start and two worker
processes): the routes, their bodies and codes, the store, the orchestrator are the same code either way. What
needs BentoML itself (its health routes, metrics, batching, the dependency between the services, kill -9) stays
with tests/server.py's real server. Same interface as tests.server.Server: `url`, `port`, `data_dir`, `log()`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import uvicorn

from pipeline.api import create_app
from pipeline.backends import default_stages
from pipeline.settings import Settings
from tests.server import free_port


class AppServer:
    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, *, log_name: str = "server.log") -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / log_name
        # Settings and the test stages read the environment: set it for the server's lifetime, then restore it.
        self.env = {"GROK3D_DATA_DIR": str(data_dir), **(env or {})}
        if "GROK3D_STAGES" in self.env:
            self.env.setdefault("GROK3D_ALLOW_TEST_STAGES", "1")
        self._saved: dict[str, str | None] = {}
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._handler: logging.Handler | None = None

    def start(self, *, timeout_s: float = 30.0) -> AppServer:
        self._saved = {name: os.environ.get(name) for name in self.env}
        os.environ.update(self.env)
        self._handler = logging.FileHandler(self.log_path)
        self._handler.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] [%(name)s] %(message)s"))
        logging.getLogger().addHandler(self._handler)
        logging.getLogger().setLevel(logging.INFO)
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
            logging.getLogger().removeHandler(self._handler)
            self._handler.close()
        for name, value in self._saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._server = self._thread = self._handler = None

    def __enter__(self) -> AppServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
