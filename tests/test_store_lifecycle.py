"""The job life cycle's tables at the store, on both engines (real SQLite files, a real PostgreSQL server):
idempotency keys, the change log behind live progress, the list's keyset pages, cancel, the webhook outbox and its
claims across replicas, retention and the sweep. The HTTP side of each is tests/test_lifecycle.py's; here the same
SQL runs on both engines, which is what several replicas on PostgreSQL depend on."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from pipeline.db import idempotency_keys, job_events, webhook_deliveries
from pipeline.jobs import (CANCELLED, IDEMPOTENCY_TTL_S, IdempotencyKey, IdempotencyMismatch, JobStore, Lease,
                           LeaseLost, Stage, Status)
from pipeline.lifecycle import Lifecycle
from pipeline.storage import Asset, AssetStore
from pipeline.webhooks import WebhookSender

HOOK = "https://example.com/hook"


@pytest.fixture()
def store(store_url):
    s = JobStore(store_url)
    yield s
    s.close()


def lease_of(job) -> Lease:
    return Lease(job.job_id, job.owner, job.attempt)


def run_to_end(store: JobStore, owner: str = "h:1:a", *, mesh: dict | None = None) -> str:
    """Claim the oldest runnable job and complete it; its id."""
    job = store.claim(owner)
    store.finish(lease_of(job), mesh=mesh)
    return job.job_id


def count(store: JobStore, table, job_id: str) -> int:
    with store.read() as conn:
        return conn.execute(select(func.count()).select_from(table).where(table.c.job_id == job_id)).scalar_one()


# -- idempotency keys ---------------------------------------------------------------------------------------------

def test_an_idempotency_key_replays_its_job_refuses_another_body_and_lapses(store):
    key = IdempotencyKey("", "k1", "hash-a")
    first = store.submit("p", queue_max=10, idempotency=key)
    again = store.submit("p", queue_max=10, idempotency=key)
    assert not first.replayed and again.replayed and again.job == first.job
    with pytest.raises(IdempotencyMismatch):
        store.submit("p", queue_max=10, idempotency=IdempotencyKey("", "k1", "hash-b"))
    other_scope = store.submit("p", queue_max=10, idempotency=IdempotencyKey("7", "k1", "hash-a"))
    assert not other_scope.replayed and other_scope.job.job_id != first.job.job_id

    # 24 hours later (the row made older, on the database's own clock), the key makes a new job.
    with store.write() as conn:
        conn.execute(update(idempotency_keys).values(created_at=idempotency_keys.c.created_at - IDEMPOTENCY_TTL_S))
    later = store.submit("p", queue_max=10, idempotency=key)
    assert not later.replayed and later.job.job_id != first.job.job_id
    assert store.drop_expired_keys() == 1  # scope "7"'s row, older now too; the renewed "k1" stays
    assert store.submit("p", queue_max=10, idempotency=key).job == later.job


def test_one_key_submitted_by_six_replicas_at_once_makes_one_job(store_url):
    replicas = [JobStore(store_url) for _ in range(6)]
    start = threading.Barrier(len(replicas))
    results, errors = [], []

    def submit(store: JobStore) -> None:
        start.wait()
        try:
            results.append(store.submit("p", queue_max=10, idempotency=IdempotencyKey("", "once", "h")))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=submit, args=(store,)) for store in replicas]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len({r.job.job_id for r in results}) == 1 and sum(not r.replayed for r in results) == 1
    assert replicas[0].count_active() == 1
    for store in replicas:
        store.close()


# -- the change log, the list ------------------------------------------------------------------------------------

def test_every_state_change_is_logged_in_order_and_the_mesh_report_round_trips(store):
    job = store.create("p", queue_max=10)
    lease = lease_of(store.claim("h:1:a"))
    store.advance(lease, Stage.generating_3d, 40)
    mesh = {"faces": 12, "vertices": 8, "watertight": True, "size_m": 0.3, "volume_m3": 0.027}
    store.finish(lease, mesh=mesh)
    events = store.events_after(job.job_id, 0)
    assert [seq for seq, _ in events] == [1, 2, 3, 4]
    stages = [(json.loads(data)["status"], json.loads(data)["stage"]) for _, data in events]
    assert stages == [("queued", "initializing"), ("processing", "initializing"),
                      ("processing", "generating_3d"), ("complete", "complete")]
    assert [seq for seq, _ in store.events_after(job.job_id, 2)] == [3, 4]
    assert json.loads(events[-1][1])["mesh"] == mesh
    done = store.get(job.job_id)  # the status poll's own read, on the driver
    assert done.mesh == mesh and done.events == 4 and done.status is Status.complete


def test_the_list_pages_by_keyset_within_the_callers_scope(store):
    mine = [store.create(f"p{i}", queue_max=20, api_key_id=1).job_id for i in range(5)]
    store.create("theirs", queue_max=20, api_key_id=2)
    first = store.list_jobs("1", limit=2)
    assert [j.job_id for j in first] == mine[::-1][:2]
    newer = store.create("newer", queue_max=20, api_key_id=1).job_id  # while the client pages
    cursor = (first[-1].created_at, first[-1].job_id)
    assert [j.job_id for j in store.list_jobs("1", limit=10, before=cursor)] == mine[::-1][2:]
    assert len(store.list_jobs(None, limit=100)) == 7  # open mode sees every job
    done = run_to_end(store)  # the oldest: mine[0]
    assert [j.job_id for j in store.list_jobs("1", limit=10, status=Status.complete)] == [done]
    assert store.mark_deleting(newer, "1") is not None
    assert newer not in {j.job_id for j in store.list_jobs("1", limit=10)} and store.get(newer) is None
    assert store.mark_deleting(mine[1], "2") is None  # another key's job: not found


# -- cancel --------------------------------------------------------------------------------------------------------

def test_cancel_ends_a_queued_job_flags_a_running_one_and_leaves_a_finished_one(store):
    queued = store.create("q", queue_max=10)
    running = store.create("r", queue_max=10)
    outcome = store.request_cancel(queued.job_id)
    assert outcome.accepted and (outcome.job.status, outcome.job.error) == (Status.error, CANCELLED)

    lease = lease_of(store.claim("h:1:a"))
    assert lease.job_id == running.job_id
    flagged = store.request_cancel(running.job_id)
    assert flagged.accepted and flagged.job.status is Status.processing and flagged.job.cancel_requested == 1
    assert store.cancel_requests("h:1:a") == {running.job_id} and store.cancel_asked(lease)
    with pytest.raises(LeaseLost):  # every stage write is fenced off now
        store.advance(lease, Stage.generating_image, 20)
    store.fail(lease, CANCELLED)  # but the owner's fail goes through
    assert store.get(running.job_id).error == CANCELLED and store.cancel_requests("h:1:a") == set()
    assert not store.request_cancel(running.job_id).accepted
    assert store.request_cancel("0000dead") is None
    assert store.request_cancel(queued.job_id, scope="3") is None  # not that key's job


# -- the webhook outbox ------------------------------------------------------------------------------------------

def test_a_delivery_is_claimed_by_one_replica_retried_then_delivered(store_url):
    """The outbox row is written with the job's end; two replicas' senders claim due rows at once and never both
    get one; a failure makes it due again; a late record of an older attempt changes nothing."""
    a, b = JobStore(store_url), JobStore(store_url)
    ids = [a.create("p", queue_max=20, callback_url=HOOK).job_id for _ in range(8)]
    for _ in ids:
        run_to_end(a)
    senders = [WebhookSender(store, secret=None, allow_private=False, timeout_s=30) for store in (a, b)]
    start = threading.Barrier(2)
    claimed: list[list[tuple]] = [[], []]

    def claim(n: int) -> None:
        start.wait()
        for _ in range(4):
            claimed[n].extend(senders[n]._claim_due())

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    got = [row[0] for rows in claimed for row in rows]
    assert len(got) == len(set(got)) == 8  # each delivery claimed exactly once
    assert senders[0]._claim_due() == [] and senders[1]._claim_due() == []  # claimed: not due until the timeout

    webhook_id, job_id, url, payload, attempt = next(row for rows in claimed for row in rows)
    assert (url, attempt, json.loads(payload)["job_id"]) == (HOOK, 1, job_id)
    assert senders[1]._record_failure(webhook_id, job_id, attempt, "answered 503", 0.0) == "retrying"
    assert b.get(job_id).webhook_status == "retrying"
    [retry] = senders[0]._claim_due()
    assert retry[0] == webhook_id and retry[4] == 2
    senders[0]._record(webhook_id, job_id, 2, "delivered", None, None)
    senders[1]._record(webhook_id, job_id, 1, "failed", "late", None)  # an older attempt's outcome: ignored
    assert a.get(job_id).webhook_status == "delivered"
    with a.read() as conn:
        state, attempts = conn.execute(select(webhook_deliveries.c.state, webhook_deliveries.c.attempts)
                                       .where(webhook_deliveries.c.webhook_id == webhook_id)).one()
    assert (state, attempts) == ("delivered", 2)
    a.close()
    b.close()


# -- retention and the sweep -------------------------------------------------------------------------------------

def test_retention_waits_for_the_webhook_then_the_sweep_removes_files_and_rows(store_url, tmp_path: Path):
    store = JobStore(store_url, retention_s=0.2)
    assets = AssetStore(tmp_path / "jobs")
    plain = store.submit("p", queue_max=10, idempotency=IdempotencyKey("", "k", "h")).job.job_id
    hooked = store.create("p", queue_max=10, callback_url=HOOK).job_id
    running = store.create("p", queue_max=10).job_id
    for job_id in (plain, hooked, running):
        assets.write(job_id, Asset.image, b"jpeg")
    run_to_end(store)
    run_to_end(store)
    store.claim("h:1:a")  # `running` stays running
    time.sleep(0.25)
    sweep = Lifecycle(store, assets, orchestrator=None).sweep  # type: ignore[arg-type]
    report = sweep()
    # The finished job without a webhook goes, with every row of it; the one whose webhook is pending stays, and
    # so does the running one, however old.
    assert (report.expired, report.purged) == (1, 1)
    assert store.existing([plain, hooked, running]) == {hooked, running}
    assert not assets.has(plain, Asset.image) and assets.has(hooked, Asset.image)
    assert [count(store, table, plain) for table in (job_events, webhook_deliveries, idempotency_keys)] == [0, 0, 0]
    [(webhook_id, *_)] = WebhookSender(store, secret=None, allow_private=False)._claim_due()
    WebhookSender(store, secret=None, allow_private=False)._record(webhook_id, hooked, 1, "delivered", None, None)
    assert sweep().purged == 1 and store.existing([hooked]) == set()
    assert count(store, webhook_deliveries, hooked) == 0
    store.close()
