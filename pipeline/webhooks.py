"""Signed, durable webhooks: when a job with a `callback_url` completes or fails, its status object is POSTed there.

- Signed as the Standard Webhooks specification says (https://www.standardwebhooks.com, "Signature scheme"):
  `webhook-id` (the same on every retry of one delivery, so a receiver can drop duplicates), `webhook-timestamp`
  (seconds since the epoch, of this attempt) and `webhook-signature: v1,<base64 HMAC-SHA256 of
  "{id}.{timestamp}.{body}">` keyed with the secret of GROK3D_WEBHOOK_SECRET (`whsec_<base64>`). The signing is
  the `standardwebhooks` package's own, so its `Webhook.verify` accepts what we send.
- Durable: the delivery is written to the `webhook_deliveries` outbox in the transaction that ends the job
  (pipeline/jobs.py), so it exists exactly when the end does, whatever crashes after. Any process's sender claims
  due deliveries with a compare-and-set that pushes `next_attempt_at` past the send's timeout: a sender killed
  mid-send (kill -9 included) leaves the delivery to be claimed again once that passes. At least once, never lost.
- Retries: any answer but a 2xx (redirects are not followed), or no answer, is retried after the backoff of
  pipeline/retry.py's RetryPolicy (equal jitter, doubling from GROK3D_WEBHOOK_BACKOFF_S up to an hour; a 429's or
  503's Retry-After honoured), until 24 hours after the job ended; then the delivery is `failed`.
- Server-side request forgery: an address must be https, and every address its host resolves to must be a public
  one (no private, loopback, link-local, multicast or reserved address), checked when the job is submitted and
  again when each attempt connects: the connection goes to the very address that was checked (the TLS handshake
  still names and verifies the host), so a DNS answer that changes in between cannot redirect it.
  GROK3D_WEBHOOK_ALLOW_PRIVATE=1 allows http and private addresses (tests, `make dev`, a receiver on the LAN).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import typing
from datetime import datetime, timezone
from math import floor

import httpcore
import httpx
from sqlalchemy import and_, select, update
from standardwebhooks import Webhook

from pipeline.db import db_now, jobs, webhook_deliveries
from pipeline.jobs import JobStore
from pipeline.retry import RetryPolicy

log = logging.getLogger("grok3d.webhooks")

BACKOFF_CAP_S = 3600.0  # retries at least once an hour until the 24 hours are over
CLAIM_MARGIN_S = 5.0  # a claimed delivery is claimable again this long after its send's timeout
BATCH = 16  # deliveries claimed and sent at once by one process
RESOLVE_TIMEOUT_S = 5.0
USER_AGENT = "grok3d-webhooks/0.1"

NOT_HTTPS = "callback_url must be an https URL"
NO_CREDENTIALS = "callback_url must not contain a user name or password"
UNRESOLVED = "callback_url's host could not be resolved"
NOT_PUBLIC = "callback_url must not point to a private, loopback, link-local or reserved address"
NOT_CONFIGURED = "Webhooks are not configured: set GROK3D_WEBHOOK_SECRET"


class UnsafeCallback(Exception):
    """A callback address that may not be called; the message is the sentence for the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class DeliveryFailed(Exception):
    """One attempt did not get a 2xx. `retry_after_s`: the receiver's Retry-After, read by RetryPolicy."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after_s = retry_after_s


# -- the address check ----------------------------------------------------------------------------------------

def _allowed(address: str, allow_private: bool) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 zone (fe80::1%eth0) is not part of the address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
    if ip.is_multicast or ip.is_unspecified:
        return False
    # is_global is false for private, loopback, link-local, reserved, shared (100.64/10) and documentation ranges.
    return allow_private or ip.is_global


def check_syntax(url: str, allow_private: bool) -> httpx.URL:
    """The URL's form: https (or http where private addresses are allowed), a host, no credentials."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        raise UnsafeCallback(NOT_HTTPS) from None
    schemes = ("https", "http") if allow_private else ("https",)
    if parsed.scheme not in schemes or not parsed.host:
        raise UnsafeCallback(NOT_HTTPS)
    if parsed.userinfo:
        raise UnsafeCallback(NO_CREDENTIALS)
    return parsed


