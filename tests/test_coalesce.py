"""pipeline.coalesce: the blocking calls made in one turn of the event loop share one thread hop and one `share()`;
each still gets its own result or exception; at most `max_in_flight` batches run at once, and calls made meanwhile
form the next batch."""

from __future__ import annotations

import asyncio
import contextvars
import threading
from contextlib import contextmanager

import pytest

from pipeline.coalesce import Coalescer


class Shares:
    """A `share` for Coalescer that counts how often it was entered, and can hold a batch until released."""

    def __init__(self, *, fail: bool = False) -> None:
        self.entered = 0
        self.fail = fail
        self.gate = threading.Event()
        self.gate.set()

    @contextmanager
    def __call__(self):
        self.entered += 1
        if self.fail:
            raise ConnectionError("no connection")
        self.gate.wait(10)
        yield f"shared-{self.entered}"


def test_calls_of_one_turn_share_one_batch_and_get_their_own_results():
    shares = Shares()
    coalescer = Coalescer(shares)
    threads: set[int] = set()

    def call(i):
        def fn(shared):
            threads.add(threading.get_ident())
            return i, shared
        return fn

    async def main():
        return await asyncio.gather(*(coalescer.run(call(i)) for i in range(20)))

    results = asyncio.run(main())
    assert results == [(i, "shared-1") for i in range(20)]
    assert shares.entered == 1
    assert len(threads) == 1 and threading.get_ident() not in threads  # one hop, off the loop's thread


def test_an_exception_reaches_its_own_caller_only():
    coalescer = Coalescer(Shares())

    def boom(shared):
        raise ValueError("this one")

    async def main():
        return await asyncio.gather(coalescer.run(lambda s: 1), coalescer.run(boom), coalescer.run(lambda s: 3),
                                    return_exceptions=True)

    first, failed, third = asyncio.run(main())
    assert (first, third) == (1, 3)
    assert isinstance(failed, ValueError) and str(failed) == "this one"


def test_a_batch_without_its_share_fails_every_call():
    coalescer = Coalescer(Shares(fail=True))

    async def main():
        return await asyncio.gather(*(coalescer.run(lambda s: s) for _ in range(3)), return_exceptions=True)

    assert all(isinstance(r, ConnectionError) for r in asyncio.run(main()))


def test_calls_made_while_a_batch_runs_wait_and_form_the_next_one():
    shares = Shares()
    coalescer = Coalescer(shares, max_in_flight=1)

    async def main():
        shares.gate.clear()  # the first batch holds in its share
        first = coalescer.run(lambda s: ("first", s))
        await asyncio.sleep(0.2)
        later = [coalescer.run(lambda s, i=i: (i, s)) for i in range(5)]
        await asyncio.sleep(0.2)
        assert shares.entered == 1  # no second batch while the first runs
        shares.gate.set()
        return await first, await asyncio.gather(*later)

    first, later = asyncio.run(main())
    assert first == ("first", "shared-1")
    assert later == [(i, "shared-2") for i in range(5)]  # all five in the one next batch


def test_batches_are_at_most_max_batch_calls_and_max_in_flight_run_at_once():
    shares = Shares()
    coalescer = Coalescer(shares, max_batch=4, max_in_flight=3)

    async def main():
        return await asyncio.gather(*(coalescer.run(lambda s: s) for _ in range(14)))

    sizes: dict[str, int] = {}
    for shared in asyncio.run(main()):
        sizes[shared] = sizes.get(shared, 0) + 1
    assert sorted(sizes.values(), reverse=True) == [4, 4, 4, 2]
    assert shares.entered == 4


def test_a_cancelled_caller_stops_waiting_and_its_call_still_runs():
    shares = Shares()
    coalescer = Coalescer(shares)
    ran: list[str] = []

    async def main():
        shares.gate.clear()
        leaving = coalescer.run(lambda s: ran.append("leaving"))
        staying = coalescer.run(lambda s: ran.append("staying") or "answer")
        await asyncio.sleep(0.1)
        leaving.cancel()
        shares.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await leaving
        return await staying

    assert asyncio.run(main()) == "answer"
    assert ran == ["leaving", "staying"]


def test_a_call_that_raises_beyond_exception_neither_hangs_its_batch_nor_the_next():
    """SystemExit or StopIteration from a call reach its caller (StopIteration, which a future refuses, as a
    RuntimeError that names it); the other calls of the batch are answered, and the coalescer keeps serving."""
    coalescer = Coalescer(Shares(), max_in_flight=1)

    def exits(shared):
        raise SystemExit(3)

    def stops(shared):
        raise StopIteration

    async def main():
        first = await asyncio.wait_for(asyncio.gather(coalescer.run(exits), coalescer.run(stops),
                                                      coalescer.run(lambda s: "fine"), return_exceptions=True), 5)
        return first, await asyncio.wait_for(coalescer.run(lambda s: "next"), 5)

    (exited, stopped, fine), after = asyncio.run(main())
    assert isinstance(exited, SystemExit) and exited.code == 3
    assert isinstance(stopped, RuntimeError) and "StopIteration" in str(stopped)
    assert (fine, after) == ("fine", "next")


def test_each_call_runs_in_its_callers_context():
    """As asyncio.to_thread: what the request set in a context variable (a request id for the logs) is what its call
    sees in the batch's thread."""
    request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
    coalescer = Coalescer(Shares())

    async def one(name):
        request_id.set(name)
        return await coalescer.run(lambda s: request_id.get())

    async def main():
        return await asyncio.gather(*(one(f"r{i}") for i in range(5)))

    assert asyncio.run(main()) == [f"r{i}" for i in range(5)]
