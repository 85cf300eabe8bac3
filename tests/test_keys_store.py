"""API keys, their rate limit and their quotas in-process, on both engines (real SQLite files, a real PostgreSQL
server): pipeline/keys.py, pipeline/ratelimit.py (a `limits` storage, driven by the library's own strategy) and
pipeline/quotas.py."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from limits import RateLimitItemPerMinute, RateLimitItemPerSecond
from limits.strategies import FixedWindowRateLimiter
from sqlalchemy import event, func, select

from pipeline.db import api_keys
from pipeline.jobs import JobStore, Lease, QueueFull
from pipeline.keys import DEFAULT_JOBS_PER_DAY, DEFAULT_MAX_IN_FLIGHT, DEFAULT_RPM, KEY_RE, KeyStore, KeyStoreError
from pipeline.quotas import LimitExceeded, Quotas
from pipeline.ratelimit import KeyRevoked, RequestLimiter, StoreStorage
from tests.postgres import sent_statements


@pytest.fixture()
def store(store_url):
    s = JobStore(store_url)
    yield s
    s.close()


def test_a_key_is_shown_once_and_stored_only_as_its_hash(store):
    keys = KeyStore(store)
    row, key = keys.create("alice")
    assert KEY_RE.fullmatch(key) and key.startswith("g3d_")
    assert (row.rpm, row.max_in_flight, row.jobs_per_day) == (DEFAULT_RPM, DEFAULT_MAX_IN_FLIGHT,
                                                              DEFAULT_JOBS_PER_DAY)
    with store.read() as conn:
        assert conn.execute(select(api_keys.c.name, func.length(api_keys.c.key_hash))).all() == [("alice", 64)]
        stored = " ".join(str(value) for row in conn.execute(select(api_keys)).all() for value in row)
    assert key not in stored and key[4:] not in stored
    if store.engine.dialect.name == "sqlite":  # the file's bytes too: the database and its WAL
        store.close()
        path = Path(store.engine.url.database)
        raw = b"".join(p.read_bytes() for p in path.parent.glob(path.name + "*"))
        assert key.encode() not in raw and key[4:].encode() not in raw


def test_find_create_list_revoke(store):
    keys = KeyStore(store)
    alice, alice_key = keys.create("alice", rpm=10, max_in_flight=2, jobs_per_day=3)
    bob, bob_key = keys.create("bob")
    assert alice_key != bob_key
    with store.read() as conn:
        assert keys.find(conn, alice_key) == alice
        assert keys.find(conn, bob_key) == bob
        assert keys.find(conn, alice_key[:-1] + ("A" if alice_key[-1] != "A" else "B")) is None
        assert keys.find(conn, "not-a-key") is None
    assert [k.name for k in keys.list()] == ["alice", "bob"]
    revoked = keys.revoke("alice")
    assert revoked.revoked_at is not None and not revoked.active
    assert keys.revoke("alice").revoked_at == revoked.revoked_at  # once is enough
    with store.read() as conn:
        assert keys.find(conn, alice_key) is None
        assert keys.find(conn, bob_key) == bob
    with pytest.raises(KeyStoreError, match="exists already"):
        keys.create("alice")
    with pytest.raises(KeyStoreError, match="no key named"):
        keys.revoke("carol")
    for bad in ("", "-x", "a b", "x" * 65, "é"):
        with pytest.raises(KeyStoreError, match="invalid key name"):
            keys.create(bad)
    with pytest.raises(KeyStoreError, match="--rpm must be at least 1"):
        keys.create("zero", rpm=0)


def test_the_store_is_a_limits_storage_for_the_librarys_fixed_window(store):
    """The library's own strategy over StoreStorage, outside any bound transaction: hit, test, window stats,
    expiry, clear, reset."""
    storage = StoreStorage(store)
    assert storage.check()
    limiter = FixedWindowRateLimiter(storage)
    item = RateLimitItemPerSecond(3)
    assert [limiter.hit(item, "k") for _ in range(5)] == [True, True, True, False, False]
    assert not limiter.test(item, "k")
    reset, remaining = limiter.get_window_stats(item, "k")
    assert remaining == 0 and time.time() < reset <= time.time() + 1.01
    assert limiter.hit(item, "other")  # another key has its own window
    time.sleep(1.05)
    assert limiter.test(item, "k") and limiter.get_window_stats(item, "k").remaining == 3
    assert limiter.hit(item, "k")
    limiter.clear(item, "k")
    assert limiter.get_window_stats(item, "k").remaining == 3
    assert storage.reset() >= 1


def test_two_replicas_count_in_one_window(store_url):
    """Two stores on one database (two replicas of the API): the requests of one key add up."""
    a, b = JobStore(store_url), JobStore(store_url)
    try:
        key, _ = KeyStore(a).create("shared", rpm=4)
        limiters = [RequestLimiter(a), RequestLimiter(b)]
        seen = []
        for i in range(6):
            store = (a, b)[i % 2]
            with store.counting() as conn:
                seen.append(limiters[i % 2].hit(conn, key.id, key.rpm))
        assert [s.allowed for s in seen] == [True] * 4 + [False] * 2
        assert [s.remaining for s in seen] == [3, 2, 1, 0, 0, 0]
        assert all(s.limit == 4 and 1 <= s.reset_s <= 60 for s in seen)
    finally:
        a.close()
        b.close()


def test_a_counted_request_is_one_statement_that_also_checks_revocation(store):
    """The count, the revocation check and the window's numbers: one UPSERT that commits by itself, with no BEGIN
    or COMMIT around it, and then the route's own read on the same connection (a keyed status poll): SQLite's own
    trace of what runs, libpq's trace of what is sent to PostgreSQL."""
    keys = KeyStore(store)
    key, _ = keys.create("poller", rpm=100)
    job = store.create("p", queue_max=10, api_key_id=key.id)
    limiter = RequestLimiter(store)
    sql = limiter.storage._incr_guarded.sql
    assert sql.split()[0].upper() == "INSERT" and "ON CONFLICT" in sql and "RETURNING" in sql
    assert "api_keys" in sql and "revoked_at IS NULL" in sql

    def poll(conn):
        return limiter.hit(conn, key.id, key.rpm), store.get(job.job_id, conn=conn)

    if store.engine.dialect.name == "sqlite":
        statements: list[str] = []
        event.listen(store.engine, "checkout", lambda dbapi, *_: dbapi.set_trace_callback(statements.append))
        with store.counting() as conn:
            status, seen = poll(conn)
        statements = [s.split()[0].upper() for s in statements
                      if not s.startswith("PRAGMA synchronous")]  # once per connection
    else:
        with store.counting() as conn, sent_statements(conn.connection.dbapi_connection) as statements:
            status, seen = poll(conn)
    assert statements == ["INSERT", "SELECT"], statements
    assert status.remaining == 99 and status.allowed and seen == job
    keys.revoke("poller")
    with pytest.raises(KeyRevoked), store.counting() as conn:
        limiter.hit(conn, key.id, key.rpm)
    with store.read() as conn:  # the first count was committed; the refused one counted nothing
        assert conn.exec_driver_sql("SELECT hits FROM rate_limits").scalar_one() == 1