async def resolve_allowed(host: str, port: int, allow_private: bool) -> list[str]:
    """The addresses of `host` to connect to; UnsafeCallback unless there is one and every one is allowed (a host
    with one private address among public ones is refused: which one a connection gets is not ours to choose)."""
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        addresses = [host]
    except ValueError:
        try:
            infos = await asyncio.wait_for(
                asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_S)
        except (OSError, TimeoutError, UnicodeError):
            raise UnsafeCallback(UNRESOLVED) from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise UnsafeCallback(UNRESOLVED)
    if not all(_allowed(address, allow_private) for address in addresses):
        raise UnsafeCallback(NOT_PUBLIC)
    return addresses


async def check_callback_url(url: str, allow_private: bool) -> None:
    """At submission: the whole check (a 400 with the sentence when it fails)."""
    parsed = check_syntax(url, allow_private)
    await resolve_allowed(parsed.host, parsed.port or (443 if parsed.scheme == "https" else 80), allow_private)


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """httpcore's network backend, connecting only to addresses that pass the check, and to the address it checked
    (never resolving again): DNS rebinding between check and connect cannot reach a private address."""

    def __init__(self, allow_private: bool) -> None:
        self._inner = httpcore.AnyIOBackend()
        self._allow_private = allow_private

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                          socket_options: typing.Iterable | None = None) -> httpcore.AsyncNetworkStream:
        try:
            addresses = await resolve_allowed(host, port, self._allow_private)
        except UnsafeCallback as exc:
            raise httpcore.ConnectError(exc.message) from None
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(address, port, timeout=timeout, local_address=local_address,
                                                     socket_options=socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: typing.Iterable | None = None) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("webhooks go over TCP only")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def checked_client(allow_private: bool, timeout_s: float) -> httpx.AsyncClient:
    """An httpx client whose every connection passes the address check; no proxy from the environment, no
    redirects."""
    transport = httpx.AsyncHTTPTransport(trust_env=False)
    # httpx's transport builds its httpcore pool without a way to pass a network backend
    # (httpx/_transports/default.py, AsyncHTTPTransport.__init__): the same pool, with ours.
    transport._pool = httpcore.AsyncConnectionPool(ssl_context=httpx.create_ssl_context(trust_env=False),
                                                   max_connections=BATCH, network_backend=_CheckedBackend(allow_private))
    return httpx.AsyncClient(transport=transport, timeout=timeout_s, follow_redirects=False, trust_env=False,
                             headers={"user-agent": USER_AGENT})


# -- signing --------------------------------------------------------------------------------------------------

