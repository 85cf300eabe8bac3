"""Requests per minute per key: the `limits` package's fixed-window strategy over a storage on the job store.

`limits` ships storages for memory, Redis, Memcached and MongoDB, none of which is grok3d's store, and a count in
process memory would let each replica grant the full rate. So `StoreStorage` is a `limits` storage on the
`rate_limits` table (pipeline.db) and the library's own `FixedWindowRateLimiter` runs over it: every replica
counts in the same row. Its one write, `incr`, is a single atomic UPSERT, and its window is the library's fixed
window (the count starts at the first hit and lasts `expiry` seconds; a hit after that starts the next window),
timed on the database's clock (`db_now`), so replicas whose clocks differ still share one window.

The counter is bumped by every keyed request, status polls included, so its write must be cheap: it commits
without an fsync (`durable=False`; losing the last moments of a count to a power cut forgives a few requests).
The rate check runs inside the transaction that looked the key up (pipeline/auth.py), which is why the storage
can be bound to a connection: `get` and `get_expiry` of a key that this transaction just counted answer from the
UPSERT's RETURNING. That is exactly what reading the row again would give, since the transaction holds the row
(SQLite's write lock, PostgreSQL's row lock) until it commits, and it saves the two reads that
`get_window_stats` would otherwise make on the hot path.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

from limits import RateLimitItemPerMinute
from limits.storage import Storage
from limits.strategies import FixedWindowRateLimiter
from sqlalchemy import Connection, bindparam, case, delete, exc, func, select

from pipeline.db import db_now, rate_limits, upsert
from pipeline.jobs import JobStore


@dataclass
class _Binding:
    conn: Connection
    counted: dict[str, tuple[int, float]] = field(default_factory=dict)  # key -> (hits, expires_at)
    now: float | None = None  # the database's clock at the last count


_bound: ContextVar[_Binding | None] = ContextVar("grok3d_rate_binding", default=None)


class StoreStorage(Storage):
    """A `limits` storage (fixed window) on the job store's `rate_limits` table."""

    STORAGE_SCHEME = None  # built from a JobStore, never from a URI

    def __init__(self, store: JobStore) -> None:
        super().__init__()
        self.store = store
        row = rate_limits.c
        new = upsert(store.engine, rate_limits).values(key=bindparam("key"), hits=bindparam("amount"),
                                                      expires_at=db_now() + bindparam("expiry"))
        lapsed = row.expires_at <= db_now()
        self._incr = new.on_conflict_do_update(
            index_elements=[row.key],
            set_={"hits": case((lapsed, new.excluded.hits), else_=row.hits + new.excluded.hits),
                  "expires_at": case((lapsed, new.excluded.expires_at), else_=row.expires_at)},
        ).returning(row.hits, row.expires_at, db_now())
        self._live = select(row.hits, row.expires_at).where(row.key == bindparam("key"), row.expires_at > db_now())

    @property
    def base_exceptions(self) -> type[Exception]:
        return exc.SQLAlchemyError

    @contextmanager
    def bound(self, conn: Connection) -> Iterator[_Binding]:
        """Run this storage's calls on `conn` (an open write transaction) in this context."""
        binding = _Binding(conn)
        token = _bound.set(binding)
        try:
            yield binding
        finally:
            _bound.reset(token)

    @contextmanager
    def _conn(self, write: bool) -> Iterator[_Binding]:
        binding = _bound.get()
        if binding is not None:
            yield binding
            return
        with self.store.write(durable=False) if write else self.store.read() as conn:
            yield _Binding(conn)

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        with self._conn(write=True) as binding:
            hits, expires_at, now = binding.conn.execute(
                self._incr, {"key": key, "amount": amount, "expiry": expiry}).one()
            binding.counted[key] = (hits, expires_at)
            binding.now = now
        return hits

    def _window(self, key: str) -> tuple[int, float] | None:
        with self._conn(write=False) as binding:
            if key in binding.counted:
                return binding.counted[key]
            row = binding.conn.execute(self._live, {"key": key}).one_or_none()
        return (row.hits, row.expires_at) if row is not None else None

    def get(self, key: str) -> int:
        window = self._window(key)
        return window[0] if window is not None else 0

    def get_expiry(self, key: str) -> float:
        window = self._window(key)
        if window is not None:
            return window[1]
        with self._conn(write=False) as binding:
            return binding.conn.execute(select(db_now())).scalar_one()

    def check(self) -> bool:
        try:
            with self.store.read() as conn:
                conn.execute(select(func.count()).select_from(rate_limits)).scalar_one()
            return True
        except exc.SQLAlchemyError:
            return False

    def reset(self) -> int | None:
        with self.store.write() as conn:
            return conn.execute(delete(rate_limits)).rowcount

    def clear(self, key: str) -> None:
        with self._conn(write=True) as binding:
            binding.conn.execute(delete(rate_limits).where(rate_limits.c.key == key))
            binding.counted.pop(key, None)


@dataclass(frozen=True)
class RateStatus:
    """One limit as the IETF RateLimit fields tell it (draft-ietf-httpapi-ratelimit-headers-06 §3): its quota, what
    is left of it, and the seconds until it is whole again; `allowed`: whether this request was within it."""

    limit: int
    remaining: int
    reset_s: int
    allowed: bool = True


class RequestLimiter:
    """Requests per minute of each API key, counted in the store."""

    def __init__(self, store: JobStore) -> None:
        self.storage = StoreStorage(store)
        self.strategy = FixedWindowRateLimiter(self.storage)

    def hit(self, conn: Connection, key_id: int, rpm: int) -> RateStatus:
        """Count one request of key `key_id` in the transaction open on `conn`."""
        item = RateLimitItemPerMinute(rpm)
        with self.storage.bound(conn) as binding:
            allowed = self.strategy.hit(item, "key", str(key_id))
            stats = self.strategy.get_window_stats(item, "key", str(key_id))
        # The reset on the database's clock, which timed the window, so a replica's own clock does not matter.
        reset_s = max(1, math.ceil(stats.reset_time - binding.now))
        return RateStatus(limit=rpm, remaining=stats.remaining, reset_s=reset_s, allowed=allowed)
