"""Start the real service (`bentoml serve service:Grok3D`) as a subprocess on a free port, for tests.

The process runs in its own session so a test can kill the whole tree with SIGKILL, as a crash would.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, *, service: str = "service:Grok3D",
                 log_name: str = "server.log", ready: str = "/livez", command: list[str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.service = service
        self.log_path = data_dir / log_name
        self.env = {
            **os.environ,
            "GROK3D_DATA_DIR": str(data_dir),
            "BENTOML_HOME": str(data_dir / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "true",
            # BentoML's unix sockets live in TMPDIR, and socket paths must stay under ~100 characters.
            "TMPDIR": (short_tmp := tempfile.mkdtemp(prefix="g3d-")),
            "GROK3D_TMP_DIR": short_tmp,  # what `make serve` and `make dev` use as TMPDIR
            "PORT": str(self.port),
            **(env or {}),
        }
        if "GROK3D_STAGES" in self.env:  # Settings refuses test stages without this consent
            self.env.setdefault("GROK3D_ALLOW_TEST_STAGES", "1")
        self.proc: subprocess.Popen | None = None
        self.ready = ready  # the path that answers 200 once the server is up
        self.command = command or [sys.executable, "-m", "bentoml", "serve", service, "--port", str(self.port),
                                   "--host", "127.0.0.1"]

    def start(self, *, timeout_s: float = 120.0) -> "Server":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        self.wait_for(self.ready, timeout_s)
        return self

    def wait_for(self, path: str, timeout_s: float = 90.0, status: int = 200) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + path, timeout=2).status_code == status:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"{path} did not answer {status} within {timeout_s} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _tree(self) -> list[psutil.Process]:
        # BentoML's workers run in sessions of their own, so a process group does not reach them.
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill9(self) -> None:
        """SIGKILL the whole process tree, as a power cut or OOM kill would: no shutdown code runs."""
        assert self.proc is not None
        for p in self._tree():
            p.kill()
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is None:
            return
        tree = self._tree()
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        except ProcessLookupError:
            pass
        _, alive = psutil.wait_procs(tree, timeout=10)
        for p in alive:
            p.kill()
        self.proc = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_job(client: httpx.Client, job_id: str, *, timeout_s: float = 60.0, until=("complete", "error")) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        body = client.get(f"/api/status/{job_id}").json()
        if body["status"] in until:
            return body
        time.sleep(0.1)
    raise TimeoutError(f"job {job_id} still {body}")
