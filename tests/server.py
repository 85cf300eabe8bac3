"""Start the real service (`bentoml serve service:Grok3D`) as a subprocess on a free port, for tests.

Every process the server starts carries a token of its own in its environment (`MARKER`), so a test finds them
all, even those whose parent has died: `kill9()` kills the whole tree with SIGKILL, as a crash of the machine
would, and `stop()` leaves none behind, whatever a test did. A process group would not do: BentoML's workers and
the Blender workers each run in a session of their own.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import MutableMapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
MARKER = "GROK3D_TEST_SERVER"  # in the environment of every process of one test server: its token
# The test stage sets (tests/stages.py) whose 3D stage is the TripoSR service that service.py passes them; every
# other set ignores it.
STAGES_CALLING_TRIPOSR = ("tests.stages:real_model",)


class _ReadyElsewhere(BaseHTTPRequestHandler):
    """GET /readyz: 200, the one thing asked of a TripoSR service elsewhere by a server whose test stages never call
    it (BentoML's /readyz asks each dependency with a URL, _bentoml_impl/server/app.py:460). Anything else: 404."""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/readyz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@functools.cache
def unused_triposr_url() -> str:
    """Where a server whose test stages never call the TripoSR service says that service is (see Server's
    `triposr_worker`): a server in this process, for as long as it runs, that answers readiness and nothing else."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ReadyElsewhere)
    threading.Thread(target=server.serve_forever, name="ready-triposr-elsewhere", daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


# What in-process servers (tests/inprocess.py) changed in os.environ for their lifetime: for each, the values the
# names had before, in the order they were lent. Their settings are theirs alone: a `bentoml serve` started meanwhile
# must not inherit them (it did: a module's in-process server with a 4 s retention had another server's jobs swept).
_LENT: list[dict[str, str | None]] = []


def lend_environment(env: dict[str, str]) -> dict[str, str | None]:
    """Set `env` in os.environ until `take_back_environment(returned)`; servers started meanwhile do not see it."""
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    _LENT.append(saved)
    return saved


def take_back_environment(saved: dict[str, str | None]) -> None:
    """Undo a `lend_environment` (lent environments are taken back newest first, as fixtures end)."""
    del _LENT[next(i for i, lent in enumerate(_LENT) if lent is saved)]  # by identity: two may be equal
    _put_back(os.environ, saved)


def own_environment() -> dict[str, str]:
    """os.environ without what in-process servers lent to it: the environment a server process starts from."""
    env = dict(os.environ)
    for saved in reversed(_LENT):
        _put_back(env, saved)
    return env


def _put_back(env: MutableMapping[str, str], saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value


# Launches of one server when the last lost a race for a port (Server.start).
PORT_RACE_TRIES = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, *, service: str = "service:Grok3D",
                 log_name: str = "server.log", ready: str = "/livez", command: list[str] | None = None,
                 triposr_worker: bool | None = None) -> None:
        """`triposr_worker`: whether `bentoml serve` starts the TripoSR service's worker beside the API's. By
        default it does unless test stages other than STAGES_CALLING_TRIPOSR stand in for the real ones: those
        never call the TripoSR service (their 3D stage and its readiness are their own), so the server names a
        TripoSR service elsewhere (GROK3D_TRIPOSR_URL, `unused_triposr_url`) and BentoML starts no worker for it, a
        process start saved. Tests that look at that worker itself ask for it."""
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.service = service
        self.log_path = data_dir / log_name
        self.env = {
            **own_environment(),
            "GROK3D_DATA_DIR": str(data_dir),
            "BENTOML_HOME": str(data_dir / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "true",
            # BentoML's unix sockets live in TMPDIR, and socket paths must stay under ~100 characters.
            "TMPDIR": (short_tmp := tempfile.mkdtemp(prefix="g3d-")),
            "GROK3D_TMP_DIR": short_tmp,  # what `make serve` and `make dev` use as TMPDIR
            "PORT": str(self.port),
            MARKER: uuid.uuid4().hex,
            **(env or {}),
        }
        stages = self.env.get("GROK3D_STAGES")
        if stages:  # Settings refuses test stages without this consent
            self.env.setdefault("GROK3D_ALLOW_TEST_STAGES", "1")
        if triposr_worker is None:
            triposr_worker = not stages or stages in STAGES_CALLING_TRIPOSR
        if not triposr_worker:
            self.env.setdefault("GROK3D_TRIPOSR_URL", unused_triposr_url())
        self.proc: subprocess.Popen | None = None
        self.ready = ready  # the path that answers 200 once the server is up
        self.command = command or [sys.executable, "-m", "bentoml", "serve", service, "--port", str(self.port),
                                   "--host", "127.0.0.1"]

    def start(self, *, timeout_s: float = 120.0) -> "Server":
        attempt = 1
        while True:
            began = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.launch()
            try:
                self.wait_for(self.ready, timeout_s)
                return self
            except RuntimeError:  # it exited: perhaps beaten to a port, then it goes again on another
                self.stop()
                if attempt == PORT_RACE_TRIES or not self._lost_a_port_race(began):
                    raise
            except BaseException:  # `with Server(...)` never reaches __exit__: stop it here, or it outlives the test
                self.stop()
                raise
            attempt += 1
            self._move_to(free_port())

    def _lost_a_port_race(self, log_offset: int) -> bool:
        """Whether the launch that wrote the log from `log_offset` on died binding a port another process took
        first. A free port is found by binding port 0 and letting go; by the time `bentoml serve` binds it (ours for
        HTTP, the ones BentoML picks the same way for circus's endpoints), a server starting beside it may have."""
        with open(self.log_path, "rb") as log:
            log.seek(log_offset)
            return b"Address already in use" in log.read()

    def _move_to(self, port: int) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env["PORT"] = str(port)
        if "--port" in self.command[:-1]:
            self.command[self.command.index("--port") + 1] = str(port)

    def launch(self) -> "Server":
        """Start the process without waiting for it (several servers then start side by side)."""
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.command, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
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

    def processes(self) -> list[psutil.Process]:
        """Every live process this server started, at any depth, orphaned or not (zombies have ended)."""
        token = self.env[MARKER]
        found = []
        for p in psutil.process_iter():
            try:
                if p.environ().get(MARKER) == token and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return found

    def worker(self, service_name: str) -> psutil.Process:
        """The live BentoML worker of `service_name` ("grok3d" or "triposr")."""
        [worker] = [p for p in self.processes() if _arg(p, "--service-name") == service_name]
        return worker

    def _tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid) if self.proc is not None else None
            return [root, *root.children(recursive=True)] if root is not None else []
        except psutil.NoSuchProcess:
            return []

    def _kill_all(self) -> None:
        """SIGKILL to the launched process first (circus cannot start a worker again), its tree as it stands, then
        whatever else carries the token (started meanwhile, or orphaned earlier)."""
        for p in [*self._tree(), *self.processes()]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        _, alive = psutil.wait_procs(self.processes(), timeout=10)
        assert not alive, f"still alive after SIGKILL: {alive}"

    def kill9(self) -> None:
        """SIGKILL the whole process tree, as a power cut or OOM kill would: no shutdown code runs."""
        assert self.proc is not None
        self._kill_all()
        self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM to the launched process's group, as Ctrl-C in a terminal would reach it (`bentoml serve` stops
        its workers); after 15 s, and for anything of the server still alive then, SIGKILL."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
            psutil.wait_procs(self.processes(), timeout=10)
        self._kill_all()
        if self.proc is not None:
            self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _arg(p: psutil.Process, flag: str) -> str | None:
    args = p.cmdline()
    return args[args.index(flag) + 1] if flag in args[:-1] else None


def wait_job(client: httpx.Client, job_id: str, *, timeout_s: float = 60.0, until=("complete", "error"),
             interval_s: float = 0.1, stages: list[str] | None = None) -> dict:
    """Poll a job's status until it is in `until`; `stages` collects the stage of every answer seen."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        answer = client.get(f"/api/status/{job_id}")
        assert answer.status_code == 200, f"GET /api/status/{job_id}: {answer.status_code} {answer.text}"
        body = answer.json()
        if stages is not None:
            stages.append(body["stage"])
        if body["status"] in until:
            return body
        time.sleep(interval_s)
    raise TimeoutError(f"job {job_id} still {body}")
