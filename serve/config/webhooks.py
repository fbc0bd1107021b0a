"""`webhooks:` config section: where signed video.* events may go and how they are retried (a leaf)."""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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

