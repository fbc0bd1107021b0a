"""Signed `video.*` webhooks: a job's end, told to the tenant's own HTTP endpoint without slowing the job down.

Sits after the terminal transition of a job (`completed` / `failed` / `cancelled`): the ingress replica whose
`JobStore.finish` landed builds a `WebhookEvent` and hands it to `WebhookSender.schedule`, which returns at once;
delivery runs as a background task on the replica's event loop. Registration (POST /v1/videos with `webhook_url`)
calls `validate_webhook_url` first.

Wire format: the Standard Webhooks spec (https://www.standardwebhooks.com): body
`{"type", "timestamp", "data"}`, headers `webhook-id` (stable per event, so retries share it and receivers dedupe),
`webhook-timestamp` (unix seconds, per attempt) and `webhook-signature` (`v1,<base64 HMAC-SHA256>` over
`"{id}.{timestamp}.{body}"`, one entry per configured secret so secrets can be rotated).

SSRF: the URL is checked at registration and again at every attempt (DNS is re-resolved, so a name rebound to a
private address after registration is refused), and the attempt connects to the very address that was checked
(the URL's host is replaced by the IP; `Host` and TLS SNI/certificate checks keep the name), so there is no window
between the check and the connect. Redirects are never followed and environment proxies are ignored.

Delivery is at most once per `schedule` call: an event still pending when the replica stops is lost (no outbox).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import inspect
import ipaddress
import json
import logging
import os
import random
import re
import secrets as _secrets
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve.api.errors import ApiError

log = logging.getLogger(__name__)

EventType = Literal["video.completed", "video.failed", "video.cancelled"]
EVENT_FOR_STATUS: dict[str, EventType] = {
    "completed": "video.completed", "failed": "video.failed", "cancelled": "video.cancelled"}
SECRET_PREFIX = "whsec_"
USER_AGENT = "videogen-serve-webhooks/1"

Resolver = Callable[..., Sequence[tuple[Any, ...]]]  # socket.getaddrinfo's shape
OnResult = Callable[["DeliveryResult"], "Awaitable[None] | None"]

# Names that only ever mean "this machine" or "the cloud's metadata service"; refused before any DNS lookup.
_BLOCKED_NAMES = frozenset({"localhost", "metadata", "metadata.google.internal", "metadata.goog",
                            "instance-data", "instance-data.ec2.internal"})
_BLOCKED_SUFFIXES = (".localhost", ".internal", ".local", ".home.arpa")
# Metadata / platform endpoints; some (Azure's wire server) are globally routable addresses.
_METADATA_IPS = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "168.63.129.16", "100.100.100.200", "fd00:ec2::254", "192.0.0.192"))
_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_IETF_V4 = ipaddress.ip_network("192.0.0.0/24")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_V4_COMPAT = ipaddress.ip_network("::/96")
_TEREDO = ipaddress.ip_network("2001::/32")
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$", re.IGNORECASE)
_HOST_LABEL = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


# ---- config and secrets -------------------------------------------------------------------------------------------


class WebhookConfig(BaseModel):
    """`webhooks:` in the app config."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="Accept `webhook_url` and send video.* events.")
    secrets_file: str | None = Field(
        default=None,
        description="YAML/JSON mapping tenant -> `whsec_<base64>` secret (or a list, newest first, to rotate). "
        "Mount it from a Kubernetes Secret.")
    secret_env: str = Field(
        default="VIDEOGEN_WEBHOOK_SECRET",
        description="Environment variable with the default secret(s) (space-separated) for tenants absent from "
        "`secrets_file`. A secret shared by tenants lets one forge events for another: use per-tenant secrets "
        "when tenants are separate parties.")
    tenant_urls: dict[str, str] = Field(
        default_factory=dict, description="Per-tenant default webhook URL, used when a job names none.")
    max_attempts: int = Field(default=6, ge=1, le=20, description="Attempts per event, the first included.")
    base_backoff_s: float = Field(default=1.0, ge=0, description="First retry waits up to this (full jitter).")
    max_backoff_s: float = Field(default=300.0, ge=0, description="Cap of one wait, Retry-After included.")
    timeout_s: float = Field(default=10.0, gt=0, description="Wall-clock limit of one attempt (connect to headers).")
    allow_hosts: list[str] = Field(
        default_factory=list,
        description="Exact `host` or `host:port` entries (IPv6 as `[::1]:8080`) allowed even when they resolve to "
        "non-public addresses: private deployments and tests.")
    allowed_ports: list[int] = Field(default_factory=list, description="Accepted ports; empty = any 1..65535.")
    require_https: bool = Field(default=True, description="Refuse plain http:// URLs (set False for local runs).")
    max_payload_bytes: int = Field(
        default=256 * 1024, ge=1024, description="Larger events are sent thin: `data` keeps only id/object/status.")
    max_url_chars: int = Field(default=2048, ge=64, description="Longest accepted webhook URL.")
    max_concurrent_deliveries: int = Field(default=32, ge=1, description="In-flight HTTP attempts per replica.")
    max_pending: int = Field(default=10_000, ge=1, description="Queued events per replica; more are dropped.")

    @field_validator("allow_hosts")
    @classmethod
    def _normalise_hosts(cls, hosts: list[str]) -> list[str]:
        out = []
        for entry in hosts:
            e = entry.strip().lower()
            m = re.match(r"^(?:\[([0-9a-f:.]+)\]|([^:/@\[\]\s]+))(?::(\d{1,5}))?$", e)
            if not m:
                raise ValueError(f"allow_hosts entries are `host`, `host:port` or `[v6]:port`, got {entry!r}")
            v6, name, port = m.groups()
            try:
                host = f"[{ipaddress.IPv6Address(v6).compressed}]" if v6 else name.rstrip(".")
            except ValueError:
                raise ValueError(f"allow_hosts: {entry!r} holds an invalid IPv6 address") from None
            out.append(f"{host}:{int(port)}" if port else host)
        return out

    @field_validator("tenant_urls")
    @classmethod
    def _url_syntax(cls, urls: dict[str, str]) -> dict[str, str]:
        for tenant, url in urls.items():
            if urlsplit(url).scheme.lower() not in ("http", "https"):
                raise ValueError(f"tenant_urls[{tenant!r}] must be an http(s) URL, got {url!r}")
        return urls

    @model_validator(mode="after")
    def _backoff_order(self) -> WebhookConfig:
        if self.max_backoff_s < self.base_backoff_s:
            raise ValueError(f"max_backoff_s ({self.max_backoff_s}) must be >= base_backoff_s ({self.base_backoff_s})")
        return self