def signed_headers(signer: Webhook, webhook_id: str, payload: str, at: datetime | None = None) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt: the timestamp is the attempt's, the id the delivery's."""
    at = at or datetime.now(timezone.utc)
    return {"content-type": "application/json", "webhook-id": webhook_id,
            "webhook-timestamp": str(floor(at.timestamp())),
            "webhook-signature": signer.sign(webhook_id, at, payload)}


# -- the sender -----------------------------------------------------------------------------------------------

class WebhookSender:
    """Sends due deliveries from the outbox, in every process (claims keep two from sending one at once)."""

    def __init__(self, store: JobStore, *, secret: str | None, allow_private: bool, timeout_s: float = 10.0,
                 backoff_s: float = 5.0, poll_s: float = 1.0) -> None:
        self.store = store
        self._signer = Webhook(secret) if secret else None
        self._allow_private = allow_private
        self._timeout_s = timeout_s
        self._policy = RetryPolicy(max_retries=1_000_000, backoff_base_s=backoff_s, backoff_cap_s=BACKOFF_CAP_S)
        self._poll_s = poll_s
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._client = checked_client(self._allow_private, self._timeout_s)
        self._loop_task = asyncio.create_task(self._loop(), name="grok3d-webhooks")

    async def stop(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()

    def wake(self) -> None:
        """A job ended here: its delivery is due now, not at the next poll."""
        self._wake.set()

    async def _loop(self) -> None:
        while True:
            claimed: list = []
            try:
                claimed = await asyncio.to_thread(self._claim_due)
                if claimed:
                    await asyncio.gather(*(self._deliver(*row) for row in claimed))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("webhook sender: a round failed; the next one goes on")
            if len(claimed) >= BATCH:
                continue  # more may be due
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._poll_s)
            except TimeoutError:
                pass

    def _claim_due(self) -> list[tuple[str, str, str, str, int]]:
        """Take up to BATCH due deliveries: (webhook_id, job_id, url, payload, attempt number)."""
        d = webhook_deliveries.c
        with self.store._write() as conn:  # the store's write transaction (one writer at a time on SQLite)
            due = conn.execute(select(d.webhook_id, d.attempts, d.next_attempt_at)
                               .where(d.state.in_(("pending", "retrying")), d.next_attempt_at <= db_now())
                               .order_by(d.next_attempt_at).limit(BATCH)).all()
            claimed = []
            for webhook_id, attempts, next_at in due:
                row = conn.execute(
                    update(webhook_deliveries)
                    .where(d.webhook_id == webhook_id, d.attempts == attempts, d.next_attempt_at == next_at)
                    .values(attempts=attempts + 1, next_attempt_at=db_now() + self._timeout_s + CLAIM_MARGIN_S)
                    .returning(d.webhook_id, d.job_id, d.url, d.payload, d.attempts)).one_or_none()
                if row is not None:
                    claimed.append(tuple(row))
        return claimed

    async def _deliver(self, webhook_id: str, job_id: str, url: str, payload: str, attempt: int) -> None:
        try:
            await self._send(webhook_id, url, payload)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure of an attempt is recorded and retried
            reason = str(exc) or type(exc).__name__
            wait_s = self._policy.wait_s(attempt, exc)
            state = await asyncio.to_thread(self._record_failure, webhook_id, job_id, attempt, reason, wait_s)
            log.warning("webhook %s of job %s: attempt %d failed (%s); %s", webhook_id, job_id, attempt, reason,
                        f"next in {wait_s:.1f} s" if state == "retrying" else "given up after 24 hours")
            return
        await asyncio.to_thread(self._record, webhook_id, job_id, attempt, "delivered", None, None)
        log.info("webhook %s of job %s delivered (attempt %d)", webhook_id, job_id, attempt)

    async def _send(self, webhook_id: str, url: str, payload: str) -> None:
        if self._signer is None:
            raise DeliveryFailed("GROK3D_WEBHOOK_SECRET is not set, so the webhook cannot be signed")
        assert self._client is not None
        check_syntax(url, self._allow_private)  # the address again: the connection checks where it goes
        try:
            response = await self._client.post(url, content=payload.encode(),
                                               headers=signed_headers(self._signer, webhook_id, payload))
        except httpx.HTTPError as exc:
            raise DeliveryFailed(f"no answer: {exc}") from None
        if not response.is_success:
            raise DeliveryFailed(f"answered {response.status_code}", _retry_after(response))

    def _record_failure(self, webhook_id: str, job_id: str, attempt: int, reason: str, wait_s: float) -> str:
        with self.store._read() as conn:
            give_up_at, now = conn.execute(select(webhook_deliveries.c.give_up_at, db_now())
                                           .where(webhook_deliveries.c.webhook_id == webhook_id)).one()
        state = "retrying" if now + wait_s < give_up_at else "failed"
        self._record(webhook_id, job_id, attempt, state, reason, wait_s)
        return state

    def _record(self, webhook_id: str, job_id: str, attempt: int, state: str, reason: str | None,
                wait_s: float | None) -> None:
        """The attempt's outcome, on the delivery and on its job's status, if this attempt is still the delivery's
        latest (a sender that outlived its claim changes nothing)."""
        d = webhook_deliveries.c
        values: dict = {"state": state, "last_error": reason}
        if wait_s is not None:
            values["next_attempt_at"] = db_now() + wait_s
        with self.store._write() as conn:
            done = conn.execute(update(webhook_deliveries)
                                .where(and_(d.webhook_id == webhook_id, d.attempts == attempt,
                                            d.state.in_(("pending", "retrying"))))
                                .values(**values)).rowcount
            if done:
                conn.execute(update(jobs).where(jobs.c.job_id == job_id).values(webhook_status=state))


def _retry_after(response: httpx.Response) -> float | None:
    """RFC 9110 §10.2.3 Retry-After in seconds (a date is ignored: the backoff stands)."""
    value = response.headers.get("retry-after", "")
    return float(value) if value.strip().isdigit() else None

