"""Delivery of signed `video.*` events after a job's terminal transition, in the background, with retries.

The ingress replica whose `JobStore.finish` landed builds a `WebhookEvent` and hands it to
`WebhookSender.schedule`, which returns at once; delivery runs as a task on the replica's event loop.
Redirects are never followed and environment proxies are ignored. Delivery is at least once: the job record is
the outbox (`JobRecord.webhook`, pending from the terminal write), the outcome is written back there, and a
delivery whose replica died before it ended is sent again by another replica's reclaim scan once its claim
(`claim_s`) lapses, with the same `webhook-id`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import httpx

from serve.config.webhooks import WebhookConfig
from serve.errors import ServiceError
from serve.jobs.record import is_request_id
from serve.webhooks.events import WebhookEvent
from serve.webhooks.signing import WebhookSecrets, signature_header
from serve.webhooks.urlguard import (
    Resolver,
    _Target,
    _UrlProblem,
    check_url,
    redact_url,
    validate_webhook_url,
)

log = logging.getLogger(__name__)

USER_AGENT = "videogen-serve-webhooks/1"

OnResult = Callable[["DeliveryResult"], "Awaitable[None] | None"]


Outcome = Literal["delivered", "failed", "refused"]


@dataclass(frozen=True)
class DeliveryResult:
    msg_id: str
    job_id: str
    tenant: str
    type: str
    outcome: Outcome  # refused: the URL failed the address checks at send time; nothing was sent
    attempts: int  # HTTP attempts made
    status_code: int | None = None  # of the last response, if any
    error: str | None = None
    finished_at: float = field(default_factory=time.time)

    def to_record(self) -> dict[str, Any]:
        """What a job record keeps as its last delivery (`webhook` field)."""
        return {"msg_id": self.msg_id, "type": self.type, "outcome": self.outcome, "attempts": self.attempts,
                "status_code": self.status_code, "error": self.error, "at": int(self.finished_at)}


def _parse_retry_after(value: str | None, now: float) -> float | None:
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - now)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


class WebhookSender:
    """Per-replica delivery of webhook events as background tasks; nothing here raises into the job path."""

    def __init__(self, cfg: WebhookConfig, secrets: WebhookSecrets, *, resolver: Resolver = socket.getaddrinfo,
                 on_result: OnResult | None = None, transport: httpx.AsyncBaseTransport | None = None,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
                 rng: Callable[[], float] = random.random) -> None:
        self.cfg = cfg
        self._secrets = secrets
        self._resolver = resolver
        self._on_result = on_result
        self._transport = transport
        self._clock = clock
        self._sleep = sleep
        self._rng = rng
        self._client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots: asyncio.Semaphore | None = None

    def configure(self, cfg: WebhookConfig, secrets: WebhookSecrets) -> None:
        """New settings and secrets for the next deliveries (the Ingress's reconfigure); deliveries under way
        finish as they started. A new connection limit or timeout gets a new client; the old one is closed
        once nothing uses it (it is left to the garbage collector, its connections time out)."""
        old = self.cfg
        self.cfg, self._secrets = cfg, secrets
        if cfg.max_concurrent_deliveries != old.max_concurrent_deliveries:
            self._slots = None
        if (cfg.max_concurrent_deliveries, cfg.timeout_s) != (old.max_concurrent_deliveries, old.timeout_s):
            self._client = None

    # -- registration ----------------------------------------------------------------------------
    def url_for(self, tenant: str, job_url: str | None) -> str | None:
        """The job's own URL, else the tenant's default, else None (no webhook)."""
        return job_url or self.cfg.tenant_urls.get(tenant)

    async def validate_registration(self, url: str, tenant: str) -> None:
        """ServiceError 400 (param webhook_url) unless events for `tenant` can be sent to `url`."""
        if not self.cfg.enabled:
            raise ServiceError(400, "webhooks are not enabled on this server", param="webhook_url",
                           code="webhooks_disabled")
        if not self._secrets.for_tenant(tenant):
            raise ServiceError(400, "no webhook signing secret is configured for this tenant; ask the operator",
                           param="webhook_url", code="webhook_secret_missing")
        await asyncio.to_thread(validate_webhook_url, url, self.cfg, self._resolver)

    # -- scheduling ------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return len(self._tasks)

    def schedule(self, event: WebhookEvent, on_done: OnResult | None = None) -> bool:
        """Start delivering `event` in the background and return at once; False if it was not accepted.
        `on_done(result)` runs when this delivery ended (the job store records it: the outbox)."""
        if not self.cfg.enabled:
            return False
        if len(self._tasks) >= self.cfg.max_pending:
            log.warning("webhook %s dropped: %d deliveries pending", event.msg_id, len(self._tasks))
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            log.error("webhook %s dropped: schedule() needs the replica's running event loop", event.msg_id)
            return False
        task = loop.create_task(self._run(event, on_done), name=f"webhook-{event.msg_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _run(self, event: WebhookEvent, on_done: OnResult | None = None) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.cfg.max_concurrent_deliveries)
        async with self._slots:
            result = await self.deliver(event)
        if on_done is not None:
            try:
                maybe = on_done(result)
                if inspect.isawaitable(maybe):
                    await maybe
            except Exception:  # noqa: BLE001 - still pending in the record: its claim lapses, another sends again
                log.warning("webhook %s: its outcome was not recorded", event.msg_id, exc_info=True)

    def claim_s(self) -> float:
        """The longest one delivery can take (every attempt timing out after the longest backoff), plus a minute:
        how long a replica that scheduled one holds it before another replica may send it again."""
        cfg = self.cfg
        return cfg.max_attempts * (cfg.timeout_s + cfg.max_backoff_s) + 60.0

    async def aclose(self, grace_s: float = 5.0) -> None:
        """Give pending deliveries `grace_s` to end, cancel the rest (they are lost), close the HTTP client."""
        tasks = list(self._tasks)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=grace_s)
            for t in late:
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)
            if late:
                log.warning("%d webhook deliveries cancelled at shutdown", len(late))
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    # -- one event -------------------------------------------------------------------------------
    async def deliver(self, event: WebhookEvent) -> DeliveryResult:
        """Deliver with retries; returns (and reports to `on_result`) the outcome. Never raises (but cancels)."""
        try:
            result = await self._deliver(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a bug here must not surface in the job path
            log.exception("webhook %s: delivery error", event.msg_id)
            result = self._result(event, "failed", 0, error=f"internal error ({type(exc).__name__})")
        level = logging.INFO if result.outcome == "delivered" else logging.WARNING
        log.log(level, "webhook %s to %s: %s after %d attempt(s)%s", result.msg_id, redact_url(event.url),
                result.outcome, result.attempts, f" ({result.error})" if result.error else "")
        if self._on_result is not None:
            try:
                maybe = self._on_result(result)
                if inspect.isawaitable(maybe):
                    await maybe
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001
                log.warning("webhook %s: on_result hook failed", event.msg_id, exc_info=True)
        return result

    def _result(self, event: WebhookEvent, outcome: Outcome, attempts: int, status_code: int | None = None,
                error: str | None = None) -> DeliveryResult:
        return DeliveryResult(event.msg_id, event.job_id, event.tenant, event.type, outcome, attempts,
                              status_code, error, self._clock())

    def body(self, event: WebhookEvent) -> bytes:
        """The exact bytes sent (and signed): identical on every attempt."""
        stamp = datetime.fromtimestamp(event.occurred_at, tz=timezone.utc).isoformat().replace("+00:00", "Z")
        payload = {"type": event.type, "timestamp": stamp, "data": dict(event.data)}
        body = _dumps(payload)
        if len(body) > self.cfg.max_payload_bytes:
            log.warning("webhook %s: %d-byte payload over %d; sending it thin", event.msg_id, len(body),
                        self.cfg.max_payload_bytes)
            payload["data"] = {"id": event.job_id, "object": event.data.get("object", "video"),
                               "status": event.data.get("status")}
            body = _dumps(payload)
        return body

    async def _deliver(self, event: WebhookEvent) -> DeliveryResult:
        if not self.cfg.enabled:
            return self._result(event, "failed", 0, error="webhooks are disabled")
        keys = self._secrets.for_tenant(event.tenant)
        if not keys:
            return self._result(event, "failed", 0, error="no signing secret for this tenant")
        body = self.body(event)
        sent = 0
        status: int | None = None
        error: str | None = None
        for attempt in range(1, self.cfg.max_attempts + 1):
            retry_after: float | None = None
            try:
                # re-resolved every attempt: a name rebound to a private address since registration is refused
                target = await asyncio.to_thread(check_url, event.url, self.cfg, self._resolver)
            except _UrlProblem as p:
                if not p.transient:
                    return self._result(event, "refused", sent, status, p.message)
                error = p.message
            else:
                sent += 1
                status, retry_after_raw, error = await self._post(target, event, body, keys)
                retry_after = _parse_retry_after(retry_after_raw, self._clock())
                if status is not None:
                    if 200 <= status < 300:
                        return self._result(event, "delivered", sent, status)
                    if 300 <= status < 400:  # never followed: the target was not checked, and may be internal
                        return self._result(event, "failed", sent, status, f"redirect ({status}) not followed")
                    if 400 <= status < 500 and status not in (408, 429):
                        return self._result(event, "failed", sent, status, f"permanent HTTP {status}")
                    error = f"HTTP {status}"
            if attempt < self.cfg.max_attempts:
                await self._sleep(self._backoff(attempt, retry_after))
        return self._result(event, "failed", sent, status, f"gave up after {self.cfg.max_attempts} attempts: "
                                                           f"{error}")

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        cap = min(self.cfg.max_backoff_s, self.cfg.base_backoff_s * 2 ** (attempt - 1))
        delay = self._rng() * cap  # full jitter: retries of many events spread out
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.cfg.max_backoff_s))
        return delay

    async def _post(self, target: _Target, event: WebhookEvent, body: bytes,
                    keys: Sequence[bytes]) -> tuple[int | None, str | None, str | None]:
        """One HTTP attempt to the checked address: (status, Retry-After, error)."""
        ts = int(self._clock())
        headers = {
            "host": target.host_header, "content-type": "application/json", "user-agent": USER_AGENT,
            "webhook-id": event.msg_id, "webhook-timestamp": str(ts),
            "webhook-signature": signature_header(keys, event.msg_id, ts, body),
        }
        # the id the job's create request had, to follow it into the receiver's logs; outside the signature (which
        # covers id, timestamp and body only), so a receiver must not trust it for more than that. A stored value
        # that is no usable token (written by hand, or by a newer release) is left out rather than sent broken.
        if event.request_id is not None and is_request_id(event.request_id):
            headers["x-request-id"] = event.request_id
        # TLS: SNI and the certificate check use the name although the connection goes to the pinned address
        ext = {"sni_hostname": target.host} if target.scheme == "https" and not target.is_ip_literal else {}

        async def attempt() -> tuple[int, str | None]:
            async with self._http().stream("POST", target.pinned_url(), content=body, headers=headers,
                                           extensions=ext) as resp:
                return resp.status_code, resp.headers.get("retry-after")  # body left unread

        try:
            code, retry_after = await asyncio.wait_for(attempt(), self.cfg.timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            return None, None, f"no response within {self.cfg.timeout_s:g} s"
        except httpx.HTTPError as exc:
            return None, None, f"{type(exc).__name__}: {exc}"
        return code, retry_after, None

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                follow_redirects=False,
                trust_env=False,  # an environment proxy would resolve the name itself, undoing the pinning
                timeout=httpx.Timeout(self.cfg.timeout_s),
                limits=httpx.Limits(max_connections=self.cfg.max_concurrent_deliveries),
                transport=self._transport,
            )
        return self._client


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

