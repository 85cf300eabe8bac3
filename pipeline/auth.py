"""Who may use the job routes (GROK3D_AUTH), and how much: the HTTP side of API keys and their limits.

- `open`: every route as before, no key asked for or looked at; only the service's daily ceiling applies.
- `keys`: the job routes (submit, status, assets of jobs) need `Authorization: Bearer <key>` (RFC 6750 §2.1).
  Examples and the page stay public. A missing or malformed header is 401 "API key required", an unknown or
  revoked key 401 "Invalid API key", both with `WWW-Authenticate: Bearer` (RFC 9110 §11.6.1 and §15.5.2: a 401
  carries the challenge; RFC 6750 §3 gives its form, with `error="invalid_token"` only when a key was presented).

Each keyed request costs one write transaction, in one worker thread: the key is looked up by the hash of what
was presented (so a revoked key is refused on its very next request, on every replica) and its request is counted
(pipeline/ratelimit.py), together. A cache of keys in the process would not save that round trip: revocation must
be seen at once and everywhere, so every request would still have to ask the store whether its cached key was
revoked, a single-row read as cheap as the lookup by the hash's unique index, which therefore is done instead.
The route's own store read (the job of a status poll) follows in the same thread, so a keyed poll still costs one
thread hop.

Every answer to a keyed request carries the IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers-06 §3:
RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset in seconds) of the key's requests per minute, or of the
limit that refused it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from starlette.requests import Request

from pipeline.jobs import Job, JobStore
from pipeline.keys import ApiKey, KeyStore
from pipeline.quotas import LimitExceeded, Quotas
from pipeline.ratelimit import RateStatus, RequestLimiter

T = TypeVar("T")
AuthMode = Literal["open", "keys"]

API_KEY_REQUIRED = "API key required"
INVALID_API_KEY = "Invalid API key"
# RFC 6750 §3: the challenge; a request that presented no key gets no error code (§3.1).
CHALLENGE = 'Bearer realm="grok3d"'
INVALID_CHALLENGE = 'Bearer realm="grok3d", error="invalid_token"'
RATE_HEADERS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")
# Where a keyed request keeps its RateLimit fields, so an error raised further on answers with them too.
SCOPE_KEY = "grok3d.ratelimit"

# RFC 9110 §11.6.2 credentials with RFC 6750 §2.1's b64token; the scheme is case-insensitive (RFC 9110 §11.1).
_BEARER = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*) *")


class Refused(Exception):
    """The request is refused before the route does anything: 401 or 429, in API.md's error shape."""

    def __init__(self, status_code: int, message: str, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.headers = headers


def rate_headers(rate: RateStatus) -> dict[str, str]:
    return dict(zip(RATE_HEADERS, (str(rate.limit), str(rate.remaining), str(rate.reset_s))))


@dataclass(frozen=True)
class Caller:
    """Who sent a request: a key (keys mode), or anyone (open mode: `key` is None and every job is theirs)."""

    key: ApiKey | None = None
    rate: RateStatus | None = None

    @property
    def key_id(self) -> int | None:
        return self.key.id if self.key is not None else None

    @property
    def headers(self) -> dict[str, str]:
        return rate_headers(self.rate) if self.rate is not None else {}

    def owns(self, job: Job) -> bool:
        """In keys mode a job is its key's alone; another key gets the 404 of an id that does not exist."""
        return self.key is None or job.api_key_id == self.key.id


ANYONE = Caller()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header; None when there is none or it is malformed."""
    if authorization is None:
        return None
    match = _BEARER.fullmatch(authorization)
    return match[1] if match else None


class Gate:
    def __init__(self, mode: AuthMode, store: JobStore, quotas: Quotas) -> None:
        self.mode = mode
        self.store = store
        self.keys = KeyStore(store)
        self.limiter = RequestLimiter(store)
        self.quotas = quotas

    async def enter(self, request: Request, then: Callable[[], T] | None = None) -> tuple[Caller, T | None]:
        """Admit `request` (open mode: anyone; keys mode: its key, within its requests per minute, or Refused),
        then run the blocking `then` (the route's store read) in the same worker thread."""
        if self.mode == "open":
            return ANYONE, (await asyncio.to_thread(then) if then is not None else None)
        token = bearer_token(request.headers.get("authorization"))
        if token is None:
            raise Refused(401, API_KEY_REQUIRED, {"WWW-Authenticate": CHALLENGE})
        caller, result = await asyncio.to_thread(self._admit_then, token, then)
        request.scope[SCOPE_KEY] = caller.headers
        if not caller.rate.allowed:
            raise Refused(429, f"This key's rate limit is reached ({caller.rate.limit} requests per minute); it "
                               f"resets in {caller.rate.reset_s} s",
                          {"Retry-After": str(caller.rate.reset_s), **caller.headers})
        return caller, result

    def _admit_then(self, token: str, then: Callable[[], T] | None) -> tuple[Caller, T | None]:
        with self.store.write(durable=False) as conn:
            key = self.keys.find(conn, token)
            if key is None:
                raise Refused(401, INVALID_API_KEY, {"WWW-Authenticate": INVALID_CHALLENGE})
            caller = Caller(key, self.limiter.hit(conn, key.id, key.rpm))
        if not caller.rate.allowed or then is None:
            return caller, None
        return caller, then()

    def admission(self, caller: Caller):
        """The quota check of a new job of `caller`, for JobStore.create's `admit`."""
        return self.quotas.admission(caller.key)

    @staticmethod
    def refusal(exc: LimitExceeded, caller: Caller) -> Refused:
        """429 for a quota a new job would pass: the RateLimit fields of that quota, Retry-After its reset."""
        headers = rate_headers(exc.rate) if caller.key is not None else {}
        return Refused(429, exc.message, {"Retry-After": str(exc.rate.reset_s), **headers})
