"""The one retry policy of grok3d, on tenacity: what may pass later is tried again after an exponentially growing,
jittered wait, or after the wait the other side asked for.

    policy = RetryPolicy(max_retries=5, backoff_base_s=1.0, backoff_cap_s=30.0)
    result = await policy.run(call, retry_on=lambda exc: isinstance(exc, Busy), on_retry=log_it)

or, around a block:

    async for attempt in policy.retrying(retry_on=...):
        with attempt:
            result = await call()

The rules, the same for every caller:
- At most `max_retries` retries after the first attempt (0: one attempt and no retry).
- Retry `n` (1, 2, ...) waits between half and all of `min(backoff_cap_s, backoff_base_s * 2**(n-1))`: "equal
  jitter", half fixed so waits still grow, half random so clients that failed together do not return together.
- An exception with a `retry_after_s` attribute that is not None (a server's `Retry-After`, RFC 9110 §10.2.3, in
  seconds) waits exactly that long instead, never less, bounded by `max_retry_after_s` against an absurd answer.
- Only exceptions for which `retry_on` is true are retried; any other leaves at once, and so do cancellation and
  interrupts whatever `retry_on` says. When the retries are spent the last exception leaves as it was raised
  (tenacity's `reraise`), so callers keep their own error types.

This module knows nothing of HTTP or jobs: callers decide what is retryable and what to log.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt
from tenacity.wait import wait_base, wait_exponential, wait_random_exponential

T = TypeVar("T")
RetryOn = Callable[[BaseException], bool]
# Called before each wait: the exception that failed the attempt, the number of the retry to come (1, 2, ...), and
# the seconds it will wait.
OnRetry = Callable[[BaseException, int, float], None]


def retry_after_of(exc: BaseException | None) -> float | None:
    """The wait an exception asks for (its `retry_after_s` attribute, seconds), if any."""
    value = getattr(exc, "retry_after_s", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


class _RetryAfterOr(wait_base):
    """The exception's own `retry_after_s` when it carries one (bounded), else the backoff."""

    def __init__(self, backoff: wait_base, max_retry_after_s: float) -> None:
        self.backoff = backoff
        self.max_retry_after_s = max_retry_after_s

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome is not None else None
        retry_after = retry_after_of(exc)
        if retry_after is not None:
            return min(retry_after, self.max_retry_after_s)
        return self.backoff(retry_state)


@dataclass(frozen=True)
class RetryPolicy:
    """How many retries, and how long between them (see the module's docstring for the rules)."""

    max_retries: int = 5
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 30.0
    max_retry_after_s: float = 120.0

    def __post_init__(self) -> None:
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be at least 0, not {self.max_retries}.")
        if self.backoff_base_s < 0 or self.backoff_cap_s < 0 or self.max_retry_after_s < 0:
            raise ValueError("Backoff times must not be negative.")

    def wait_strategy(self) -> wait_base:
        """tenacity's wait for this policy: equal jitter (a fixed half plus a random half of the same ceiling, both
        from tenacity's exponential waits), unless the exception carries its own `retry_after_s`."""
        half_base, half_cap = self.backoff_base_s / 2, self.backoff_cap_s / 2
        equal_jitter = wait_exponential(multiplier=half_base, max=half_cap) + wait_random_exponential(
            multiplier=half_base, max=half_cap)
        return _RetryAfterOr(equal_jitter, self.max_retry_after_s)

    def wait_s(self, retry_number: int, exc: BaseException | None = None) -> float:
        """The wait before retry `retry_number` (1, 2, ...) after `exc`, by the same rules, for a caller that keeps
        its retries itself (a durable schedule in a database, such as webhook deliveries) instead of looping here."""
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = retry_number
        if exc is not None:
            state.set_exception((type(exc), exc, exc.__traceback__))
        return self.wait_strategy()(state)

    def retrying(self, retry_on: RetryOn, on_retry: OnRetry | None = None) -> AsyncRetrying:
        """A tenacity `AsyncRetrying` for this policy: call it with a coroutine function, or iterate it."""
        return AsyncRetrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=self.wait_strategy(),
            # Cancellation and interrupts (BaseException, not Exception) always leave at once, whatever retry_on says.
            retry=retry_if_exception(lambda exc: isinstance(exc, Exception) and retry_on(exc)),
            before_sleep=_before_sleep(on_retry) if on_retry is not None else None,
            reraise=True,
        )

    async def run(self, call: Callable[[], Awaitable[T]], retry_on: RetryOn,
                  on_retry: OnRetry | None = None) -> T:
        """`await call()`, retried by this policy; the last exception leaves as raised once retries are spent.
        `call` may be any callable that returns an awaitable (a lambda too)."""

        async def attempt() -> T:  # tenacity awaits only coroutine functions; a lambda's coroutine it would return
            return await call()

        return await self.retrying(retry_on, on_retry)(attempt)


def _before_sleep(on_retry: OnRetry) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait = state.upcoming_sleep
        if exc is not None:
            on_retry(exc, state.attempt_number, wait)

    return before_sleep
