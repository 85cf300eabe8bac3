"""Live progress: GET /api/status/{job_id}/events, Server-Sent Events (WHATWG HTML Living Standard, "Server-sent
events", https://html.spec.whatwg.org/multipage/server-sent-events.html), sent by sse-starlette.

- One `status` event per state change of the job, in order, each with the status object as data and the change's
  number as its id: the changes come from the `job_events` log the store writes in the same transaction as the
  change itself, so none is skipped however fast the stages go, and a stream served by any replica sees them all.
- After the job's terminal change (complete or error), one `end` event with the same data and id, then the stream
  closes. An EventSource reconnects after a break sending `Last-Event-ID` (§9.2.4): the stream goes on after that
  change, and a client that had seen the end gets only the `end` event again.
- A comment line every GROK3D_SSE_HEARTBEAT_S (15 s) keeps proxies and load balancers from closing an idle stream.
- A long stream outlives BentoML's traffic timeout: bentoml_fixes.FirstByteTimeout only limits the time to the first
  byte, and this route answers its headers at once; the route's path is under /api/status/, which skips BentoML's
  access-log, metrics and tracing middlewares (service.py), none of which buffers anyway, and nothing in the stack
  compresses. `X-Accel-Buffering: no` asks nginx-like proxies not to buffer either.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from sse_starlette import EventSourceResponse, ServerSentEvent

from pipeline.jobs import JobStore, Status

POLL_S = 0.25  # how often a stream looks for new changes in the store (one indexed range read)
GONE_CHECK_EVERY = 20  # polls between checks that the job still exists (deleted while followed)
RECONNECT_MS = 1000  # the `retry:` an EventSource waits before reconnecting after a break
TERMINAL = (Status.complete.value, Status.error.value)


def last_event_id(header: str | None) -> int:
    """The change a reconnecting client saw last: Last-Event-ID as a number, 0 (from the start) for anything
    else."""
    value = (header or "").strip()
    return int(value) if value.isdigit() and len(value) < 10 else 0


def _event(kind: str, seq: int, data: str, first: bool = False) -> ServerSentEvent:
    return ServerSentEvent(data=data, id=str(seq), event=kind, retry=RECONNECT_MS if first else None)


async def job_events(store: JobStore, job_id: str, after: int) -> AsyncIterator[ServerSentEvent]:
    """The events of a stored job after change `after`, then `end` once it has ended."""
    first = True
    job = await asyncio.to_thread(store.get, job_id)
    if job is None:
        return
    after = min(after, job.events)  # an id from the future (or another job) resumes from where the job stands
    if job.events == 0:  # a job made before the change log existed (migration 0005) and untouched since
        data = json.dumps(store.status_of(job))
        yield _event("status", 0, data, first=True)
        if job.status.value in TERMINAL:
            yield _event("end", 0, data)
            return
        first = False
    polls = 0
    while True:
        changes = await asyncio.to_thread(store.events_after, job_id, after)
        for seq, data in changes:
            after = seq
            yield _event("status", seq, data, first)
            first = False
            if json.loads(data)["status"] in TERMINAL:
                yield _event("end", seq, data)
                return
        if not changes:
            polls += 1
            if after >= job.events and job.status.value in TERMINAL:  # resumed after the end: only the end again
                yield _event("end", after, json.dumps(store.status_of(job)), first)
                return
            if polls % GONE_CHECK_EVERY == 0 and await asyncio.to_thread(store.get, job_id) is None:
                return  # deleted meanwhile: the stream closes, and a reconnect is answered 404
        await asyncio.sleep(POLL_S)


async def fixed_events(data: str) -> AsyncIterator[ServerSentEvent]:
    """An example: complete from the start."""
    yield _event("status", 1, data, first=True)
    yield _event("end", 1, data)


def event_stream(events: AsyncIterator[ServerSentEvent], heartbeat_s: float) -> EventSourceResponse:
    return EventSourceResponse(events, ping=heartbeat_s, headers={"Cache-Control": "no-cache"},
                               ping_message_factory=lambda: ServerSentEvent(comment="heartbeat"))
