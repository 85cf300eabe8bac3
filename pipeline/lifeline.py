"""A process grok3d starts ends when the grok3d process that started it dies, `kill -9` included.

Without this, a `kill -9` of `bentoml serve` leaves its workers running for good (BentoML issue #4193): the TripoSR
worker keeps its model (and GPU memory), the API worker keeps running jobs, its Blender workers stay, and a service
restarted on the same data folder competes with them. Nothing in a process that is killed can stop its children,
so each child watches its parent instead:

- The spawner names itself in the child's environment (`PARENT_ENV`); the child calls `hold()` early. `hold()` then
  names the child itself as the parent of whatever it starts, so a tree of grok3d processes ties itself level by
  level (`bentoml serve` -> its workers -> the API worker's Blender workers; service.py says how BentoML's
  workers get the variable).
- On Linux the kernel does the watching: prctl(PR_SET_PDEATHSIG, SIGKILL) (prctl(2)) makes it send SIGKILL to the
  child as its parent ends. Nothing in the child has to run for that: a worker deep in C code, holding the GIL or
  stopped still dies at once. SIGKILL rather than SIGTERM because that is what the job store is built to survive
  (an accepted job resumes after any death), and a signal that can be handled can be delayed by a handler waiting
  on the peer that just died.
- The signal only covers a parent that dies after prctl returns. A parent that died earlier (while the child was
  still importing: seconds for a BentoML worker) has already left the child to a reaper, so `hold()` compares
  getppid() with the named parent after arming and ends the child at once if they differ and the named parent is
  gone. (The kernel reparents the children before it sends the signal, so either the signal comes or getppid()
  has changed.)
- Elsewhere (macOS, for development) a daemon thread polls getppid(). It needs the GIL, so a worker stuck in C code
  holding it ends only when that code returns: this is why Linux uses the kernel's signal and not the thread.

Caveat (prctl(2)): the "parent" is the *thread* that forked the child, not its process. A long-lived child must be
started from a thread that lives as long as it should: circus starts BentoML's workers from the main thread of
`bentoml serve`; the Blender pool starts its workers from the API worker's event loop, which owns them anyway.

This module knows nothing of BentoML and uses only the standard library: the Blender workers import it too.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import Literal

PARENT_ENV = "GROK3D_PARENT_PID"
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
POLL_S = 0.5

Mechanism = Literal["auto", "pdeathsig", "poll"]
log = logging.getLogger("grok3d.lifeline")
_held = False


def child_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` for a child process that calls `hold()`: it names this process as the child's parent."""
    return {**env, PARENT_ENV: str(os.getpid())}


def hold(*, mechanism: Mechanism = "auto") -> None:
    """Die with the grok3d process that started this one (named by PARENT_ENV), and be named in turn as the parent
    of the processes this one starts. Call it early; a second call does nothing."""
    global _held
    if _held:
        return
    _held = True
    parent = _named_parent()
    if parent is not None:
        _tie(parent, _resolve(mechanism))
    os.environ[PARENT_ENV] = str(os.getpid())


def _resolve(mechanism: Mechanism) -> Literal["pdeathsig", "poll"]:
    if mechanism == "auto":
        return "pdeathsig" if sys.platform.startswith("linux") else "poll"
    return mechanism


def _named_parent() -> int | None:
    raw = os.environ.get(PARENT_ENV, "")
    if not raw.isdigit() or int(raw) == os.getpid():  # absent, garbled, or this very process after an exec
        return None
    return int(raw)


def _tie(parent: int, mechanism: Literal["pdeathsig", "poll"]) -> None:
    if mechanism == "pdeathsig":
        _set_pdeathsig(signal.SIGKILL)  # armed before getppid() is read: see the module's docstring
    if os.getppid() != parent:
        if _alive(parent):
            # The variable came through a process outside grok3d (e.g. a test that imported service.py, then
            # `make dev`): the named process is not ours to follow, and our real parent is not ours to judge.
            if mechanism == "pdeathsig":
                _set_pdeathsig(0)
            log.debug("%s=%d names a live process that is not this one's parent: not tied", PARENT_ENV, parent)
            return
        _die(f"its parent {parent} ended before it was tied to it")
    if mechanism == "poll":
        threading.Thread(target=_watch, args=(parent,), name="grok3d-lifeline", daemon=True).start()


def _set_pdeathsig(signum: int) -> None:
    """prctl(PR_SET_PDEATHSIG, signum): 0 clears it. Linux only."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")


def _alive(pid: int) -> bool:
    """Whether `pid` still runs. A zombie has ended (its children were reparented before it became one): on Linux
    /proc says so, where kill(pid, 0) would still succeed."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except FileNotFoundError:
        return False
    except OSError:
        pass  # no /proc (macOS): ask the kernel
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(POLL_S)
    _die(f"its parent {parent} ended")


def _die(why: str) -> None:
    # The same end as the kernel's signal: no cleanup, nothing that could wait on the dead parent.
    os.write(2, f"grok3d: process {os.getpid()} stops: {why}\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)
