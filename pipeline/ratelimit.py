"""Requests per minute per key: the `limits` package's fixed-window strategy over a storage on the job store.

`limits` ships storages for memory, Redis, Memcached and MongoDB, none of which is grok3d's store, and a count in
process memory would let each replica grant the full rate. So `StoreStorage` is a `limits` storage on the
`rate_limits` table (pipeline.db) and the library's own `FixedWindowRateLimiter` runs over it: every replica
counts in the same row. Its one write, `incr`, is a single atomic UPSERT, and its window is the library's fixed
window (the count starts at the first hit and lasts `expiry` seconds; a hit after that starts the next window),
timed on the database's clock (`db_now`), so replicas whose clocks differ still share one window.

The counter is bumped by every keyed request, status polls included, so it must be cheap:
- the UPSERT is a write of its own, on a counting connection of the store (JobStore.counting): no BEGIN, no
  COMMIT, no fsync (losing the last moments of a count to a power cut forgives a few requests), compiled once and
  run on the driver's cursor (pipeline.db.Prepared);
- the storage can be bound to the request's connection (pipeline/auth.py), and then `get` and `get_expiry` of a
  key that this binding counted answer from the UPSERT's RETURNING: the window as this request's count left it,
  without the two reads that `get_window_stats` would otherwise make;
- a binding may name an API key as the count's guard: the UPSERT then counts only while that key is active
  (INSERT ... SELECT from its row where it is not revoked) and raises KeyRevoked when it is not, so the check that
  revocation needs on every request costs no statement of its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from functools import lru_cache

from limits import RateLimitItem, RateLimitItemPerMinute
from limits.storage import Storage
from limits.strategies import FixedWindowRateLimiter
from sqlalchemy import Connection, Float, Integer, String, bindparam, case, delete, exc, func, select

from pipeline.db import Prepared, api_keys, db_now, rate_limits, upsert
from pipeline.jobs import JobStore


class KeyRevoked(Exception):
    """The guard of a count (an API key) is revoked or gone: nothing was counted."""


@dataclass
class _Binding:
    conn: Connection
    guard: int | None = None  # api_keys.id that must be active for a count to be made
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
        key, amount = bindparam("key", type_=String), bindparam("amount", type_=Integer)
        expires_at = db_now() + bindparam("expiry", type_=Float)
        plain = upsert(store.engine, rate_limits).values(key=key, hits=amount, expires_at=expires_at)
        active = select(key, amount, expires_at).where(api_keys.c.id == bindparam("guard"),
                                                       api_keys.c.revoked_at.is_(None))
        guarded = upsert(store.engine, rate_limits).from_select(["key", "hits", "expires_at"], active)
        # The count is the statement of every keyed request: compiled once, run on the driver (pipeline.db). So are
        # the reads, which a counting connection must run outside a transaction too.
        self._incr, self._incr_guarded = (Prepared(store.engine, self._window_upsert(new))
                                          for new in (plain, guarded))
        self._live = Prepared(store.engine, select(row.hits, row.expires_at).where(row.key == bindparam("key"),
                                                                                   row.expires_at > db_now()))
        self._now = Prepared(store.engine, select(db_now()))

    @staticmethod
    def _window_upsert(new):
        """`new` (an INSERT of key, hits and expires_at), or on a key that has a row: a window that has lapsed
        starts again with `new`'s values, a live one adds `new`'s hits. One statement, so it is atomic."""
        row = rate_limits.c
        lapsed = row.expires_at <= db_now()
        return new.on_conflict_do_update(
            index_elements=[row.key],
            set_={"hits": case((lapsed, new.excluded.hits), else_=row.hits + new.excluded.hits),
                  "expires_at": case((lapsed, new.excluded.expires_at), else_=row.expires_at)},
        ).returning(row.hits, row.expires_at, db_now())

    @property
    def base_exceptions(self) -> tuple[type[Exception], ...]:
        # The count runs on the driver (Prepared), whose errors are not SQLAlchemy's.
        return exc.SQLAlchemyError, self.store.engine.dialect.loaded_dbapi.Error

    @contextmanager
    def bound(self, conn: Connection, guard: int | None = None) -> Iterator[_Binding]:
        """Run this storage's calls on `conn` (a JobStore.counting connection) in this context; `guard`: count only
        while the API key of that id is active (KeyRevoked otherwise)."""
        binding = _Binding(conn, guard)
        token = _bound.set(binding)
        try:
            yield binding
        finally:
            _bound.reset(token)

    @contextmanager
    def _reading(self) -> Iterator[_Binding]:
        binding = _bound.get()
        if binding is not None:
            yield binding
            return
        with self.store.read() as conn:
            yield _Binding(conn)

    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        binding = _bound.get()
        if binding is None:
            with self.store.counting() as conn, self.bound(conn):
                return self.incr(key, expiry, amount)
        params = {"key": key, "amount": amount, "expiry": expiry}
        if binding.guard is None:
            [row] = self._incr.rows(binding.conn, params, commit=True)
        else:
            rows = self._incr_guarded.rows(binding.conn, {**params, "guard": binding.guard}, commit=True)
            if not rows:
                raise KeyRevoked(binding.guard)
            [row] = rows
        hits, expires_at, binding.now = row
        binding.counted[key] = (hits, expires_at)
        return hits

    def _window(self, key: str) -> tuple[int, float] | None:
        with self._reading() as binding:
            if key in binding.counted:
                return binding.counted[key]
            rows = self._live.rows(binding.conn, {"key": key})
        return rows[0] if rows else None

    def get(self, key: str) -> int:
        window = self._window(key)
        return window[0] if window is not None else 0

    def get_expiry(self, key: str) -> float:
        window = self._window(key)
        if window is not None:
            return window[1]
        with self._reading() as binding:
            return self._now.rows(binding.conn, {})[0][0]

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
        binding = _bound.get()
        if binding is None:
            with self.store.write() as conn:
                conn.execute(delete(rate_limits).where(rate_limits.c.key == key))
            return
        binding.conn.execute(delete(rate_limits).where(rate_limits.c.key == key))
        binding.conn.commit()  # a counting connection runs no transaction of its own: this one ends here
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
        """Count one request of the API key `key_id` on `conn` (a JobStore.counting connection); KeyRevoked (and no
        count) when that key is no longer active."""
        item = _per_minute(rpm)
        with self.storage.bound(conn, guard=key_id) as binding:
            allowed = self.strategy.hit(item, "key", str(key_id))
        # The window as this request's count left it: what the strategy's get_window_stats computes (amount less
        # hits; the window's end), from the count's RETURNING rather than through two more storage calls. The
        # reset is on the database's clock, which timed the window, so a replica's own clock does not matter.
        [(hits, expires_at)] = binding.counted.values()
        reset_s = max(1, math.ceil(expires_at - binding.now))
        return RateStatus(limit=rpm, remaining=max(0, rpm - hits), reset_s=reset_s, allowed=allowed)


@lru_cache(maxsize=1024)
def _per_minute(rpm: int) -> RateLimitItem:
    return RateLimitItemPerMinute(rpm)
