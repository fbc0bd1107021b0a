"""Standard Webhooks signatures: tenant secrets (`whsec_...`), HMAC-SHA256 over id.timestamp.body.

Used by the sender for every attempt; `python -m serve.webhooks.signing` prints a fresh secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets as _secrets
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from serve.config.webhooks import WebhookConfig

SECRET_PREFIX = "whsec_"

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
                             f"(e.g. `python -m serve.webhooks.signing`) or webhooks.secrets_file")
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



if __name__ == "__main__":
    print(generate_secret())
