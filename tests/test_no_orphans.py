"""A hard kill leaves no orphans (pipeline/lifeline.py): `kill -9` of `bentoml serve` alone, or of its API worker
alone, and every process under it ends within seconds, the Blender workers included.

The Blender workers are stopped (SIGSTOP) before the kill: a worker deep in a bake does not read its channel, so it
would not notice the pool's process die, and a stopped one cannot do anything at all. Only the kernel's
parent-death signal ends it; without it every process checked here would run (or wait) for good."""

from __future__ import annotations

import os
import signal
import time

import psutil

from tests.server import Server

ENV = {"GROK3D_STAGES": "tests.stages:real_convert", "XAI_API_KEY": "test-key", "GROK3D_BLENDER_WORKERS": "2",
       "GROK3D_BAKE_SIZE": "64"}
DEADLINE_S = 10.0


def blender_workers(api_worker: psutil.Process) -> list[psutil.Process]:
    return [p for p in api_worker.children() if "converters.blender.worker" in p.cmdline()]


def still_alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def wait_gone(processes: list[psutil.Process], timeout_s: float = DEADLINE_S) -> list[psutil.Process]:
    deadline = time.monotonic() + timeout_s
    while (alive := still_alive(processes)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def started(srv: Server) -> tuple[psutil.Process, psutil.Process, list[psutil.Process]]:
    """The TripoSR worker, the API worker and its Blender workers, once all are up (the pool starts before the
    API answers)."""
    api = srv.worker("grok3d")
    blender = blender_workers(api)
    assert len(blender) == 2, [p.cmdline() for p in api.children()]
    return srv.worker("triposr"), api, blender


def freeze(processes: list[psutil.Process]) -> None:
    for p in processes:
        p.suspend()  # SIGSTOP


def test_kill_9_of_bentoml_serve_ends_every_process_under_it(tmp_path):
    srv = Server(tmp_path, ENV, ready="/readyz", triposr_worker=True).start()
    try:
        triposr, api, blender = started(srv)
        everything = srv.processes()
        assert {p.pid for p in everything} == {srv.proc.pid, triposr.pid, api.pid, *(p.pid for p in blender)}
        freeze(blender)
        os.kill(srv.proc.pid, signal.SIGKILL)  # `bentoml serve` alone
        srv.proc.wait(10)
        srv.proc = None  # so stop() below only kills what a failure left
        alive = wait_gone(everything)
        assert not alive, f"alive {DEADLINE_S:g} s after the kill: {[p.cmdline() for p in alive]}"
        assert not srv.processes()  # nor anything started meanwhile
    finally:
        srv.stop()


def test_kill_9_of_the_api_worker_ends_its_blender_workers_and_the_service_recovers(tmp_path):
    with Server(tmp_path, ENV, ready="/readyz", triposr_worker=True) as srv:
        triposr, api, blender = started(srv)
        freeze(blender)
        api.kill()
        alive = wait_gone([api, *blender])
        assert not alive, f"alive {DEADLINE_S:g} s after the kill: {[p.cmdline() for p in alive]}"
        # circus starts a new API worker; its own pool comes up, and the TripoSR worker was not touched.
        srv.wait_for("/readyz", timeout_s=120)
        _, new_api, new_blender = started(srv)
        assert new_api.pid != api.pid and not {p.pid for p in new_blender} & {p.pid for p in blender}
        assert srv.worker("triposr").pid == triposr.pid
