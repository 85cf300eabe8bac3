"""Who may use the job routes (GROK3D_AUTH), and how much: the HTTP side of API keys and their limits.

- `open`: every route as before, no key asked for or looked at; only the service's daily ceiling applies.
- `keys`: the job routes (submit, status, assets of jobs) need `Authorization: Bearer <key>` (RFC 6750 §2.1).
  Examples and the page stay public. A missing or malformed header is 401 "API key required", an unknown or
  revoked key 401 "Invalid API key", both with `WWW-Authenticate: Bearer` (RFC 9110 §11.6.1 and §15.5.2: a 401
  carries the challenge; RFC 6750 §3 gives its form, with `error="invalid_token"` only when a key was presented).

Each keyed request costs one statement more than an open one, in the same worker thread: its count
(pipeline/ratelimit.py), an UPSERT that commits by itself and counts only while the key is not revoked, so a
revoked key is refused on its very next request, on every replica, without a read of its own. What the count
needs to know of the key (its id and limits, which never change once it is made) comes from a cache in the
process, hash -> key, filled by the first request of each key (a lookup by the hash's unique index) and emptied of
a key as soon as its count finds it revoked. The route's own read (the job of a status poll) runs on the same
connection. The requests that reach the gate in one turn of the event loop share one thread hop and one
connection (pipeline/coalesce.py), in either mode.

Every answer to a keyed request carries the IETF RateLimit fields (draft-ietf-httpapi-ratelimit-headers-06 §3:
RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset in seconds) of the key's requests per minute, or of the
limit that refused it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Literal, TypeVar

from sqlalchemy import Connection
from starlette.requests import Request

from pipeline.coalesce import Coalescer
from pipeline.jobs import Job, JobStore
from pipeline.keys import KEY_RE, ApiKey, KeyStore, hash_key
from pipeline.quotas import LimitExceeded, Quotas
from pipeline.ratelimit import KeyRevoked, RateStatus, RequestLimiter

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
CALLER_SCOPE = "grok3d.caller_scope"  # where enter() leaves the caller's scope for pipeline.lifecycle.caller_scope

# Keys a process remembers (hash -> key) before it starts again from empty: far more than a deployment has.
KNOWN_KEYS_MAX = 10_000

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

    @cached_property  # read twice per keyed request (the answer and the scope for errors): made once
    def headers(self) -> dict[str, str]:
        return rate_headers(self.rate) if self.rate is not None else {}

    def owns(self, job: Job) -> bool:
        """In keys mode a job is its key's alone; another key gets the 404 of an id that does not exist."""
        return self.key is None or job.api_key_id == self.key.id


ANYONE = Caller()


def _invalid() -> Refused:
    return Refused(401, INVALID_API_KEY, {"WWW-Authenticate": INVALID_CHALLENGE})


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
        # hash -> key. Only ids and limits are taken from here, which never change; whether the key is still
        # active is asked of the store by every request's count.
        self._known: dict[str, ApiKey] = {}
        in_flight = 4 if store.postgresql else 1  # see pipeline/coalesce.py
        self._reads = Coalescer(store.read, max_in_flight=in_flight)  # open mode: the routes' reads
        # keys mode: each request's count, then its route's read
        self._counts = Coalescer(store.counting, max_in_flight=in_flight)

    async def enter(self, request: Request,
                    then: Callable[[Connection], T] | None = None) -> tuple[Caller, T | None]:
        """Admit `request` (open mode: anyone; keys mode: its key, within its requests per minute, or Refused),
        then run the blocking `then` (the route's store read) in the same worker thread, on the key check's
        connection (open mode: a read connection)."""
        if self.mode == "open":
            request.scope[CALLER_SCOPE] = None
            return ANYONE, (await self._reads.run(then) if then is not None else None)
        token = bearer_token(request.headers.get("authorization"))
        if token is None:
            raise Refused(401, API_KEY_REQUIRED, {"WWW-Authenticate": CHALLENGE})
        if KEY_RE.fullmatch(token) is None:
            raise _invalid()  # not a grok3d key at all: no lookup
        caller, result = await self._counts.run(lambda conn: self._admit_then(conn, token, then))
        request.scope[SCOPE_KEY] = caller.headers
        request.scope[CALLER_SCOPE] = str(caller.key_id)  # the jobs this caller may see (pipeline.lifecycle)
        if not caller.rate.allowed:
            raise Refused(429, f"This key's rate limit is reached ({caller.rate.limit} requests per minute); it "
                               f"resets in {caller.rate.reset_s} s",
                          {"Retry-After": str(caller.rate.reset_s), **caller.headers})
        return caller, result

    def _admit_then(self, conn: Connection, token: str,
                    then: Callable[[Connection], T] | None) -> tuple[Caller, T | None]:
        """On `conn` (a JobStore.counting connection): the key of `token`, its count, then `then`."""
        digest = hash_key(token)
        key = self._known.get(digest)
        if key is None:  # a SQLAlchemy read, which `conn` runs no transaction for: on a connection of its own
            with self.store.read() as read:
                key = self._look_up(read, token, digest)
        try:
            caller = Caller(key, self.limiter.hit(conn, key.id, key.rpm))
        except KeyRevoked:
            self._known.pop(digest, None)
            raise _invalid() from None
        result = then(conn) if caller.rate.allowed and then is not None else None
        return caller, result

    def _look_up(self, conn: Connection, token: str, digest: str) -> ApiKey:
        key = self.keys.find(conn, token)
        if key is None:
            raise _invalid()
        if len(self._known) >= KNOWN_KEYS_MAX:
            self._known.clear()
        self._known[digest] = key
        return key

    def admission(self, caller: Caller) -> Callable[[Connection], None] | None:
        """The quota check of a new job of `caller`, for JobStore.create's `admit`."""
        return self.quotas.admission(caller.key)

    @staticmethod
    def refusal(exc: LimitExceeded, caller: Caller) -> Refused:
        """429 for a quota that a new job would exceed: the RateLimit fields of that quota (for a key), Retry-After
        its reset."""
        headers = rate_headers(exc.rate) if caller.key is not None else {}
        return Refused(429, exc.message, {"Retry-After": str(exc.rate.reset_s), **headers})
