"""Blocking store calls run off the event loop in batches: the calls that arrive in one turn of the loop share one
thread hop and one connection.

Every keyed request and every status poll makes a short blocking call on the store (its key's count, its job's
read). Made one by one with `asyncio.to_thread`, each paid a thread hop (a pool submission, a future chained
back to the loop, a wake-up of the loop through its self-pipe) and a pool checkout, which together cost the loop
more than the statement itself (measured on 2 cores, 50 clients: 40-70 us of the loop's time per hop, against 5 us
per call here), and under load the calls' threads took turns on the GIL and on the store's write lock. Batched, a
burst of polls costs one hop and one checkout, and runs one call after another in the batch's thread.

Semantics stay those of one `to_thread` per call: each call runs once, after it was made, and gets its own result
or exception; a caller that is cancelled (its client left) stops waiting, and its call still runs.

At most `max_in_flight` batches run at once, in the loop's default executor; the calls made meanwhile wait for the
next batch, which so grows with the load. On SQLite one is right: its writes queue on one lock anyway, its reads
are CPU work under the same GIL, and batches that ran side by side spent their time handing both over (measured:
a keyed poll cost 4 times the CPU with one batch per turn of the loop in flight than with one at a time). On
PostgreSQL each statement waits for a round trip, and several batches on several connections overlap those waits.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Generic, TypeVar

C = TypeVar("C")  # what the calls of one batch share (a store connection)
T = TypeVar("T")

# Calls per batch at most: a batch runs its calls one after another, so this bounds the wait of its last one.
MAX_BATCH = 64

log = logging.getLogger("grok3d.coalesce")

# A call, the future its caller awaits, and the caller's context (each call runs in it, as asyncio.to_thread does).
_Pending = tuple[Callable[[Any], Any], asyncio.Future, contextvars.Context]
_Outcome = tuple[asyncio.Future, Any, BaseException | None]


class Coalescer(Generic[C]):
    """Runs blocking `fn(shared)` calls in a thread, those made in the same turn of the event loop together, with
    one `shared` (what `share()` yields, e.g. a connection) for the batch.

    If `share()` itself fails, every call of that batch fails with its exception."""

    def __init__(self, share: Callable[[], AbstractContextManager[C]], *, max_batch: int = MAX_BATCH,
                 max_in_flight: int = 1) -> None:
        self.share = share
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._pending: list[_Pending] = []
        self._in_flight = 0
        self._flush_due = False

    def run(self, fn: Callable[[C], T]) -> asyncio.Future[T]:
        """Schedule `fn(shared)` in the next batch; await the result (or the exception it raised)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((fn, future, contextvars.copy_context()))
        if not self._flush_due and self._in_flight < self.max_in_flight:
            # After the callbacks already queued in this turn: the calls they make join this batch.
            self._flush_due = True
            loop.call_soon(self._flush, loop)
        return future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._flush_due = False
        while self._pending and self._in_flight < self.max_in_flight:
            batch, self._pending = self._pending[:self.max_batch], self._pending[self.max_batch:]
            self._in_flight += 1
            try:
                loop.run_in_executor(None, self._run_batch, loop, batch)
            except RuntimeError as exc:  # the executor is shut down (the loop is closing): answer, do not hang
                self._in_flight -= 1
                _deliver([(future, None, exc) for _, future, _ in batch])

    def _done(self, loop: asyncio.AbstractEventLoop, outcomes: list[_Outcome]) -> None:
        self._in_flight -= 1
        try:
            _deliver(outcomes)
        finally:
            self._flush(loop)  # what came in meanwhile

    def _run_batch(self, loop: asyncio.AbstractEventLoop, batch: list[_Pending]) -> None:
        """In the executor's thread. Whatever happens, every call of `batch` is answered and the batch counted done:
        a batch left unanswered would hold its slot, and with it every later call, for good."""
        outcomes: list[_Outcome] = []
        try:
            with self.share() as shared:
                for fn, future, context in batch:
                    try:
                        outcomes.append((future, context.run(fn, shared), None))
                    except BaseException as exc:  # the caller's (even SystemExit): delivered to it alone
                        outcomes.append((future, None, exc))
        except BaseException as exc:  # the batch's own (no connection, or closing it failed)
            answered = {id(future) for future, _, _ in outcomes}
            unanswered = [future for _, future, _ in batch if id(future) not in answered]
            if not unanswered:  # every call ran: their results stand (each statement committed by itself)
                log.warning("a batch of %d store calls ran, then its connection failed to close: %r", len(batch), exc)
            outcomes += [(future, None, exc) for future in unanswered]
        finally:
            loop.call_soon_threadsafe(self._done, loop, outcomes)


def _deliver(outcomes: list[_Outcome]) -> None:
    for future, result, exc in outcomes:
        if future.cancelled():
            continue
        if exc is None:
            future.set_result(result)
        elif isinstance(exc, StopIteration):  # a future refuses it (it would end a generator): say what it was
            future.set_exception(RuntimeError(f"the call raised {exc!r}"))
        else:
            future.set_exception(exc)