def generate_secret() -> str:
    """A fresh `whsec_<base64 of 32 random bytes>` secret."""
    return SECRET_PREFIX + base64.b64encode(_secrets.token_bytes(32)).decode("ascii")


def decode_secret(secret: str) -> bytes:
    """The HMAC key inside a `whsec_` secret; ValueError says what is wrong (never echoing the secret)."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret must start with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except ValueError:
        raise ValueError(f"a webhook secret must be {SECRET_PREFIX!r} + standard base64") from None
    if len(key) < 24:
        raise ValueError(f"a webhook secret must hold at least 24 bytes, got {len(key)}")
    return key


class WebhookSecrets:
    """Signing keys by tenant, with a default for tenants without their own."""

    def __init__(self, per_tenant: Mapping[str, Sequence[bytes]] | None = None,
                 default: Sequence[bytes] = ()) -> None:
        self._per_tenant = {t: list(keys) for t, keys in (per_tenant or {}).items()}
        self._default = list(default)

    @classmethod
    def from_config(cls, cfg: WebhookConfig, environ: Mapping[str, str] = os.environ) -> WebhookSecrets:
        per_tenant: dict[str, list[bytes]] = {}
        if cfg.secrets_file:
            data = yaml.safe_load(Path(cfg.secrets_file).read_text()) or {}
            if not isinstance(data, dict):
                raise ValueError(f"{cfg.secrets_file}: expected a mapping tenant -> secret")
            for tenant, value in data.items():
                values = [value] if isinstance(value, str) else list(value or [])
                try:
                    per_tenant[str(tenant)] = [decode_secret(v) for v in values]
                except ValueError as exc:
                    raise ValueError(f"{cfg.secrets_file}: tenant {tenant!r}: {exc}") from None
        default = [decode_secret(s) for s in environ.get(cfg.secret_env, "").split()]
        if cfg.enabled and not per_tenant and not default:
            raise ValueError(f"webhooks are enabled but no secret is configured: set {cfg.secret_env} "
                             f"(e.g. `python -m serve.webhooks`) or webhooks.secrets_file")
        return cls(per_tenant, default)

    def for_tenant(self, tenant: str) -> list[bytes]:
        """Keys to sign with, newest first; [] when the tenant has none."""
        return self._per_tenant.get(tenant) or self._default


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256(key, "{msg_id}.{timestamp}.{body}")>` (Standard Webhooks, symmetric)."""
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def signature_header(keys: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    # space-separated: a receiver still holding the previous secret verifies during a rotation
    return " ".join(sign(k, msg_id, timestamp, body) for k in keys)


# ---- URL checks ---------------------------------------------------------------------------------------------------


class _UrlProblem(Exception):
    """What is wrong with a webhook URL; `transient` problems (DNS failures) may clear on a later attempt."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.transient = transient


@dataclass(frozen=True)
class _Target:
    """A checked URL: where to connect (`addresses`, all checked) and what to tell the server (`host_header`)."""

    scheme: str
    host: str  # normalised: lowercase IDNA name or canonical IP, no brackets
    port: int
    path: str  # path + query, as given
    addresses: tuple[str, ...]
    is_ip_literal: bool

    @property
    def host_header(self) -> str:
        h = f"[{self.host}]" if ":" in self.host else self.host
        return h if _DEFAULT_PORTS[self.scheme] == self.port else f"{h}:{self.port}"

    def pinned_url(self) -> str:
        ip = self.addresses[0]
        netloc = f"[{ip}]" if ":" in ip else ip
        return f"{self.scheme}://{netloc}:{self.port}{self.path}"


def _legacy_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """`inet_aton` forms (2130706433, 0x7f.1, 0177.0.0.1, 127.1) as the address they mean; None for names.

    Parsed here rather than by `socket.inet_aton`, whose leniency differs between C libraries. Like the WHATWG
    URL parser, a host whose last label is numeric is an IPv4 address or invalid, never a name.
    """
    labels = host.split(".")
    if not _NUMERIC_LABEL.match(labels[-1]):
        return None
    if len(labels) > 4 or not all(_NUMERIC_LABEL.match(p) for p in labels):
        raise _UrlProblem(f"host {host!r} is neither a host name nor a valid IPv4 address")
    values = []
    for p in labels:
        if p[:2].lower() == "0x":
            values.append(int(p[2:] or "0", 16))
        elif len(p) > 1 and p.startswith("0"):
            if any(c not in "01234567" for c in p):
                raise _UrlProblem(f"host {host!r} has an invalid octal part {p!r}")
            values.append(int(p, 8))
        else:
            values.append(int(p))
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (5 - len(values)):
        raise _UrlProblem(f"host {host!r} is out of the IPv4 range")
    n = last
    for i, v in enumerate(head):
        n |= v << (8 * (3 - i))
    return ipaddress.IPv4Address(n)


def _special_use_problem(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """The special-use kinds that IPv4 and IPv6 share (checked first by both)."""
    if ip in _METADATA_IPS:
        return "a cloud metadata endpoint"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    return None


def _v4_problem(ip: ipaddress.IPv4Address) -> str | None:
    if problem := _special_use_problem(ip):
        return problem
    if ip in _CGNAT:
        return "shared address space (CGNAT 100.64.0.0/10)"
    if ip.is_reserved:  # before is_private, which also covers 240.0.0.0/4
        return "reserved"
    if ip.is_private or ip in _IETF_V4:
        return "private"
    if not ip.is_global:
        return "not globally routable"
    return None


def address_problem(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why `ip` is not a public unicast address a webhook may reach; None when it is."""
    if isinstance(ip, ipaddress.IPv4Address):
        return _v4_problem(ip)
    ip = ipaddress.IPv6Address(ip.compressed.split("%")[0])  # drop a scope id
    embedded: tuple[str, ipaddress.IPv4Address] | None = None
    if ip.ipv4_mapped is not None:
        embedded = ("IPv4-mapped", ip.ipv4_mapped)
    elif ip.sixtofour is not None:
        embedded = ("6to4", ip.sixtofour)
    elif ip in _NAT64:
        embedded = ("NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    elif ip in _V4_COMPAT and int(ip) > 1:
        embedded = ("IPv4-compatible", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    if embedded is not None:
        kind, v4 = embedded
        inner = _v4_problem(v4)
        if inner:
            return f"{kind} IPv6 embedding {v4} ({inner})"
        if kind == "IPv4-compatible":
            return "IPv4-compatible IPv6 (deprecated)"
        return None
    if problem := _special_use_problem(ip):
        return problem
    if ip.is_site_local:
        return "site-local"
    if ip in _TEREDO:
        return "a Teredo tunnel address"
    if ip in _NAT64_LOCAL:
        return "local-use NAT64"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "not globally routable"
    return None


def _allow_listed(cfg: WebhookConfig, host: str, port: int) -> bool:
    h = f"[{host}]" if ":" in host else host
    return h in cfg.allow_hosts or f"{h}:{port}" in cfg.allow_hosts


def _resolve(resolver: Resolver, host: str, port: int) -> list[str]:
    try:
        infos = resolver(host, port, 0, socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise _UrlProblem(f"host {host!r} does not resolve ({exc})", transient=True) from None
    addresses = list(dict.fromkeys(str(info[4][0]).split("%")[0] for info in infos))
    if not addresses:
        raise _UrlProblem(f"host {host!r} resolves to no address", transient=True)
    return addresses


def check_url(url: str, cfg: WebhookConfig, resolver: Resolver = socket.getaddrinfo) -> _Target:
    """Parse, normalise and (unless allow-listed) check every address `url` resolves to; raises _UrlProblem.

    Blocking (DNS): call it through `asyncio.to_thread` from async code.
    """
    # 1. shape of the URL
    if not isinstance(url, str) or not url:
        raise _UrlProblem("webhook_url must be a non-empty string")
    if len(url) > cfg.max_url_chars:
        raise _UrlProblem(f"webhook_url is {len(url)} characters long; at most {cfg.max_url_chars} are accepted")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in url):
        raise _UrlProblem("webhook_url must not contain whitespace or control characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS:
        raise _UrlProblem(f"webhook_url must use https (or http where allowed), got scheme {parts.scheme!r}")
    if scheme == "http" and cfg.require_https:
        raise _UrlProblem("webhook_url must use https")
    if "@" in parts.netloc:
        raise _UrlProblem("webhook_url must not carry credentials (user:password@); authenticate with the signature")
    try:
        port = parts.port or _DEFAULT_PORTS[scheme]
    except ValueError:
        raise _UrlProblem(f"webhook_url has an invalid port in {parts.netloc!r}") from None
    if parts.port == 0 or (cfg.allowed_ports and port not in cfg.allowed_ports):
        allowed = ", ".join(map(str, cfg.allowed_ports)) or "1..65535"
        raise _UrlProblem(f"webhook_url port {port} is not accepted (allowed: {allowed})")
    raw_host = (parts.hostname or "").rstrip(".")
    if not raw_host:
        raise _UrlProblem("webhook_url has no host")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    # 2. the host: an IP literal (any spelling) or a host name
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None
    if ":" in raw_host:
        try:
            ip = ipaddress.IPv6Address(raw_host.split("%")[0])
        except ValueError:
            raise _UrlProblem(f"host {raw_host!r} is not a valid IPv6 address") from None
    else:
        try:
            host_ascii = raw_host.encode("idna").decode("ascii").lower()
        except UnicodeError:
            raise _UrlProblem(f"host {raw_host!r} is not a valid host name") from None
        ip = _legacy_ipv4(host_ascii)
        if ip is None and (len(host_ascii) > 253 or not all(_HOST_LABEL.match(lbl)
                                                               for lbl in host_ascii.split("."))):
            raise _UrlProblem(f"host {raw_host!r} is not a valid host name")
    host = ip.compressed if ip is not None else host_ascii
    listed = _allow_listed(cfg, host, port)

    # 3. where it leads: every address must be public, unless the host is allow-listed
    if ip is not None:
        addresses = [ip.compressed]
    else:
        if not listed and (host in _BLOCKED_NAMES or host.endswith(_BLOCKED_SUFFIXES)):
            raise _UrlProblem(f"host {host!r} is an internal or metadata name")
        addresses = _resolve(resolver, host, port)
    if not listed:
        for a in addresses:
            try:
                problem = address_problem(ipaddress.ip_address(a))
            except ValueError:
                problem = "not an IP address"
            if problem:
                via = "" if ip is not None else f" resolves to {a}, which"
                raise _UrlProblem(f"host {host!r}{via} is {problem}; webhooks go to public addresses only")
    return _Target(scheme, host, port, path, tuple(addresses), ip is not None)


def validate_webhook_url(url: str, cfg: WebhookConfig, resolver: Resolver = socket.getaddrinfo) -> None:
    """Refuse a webhook URL that is malformed or leads to a non-public address: ApiError 400 (param webhook_url).

    Blocking (DNS): call it through `asyncio.to_thread` from async code.
    """
    try:
        check_url(url, cfg, resolver)
    except _UrlProblem as p:
        raise ApiError(400, p.message, param="webhook_url", code="invalid_webhook_url") from None


def redact_url(url: str) -> str:
    """scheme://host[:port]/… for logs: paths and queries often carry tokens."""
    try:
        p = urlsplit(url)
        return f"{p.scheme}://{p.hostname}{f':{p.port}' if p.port else ''}/…"
    except ValueError:
        return "<invalid url>"


# ---- events and delivery ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookEvent:
    type: EventType
    job_id: str
    tenant: str
    url: str
    data: Mapping[str, Any]  # the video object, as GET /v1/videos/{id} returns it
    occurred_at: float  # unix seconds of the terminal transition

    @classmethod
    def for_status(cls, status: str, *, job_id: str, tenant: str, url: str, data: Mapping[str, Any],
                   occurred_at: float) -> WebhookEvent:
        if status not in EVENT_FOR_STATUS:
            raise ValueError(f"webhooks are sent for {sorted(EVENT_FOR_STATUS)} jobs, got status {status!r}")
        return cls(EVENT_FOR_STATUS[status], job_id, tenant, url, data, occurred_at)

    @property
    def msg_id(self) -> str:
        """Stable per (job, event type): every attempt carries it, so receivers can deduplicate."""
        return f"msg_{self.job_id}_{self.type.removeprefix('video.')}"


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

    # -- registration ----------------------------------------------------------------------------
    def url_for(self, tenant: str, job_url: str | None) -> str | None:
        """The job's own URL, else the tenant's default, else None (no webhook)."""
        return job_url or self.cfg.tenant_urls.get(tenant)

    async def validate_registration(self, url: str, tenant: str) -> None:
        """ApiError 400 (param webhook_url) unless events for `tenant` can be sent to `url`."""
        if not self.cfg.enabled:
            raise ApiError(400, "webhooks are not enabled on this server", param="webhook_url",
                           code="webhooks_disabled")
        if not self._secrets.for_tenant(tenant):
            raise ApiError(400, "no webhook signing secret is configured for this tenant; ask the operator",
                           param="webhook_url", code="webhook_secret_missing")
        await asyncio.to_thread(validate_webhook_url, url, self.cfg, self._resolver)

    # -- scheduling ------------------------------------------------------------------------------
    @property
    def pending(self) -> int:
        return len(self._tasks)

    def schedule(self, event: WebhookEvent) -> bool:
        """Start delivering `event` in the background and return at once; False if it was not accepted."""
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
        task = loop.create_task(self._run(event), name=f"webhook-{event.msg_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def _run(self, event: WebhookEvent) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.cfg.max_concurrent_deliveries)
        async with self._slots:
            await self.deliver(event)

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


if __name__ == "__main__":
    print(generate_secret())
