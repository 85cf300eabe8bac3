"""Shared by every test module:
- the `slow` marker: `make test-fast` (pytest -m "not slow") runs the rest in under two minutes for the edit-test
  loop; `make test` runs everything. Slow is what starts a real `bentoml serve`, Blender, a browser, PostgreSQL's
  replicas or an official-size model: whole modules, listed here (one place, so a new module of that kind is marked
  by adding its name);
- one PostgreSQL server and one S3 server per test session (per worker under `make test`), each started when a test
  first asks for it, and the job store's two engines as a parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.db import sqlite_url
from tests.postgres import PostgresServer
from tests.s3 import S3Server

SLOW_MODULES = {
    # a real `bentoml serve` (seconds to start, two worker processes)
    "test_bentoml_fixes", "test_http", "test_no_orphans", "test_permissions", "test_service_config",
    "test_triposr_service", "test_triposr_standin", "test_full_pipeline", "test_lifecycle",
    "test_replicas", "test_remote_triposr", "test_assets", "test_upload", "test_keys", "test_keys_page",
    # a real browser
    "test_page",
    # real Blender
    "test_blender_convert", "test_blender_examples", "test_blender_pool", "test_blender_texbake", "test_formats",
    # the official-size model (419 M parameters)
    "test_triposr_official", "test_triposr_precision",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.module is not None and item.module.__name__.rpartition(".")[2] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


ENGINES = ("sqlite", "postgresql")


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    server = S3Server().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=ENGINES)
def new_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], str]:
    """Makes the URL of a new, empty job store on the parameter's engine: an SQLite file in the test's folder, or
    a new database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        count = iter(range(1000))
        return lambda: sqlite_url(tmp_path / f"grok3d-{next(count)}.db")
    server: PostgresServer = request.getfixturevalue("postgres")
    return server.new_database


@pytest.fixture
def store_url(new_store_url: Callable[[], str]) -> str:
    """One new, empty job store on each engine."""
    return new_store_url()
