"""API keys: how they look, how they are kept (the `api_keys` table of pipeline.db), and how one is found.

A key is `g3d_` and 32 random bytes in URL-safe base64 (secrets.token_urlsafe: 256 bits from the OS's CSPRNG). It
is shown once, when it is made, and stored only as its SHA-256. A fast hash is the right one here: a slow,
salted hash (bcrypt, scrypt, Argon2) protects passwords, which are guessable; a 256-bit random key cannot be
guessed, so its plain SHA-256 is as safe as the key itself (a leaked table gives nothing to try), and it lets a
key be found by an index lookup on every request, where a salted hash would need a scan. The stored hash is
compared with the presented one in constant time (hmac.compare_digest), so the comparison tells nothing either.

The `prefix` makes a leaked key recognisable to people and to secret scanners, and lets a request that is not a
grok3d key be refused without a lookup. A key's limits are fixed when it is made; a revoked key keeps its row
(its jobs keep their owner, and its name stays taken).

Every method is blocking: async callers run them in a thread.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, fields

from sqlalchemy import Connection, bindparam, exc, insert, select, update

from pipeline.db import api_keys
from pipeline.jobs import JobStore, utc_now_iso

KEY_PREFIX = "g3d_"
KEY_RE = re.compile(r"g3d_[A-Za-z0-9_-]{43}")  # the prefix and 32 bytes of unpadded URL-safe base64
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")

# The limits of a key made without them (README.md and docs/API.md document these numbers).
DEFAULT_RPM = 600  # every keyed request counts, status polls too: a page or CLI polls twice a second
DEFAULT_MAX_IN_FLIGHT = 3
DEFAULT_JOBS_PER_DAY = 50  # one job is one paid image


class KeyStoreError(Exception):
    """A key operation that cannot be done (a taken name, no such key): its message says why."""


@dataclass(frozen=True)
class ApiKey:
    """One row of `api_keys`, less its hash."""

    id: int
    name: str
    rpm: int
    max_in_flight: int
    jobs_per_day: int
    created_at: str
    revoked_at: str | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


_KEY_COLUMNS = [api_keys.c[f.name] for f in fields(ApiKey)]


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """The API keys, in the job store's database (so every replica sharing the store shares them)."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._find = select(*_KEY_COLUMNS, api_keys.c.key_hash).where(api_keys.c.key_hash == bindparam("key_hash"))

    def create(self, name: str, *, rpm: int = DEFAULT_RPM, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
               jobs_per_day: int = DEFAULT_JOBS_PER_DAY) -> tuple[ApiKey, str]:
        """A new key: its row, and the key itself, which exists nowhere else from now on."""
        if not NAME_RE.fullmatch(name):
            raise KeyStoreError(f"invalid key name {name!r}: 1 to 64 letters, digits, '.', '_', '@' or '-', starting "
                            "with a letter or digit")
        for what, value in (("--rpm", rpm), ("--max-in-flight", max_in_flight), ("--jobs-per-day", jobs_per_day)):
            if value < 1:
                raise KeyStoreError(f"{what} must be at least 1")
        key = new_key()
        values = dict(name=name, key_hash=hash_key(key), rpm=rpm, max_in_flight=max_in_flight,
                      jobs_per_day=jobs_per_day, created_at=utc_now_iso())
        try:
            with self.store.write() as conn:
                row = conn.execute(insert(api_keys).values(**values).returning(*_KEY_COLUMNS)).one()
        except exc.IntegrityError:
            raise KeyStoreError(f"a key named {name!r} exists already (a revoked key keeps its name)") from None
        return ApiKey(**row._mapping), key

    def list(self) -> list[ApiKey]:
        with self.store.read() as conn:
            rows = conn.execute(select(*_KEY_COLUMNS).order_by(api_keys.c.created_at, api_keys.c.id)).all()
        return [ApiKey(**row._mapping) for row in rows]

    def revoke(self, name: str) -> ApiKey:
        """Revoke the key named `name`; the next request that presents it is refused, on every replica (each
        request looks its key up in the store). Revoking a revoked key changes nothing."""
        with self.store.write() as conn:
            conn.execute(update(api_keys).where(api_keys.c.name == name, api_keys.c.revoked_at.is_(None))
                         .values(revoked_at=utc_now_iso()))
            row = conn.execute(select(*_KEY_COLUMNS).where(api_keys.c.name == name)).one_or_none()
        if row is None:
            raise KeyStoreError(f"no key named {name!r}")
        return ApiKey(**row._mapping)

    def find(self, conn: Connection, presented: str) -> ApiKey | None:
        """The active key whose secret is `presented`, read on `conn`; None for an unknown or revoked key."""
        if KEY_RE.fullmatch(presented) is None:
            return None  # not a grok3d key at all: no lookup
        digest = hash_key(presented)
        row = conn.execute(self._find, {"key_hash": digest}).one_or_none()
        if row is None or not hmac.compare_digest(row.key_hash, digest) or row.revoked_at is not None:
            return None
        return ApiKey(**{name: row._mapping[name] for name in (f.name for f in fields(ApiKey))})
