"""The retry policy of pipeline/retry.py: counts, waits, Retry-After, and what leaves when retries are spent."""

from __future__ import annotations

import asyncio
import time

import pytest

from pipeline.retry import OnRetry, RetryPolicy, retry_after_of


class Busy(Exception):
    def __init__(self, retry_after_s: float | None = None) -> None:
        super().__init__("busy")
        self.retry_after_s = retry_after_s


class Broken(Exception):
    pass


def is_busy(exc: BaseException) -> bool:
    return isinstance(exc, Busy)


class Flaky:
    """Raises the given exceptions in turn, then returns "done"."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return "done"


def recorder() -> tuple[list[tuple[str, int, float]], OnRetry]:
    seen: list[tuple[str, int, float]] = []

    def on_retry(exc: BaseException, retry: int, wait_s: float) -> None:
        seen.append((type(exc).__name__, retry, wait_s))

    return seen, on_retry


async def test_retries_until_success_and_reports_each_retry() -> None:
    call, (seen, on_retry) = Flaky(Busy(), Busy()), recorder()
    assert await RetryPolicy(max_retries=3, backoff_base_s=0.01).run(call, is_busy, on_retry) == "done"
    assert call.calls == 3
    assert [(name, n) for name, n, _ in seen] == [("Busy", 1), ("Busy", 2)]


async def test_spent_retries_leave_the_last_exception_as_raised() -> None:
    last = Busy()
    call = Flaky(Busy(), Busy(), last)
    with pytest.raises(Busy) as caught:
        await RetryPolicy(max_retries=2, backoff_base_s=0.001).run(call, is_busy)
    assert caught.value is last and call.calls == 3


async def test_no_retries_means_one_attempt() -> None:
    call = Flaky(Busy())
    with pytest.raises(Busy):
        await RetryPolicy(max_retries=0).run(call, is_busy)
    assert call.calls == 1


async def test_other_exceptions_leave_at_once() -> None:
    call = Flaky(Busy(), Broken())
    with pytest.raises(Broken):
        await RetryPolicy(max_retries=5, backoff_base_s=0.001).run(call, is_busy)
    assert call.calls == 2


async def test_waits_grow_exponentially_with_equal_jitter_and_stop_at_the_cap() -> None:
    seen, on_retry = recorder()
    call = Flaky(*[Busy() for _ in range(6)])
    await RetryPolicy(max_retries=6, backoff_base_s=0.004, backoff_cap_s=0.05).run(call, is_busy, on_retry)
    for _, retry, wait in seen:
        ceiling = min(0.05, 0.004 * 2 ** (retry - 1))
        assert ceiling / 2 <= wait <= ceiling, seen
    assert seen[-1][2] >= 0.025  # 0.004 * 2**5 = 0.128 is capped at 0.05: half of it at least


async def test_jitter_spreads_the_waits() -> None:
    waits = set()
    for _ in range(5):
        seen, on_retry = recorder()
        await RetryPolicy(max_retries=1, backoff_base_s=0.01).run(Flaky(Busy()), is_busy, on_retry)
        waits.add(seen[0][2])
    assert len(waits) > 1


async def test_retry_after_is_waited_exactly_and_bounded() -> None:
    seen, on_retry = recorder()
    policy = RetryPolicy(max_retries=3, backoff_base_s=0.001, backoff_cap_s=0.001, max_retry_after_s=0.3)
    started = time.monotonic()
    await policy.run(Flaky(Busy(retry_after_s=0.2), Busy(retry_after_s=3600), Busy()), is_busy, on_retry)
    assert [w for _, _, w in seen][:2] == [0.2, 0.3]  # as asked; an absurd answer bounded
    assert seen[2][2] <= 0.001  # no Retry-After: the backoff again
    assert time.monotonic() - started >= 0.5


async def test_cancellation_leaves_at_once() -> None:
    """A job cancelled at shutdown must stop, not be retried (CancelledError is not retryable)."""
    calls = 0

    async def slow() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(10)

    task = asyncio.create_task(RetryPolicy(max_retries=5, backoff_base_s=0.001).run(slow, lambda exc: True))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert calls == 1


async def test_as_an_async_iterator() -> None:
    call = Flaky(Busy())
    async for attempt in RetryPolicy(max_retries=2, backoff_base_s=0.001).retrying(is_busy):
        with attempt:
            result = await call()
    assert result == "done" and call.calls == 2


def test_retry_after_of() -> None:
    assert retry_after_of(Busy(2)) == 2.0
    assert retry_after_of(Busy(None)) is None
    assert retry_after_of(Broken()) is None
    assert retry_after_of(None) is None


@pytest.mark.parametrize("options", [{"max_retries": -1}, {"backoff_base_s": -1}, {"max_retry_after_s": -0.5}])
def test_nonsense_settings_are_refused(options: dict) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**options)
