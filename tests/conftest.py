"""Fixtures shared by several test modules: one PostgreSQL server and one S3 server per test session, each started
when a test first asks for it, and the job store's two engines as a parameter."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipeline.db import sqlite_url
from tests.postgres import PostgresServer
from tests.s3 import S3Server

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