def test_a_count_skips_the_fsync_and_a_job_write_does_not(store):
    """One pooled connection serves both. SQLite: a count under synchronous=NORMAL, then a job's write under FULL.
    PostgreSQL: a count is its own transaction (autocommit: no BEGIN, no COMMIT), and a job's write after it on the
    same connection is a transaction again."""
    if store.engine.dialect.name == "sqlite":
        levels = []
        for counting in (True, False, True, False):
            with store.counting() if counting else store.write() as conn:
                levels.append(conn.connection.driver_connection.execute("PRAGMA synchronous").fetchone()[0])
        assert levels == [1, 2, 1, 2]  # NORMAL, FULL, NORMAL, FULL
        return
    limiter = RequestLimiter(store)
    key, _ = KeyStore(store).create("poller")
    sent = []
    for counting in (True, False, True, False):
        with store.counting() if counting else store.write() as conn, \
                sent_statements(conn.connection.dbapi_connection) as statements:
            if counting:
                limiter.hit(conn, key.id, key.rpm)
            else:
                conn.execute(select(func.count()).select_from(api_keys)).scalar_one()
        sent.append(statements)
    assert sent == [["INSERT"], ["BEGIN", "SELECT"], ["INSERT"], ["BEGIN", "SELECT"]], sent
    assert store.engine.pool.checkedin() == 1  # one connection served all four


def test_quotas_count_jobs_in_the_store(store):
    keys = KeyStore(store)
    alice, _ = keys.create("alice", max_in_flight=2, jobs_per_day=3)
    bob, _ = keys.create("bob")
    quotas = Quotas(daily_job_limit=5, retry_after_s=7)
    create = lambda key: store.create("p", queue_max=100, api_key_id=key.id if key else None,  # noqa: E731
                                      admit=quotas.admission(key))
    first, second = create(alice), create(alice)
    assert first.api_key_id == alice.id
    with pytest.raises(LimitExceeded, match="jobs in flight is reached \\(2 queued or processing\\)") as refused:
        create(alice)
    assert refused.value.rate.reset_s == 7 and refused.value.rate.limit == 2
    lease = store.claim("me:1:a")
    store.finish(Lease(lease.job_id, lease.owner, lease.attempt))  # one of them ends: room for one more
    create(alice)
    with pytest.raises(LimitExceeded, match="This key's daily job limit is reached \\(3 jobs per day\\); it "
                                            "resets at 00:00 UTC, in "):
        create(alice)
    create(bob)  # other keys are not affected
    create(None)  # nor open-mode jobs
    with pytest.raises(LimitExceeded, match="The service's daily job limit is reached \\(5 jobs per day\\)"):
        create(bob)
    with pytest.raises(LimitExceeded, match="service's daily"):
        create(None)
    assert Quotas(daily_job_limit=0, retry_after_s=1).admission(None) is None
    # The queue bound still applies after the quotas.
    with pytest.raises(QueueFull):
        store.create("p", queue_max=1, admit=Quotas(0, 1).admission(bob))


def test_open_mode_jobs_have_no_key(store):
    job = store.create("p", queue_max=10)
    assert job.api_key_id is None and store.get(job.job_id).api_key_id is None


def test_the_bento_requires_keys_and_make_serve_does_not(monkeypatch):
    """The container deployment starts in keys mode (bentofile.yaml's envs); `make serve` and `make dev` set
    nothing, so they run in the settings' default, open mode, where the seed's client needs no key."""
    import yaml

    from pipeline.settings import Settings

    root = Path(__file__).resolve().parent.parent
    envs = {e["name"]: e["value"] for e in yaml.safe_load((root / "bentofile.yaml").read_text())["envs"]}
    assert envs["GROK3D_AUTH"] == "keys"
    assert "grok3d_cli/**/*.py" in yaml.safe_load((root / "bentofile.yaml").read_text())["include"]
    monkeypatch.delenv("GROK3D_AUTH", raising=False)
    assert Settings().auth == "open"
    assert "GROK3D_AUTH" not in (root / "Makefile").read_text()
