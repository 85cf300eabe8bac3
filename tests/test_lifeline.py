"""pipeline.lifeline on real processes: a parent started by the test spawns a child that calls hold(); the test
kills the parent with SIGKILL and watches the child. Without hold() every child here would sleep for two minutes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import lifeline

ROOT = Path(__file__).resolve().parents[1]

# argv: seconds to sleep before hold() (a worker's imports), mechanism, file to write once held.
CHILD = """
import os, sys, time
time.sleep(float(sys.argv[1]))
from pipeline import lifeline
lifeline.hold(mechanism=sys.argv[2])
with open(sys.argv[3], "w") as f:
    f.write(os.environ[lifeline.PARENT_ENV])
time.sleep(120)
"""

# argv: the child's argv; with "--name-self" the child's environment names this process as its parent.
PARENT = """
import os, subprocess, sys
from pipeline import lifeline
env = lifeline.child_env(os.environ) if sys.argv[1] == "--name-self" else dict(os.environ)
child = subprocess.Popen([sys.executable, "-c", sys.argv[2], *sys.argv[3:]], env=env)
print(child.pid, flush=True)
child.wait()
"""


def gone(pid: int) -> bool:
    """Ended: no such process, or a zombie that whoever adopted it has not reaped yet."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def wait_until(check, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return check()


def start(tmp_path: Path, *, delay_s: float = 0.0, mechanism: str = "auto", name_self: bool = True,
          env: dict[str, str] | None = None) -> tuple[subprocess.Popen, int, Path]:
    """The parent process and its child's pid; the child writes `held` once hold() returned."""
    held = tmp_path / "held"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, "--name-self" if name_self else "--plain", CHILD, str(delay_s), mechanism,
         str(held)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, stdout=subprocess.PIPE,
        stderr=open(tmp_path / "stderr", "wb"))
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    return parent, child, held


@pytest.fixture
def cleanup():
    pids: list[int] = []
    yield pids
    for pid in pids:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


def kill(parent: subprocess.Popen) -> None:
    parent.kill()
    parent.wait(10)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux only")
def test_a_child_dies_with_its_parent_even_when_it_cannot_run(tmp_path, cleanup):
    parent, child, held = start(tmp_path)
    cleanup.append(child)
    assert wait_until(held.exists, 30)
    assert held.read_text() == str(child)  # it names itself as the parent of what it starts
    os.kill(child, signal.SIGSTOP)  # stands for a worker deep in C code: no thread of it can run
    kill(parent)
    assert wait_until(lambda: gone(child), 2), "the child outlived its parent"


def test_a_child_whose_parent_died_before_hold_ends_at_once(tmp_path, cleanup):
    parent, child, held = start(tmp_path, delay_s=1.5)  # the parent dies while the child is still 'importing'
    cleanup.append(child)
    parent.kill()  # and stays a zombie, not yet reaped, as `bentoml serve` does until its launcher waits for it
    assert not gone(child)
    assert wait_until(lambda: gone(child), 10), "the orphan kept running after hold()"
    parent.wait(10)
    assert not held.exists()
    assert f"process {child} stops: its parent {parent.pid} ended before it was tied to it" in (
        tmp_path / "stderr").read_text()


def test_a_parent_named_through_an_outsider_is_not_followed(tmp_path, cleanup):
    # The variable names this (live) test process, but the child's parent is the plain process in between: the
    # child runs, and does not die with that outsider either.
    parent, child, held = start(tmp_path, name_self=False, env={lifeline.PARENT_ENV: str(os.getpid())})
    cleanup.append(child)
    assert wait_until(held.exists, 30)
    kill(parent)
    time.sleep(1.5)
    assert not gone(child)


def test_the_polling_watch_ends_a_child_whose_parent_died(tmp_path, cleanup):
    parent, child, held = start(tmp_path, mechanism="poll")
    cleanup.append(child)
    assert wait_until(held.exists, 30)
    kill(parent)
    assert wait_until(lambda: gone(child), 3 * lifeline.POLL_S + 1), "the child outlived its parent"
