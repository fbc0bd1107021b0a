"""API keys → tenants: the auth step of the ingress, before validation, safety and quotas.

A key is `vg_<key_id>_<secret>`: `key_id` (12 hex) is public — it names the key in listings, logs and usage
records and is how `KeyRing.authenticate` finds the entry; the secret is shown once by the operator CLI
(`serve/tenancy/admin.py`) and never stored. The keys file (JSON, written by that CLI and mounted from a
Kubernetes Secret in production) holds only a hash of each whole key.

Hashing is one SHA-256 (or HMAC-SHA256 keyed with `VIDEOGEN_KEY_PEPPER`, so a leaked keys file alone cannot
even be used to test guesses). A slow KDF (bcrypt, scrypt, argon2) exists to protect low-entropy passwords
from offline guessing; our secrets are 256 random bits, which no amount of hashing speed makes guessable, and a
fast hash keeps auth off the request's critical path.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from serve.config.tenancy import PLAN_PATTERN, TENANT_PATTERN, KeysConfig

log = logging.getLogger(__name__)

KEY_PREFIX = "vg_"
PEPPER_ENV = "VIDEOGEN_KEY_PEPPER"
KEY_ID_PATTERN = r"^[0-9a-f]{12}$"
# plan names end up in config keys and metric labels: the tenant alphabet suits them too
HASH_PATTERN = r"^(sha256|hmac-sha256):[0-9a-f]{64}$"
_KEY_RE = re.compile(r"^vg_([0-9a-f]{12})_([A-Za-z0-9_-]{32,128})$")
# anything longer is not one of our keys; refusing it early bounds the hashing work an anonymous caller can cause
MAX_PRESENTED_CHARS = 512

Compare = Callable[[bytes, bytes], bool]


class KeysFileError(ValueError):
    """The keys file is missing or malformed; the message names the place, never a hash."""


def generate_key() -> tuple[str, str]:
    """A new `(key_id, key)`; `secrets.token_urlsafe(32)` is 256 random bits in 43 url-safe characters."""
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def parse_key_id(presented: str) -> str | None:
    """The key_id of a well-formed `vg_` key, else None."""
    match = _KEY_RE.match(presented)
    return match.group(1) if match else None


def hash_key(key: str, pepper: bytes | None) -> str:
    """`scheme:hexdigest` of the whole key; the scheme says whether a pepper was used."""
    data = key.encode("utf-8")
    if pepper:
        return "hmac-sha256:" + hmac.new(pepper, data, hashlib.sha256).hexdigest()
    return "sha256:" + hashlib.sha256(data).hexdigest()


def pepper_from_env() -> bytes | None:
    value = os.environ.get(PEPPER_ENV, "")
    return value.encode("utf-8") if value else None


class KeyEntry(BaseModel):
    """One key in the keys file. The hash is kept out of `repr` so a logged entry leaks nothing."""

    # forbid: a typo such as "revoked" for "revoked_at" must fail loudly, not leave a key silently alive
    model_config = ConfigDict(extra="forbid", frozen=True)

    key_id: str = Field(pattern=KEY_ID_PATTERN, description="Public id: 12 lowercase hex digits.")
    tenant: str = Field(pattern=TENANT_PATTERN, description="Tenant the key acts for.")
    plan: str = Field(pattern=PLAN_PATTERN, description="Plan name (see serve/tenancy/plans.py).")
    hash: str = Field(pattern=HASH_PATTERN, repr=False, description="`sha256:<hex>` or `hmac-sha256:<hex>`.")
    created_at: int = Field(ge=0, description="Unix seconds.")
    revoked_at: int | None = Field(default=None, ge=0, description="Unix seconds; set = the key is refused.")
    label: str = Field(default="", max_length=200, description="Operator's note (e.g. 'ci').")


class KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = Field(default=1, ge=1, le=1, description="File format version.")
    keys: list[KeyEntry] = Field(default_factory=list, description="Every key ever issued, revoked ones too.")

    @field_validator("keys")
    @classmethod
    def _unique_ids(cls, keys: list[KeyEntry]) -> list[KeyEntry]:
        seen: set[str] = set()
        for entry in keys:
            if entry.key_id in seen:
                raise ValueError(f"key_id {entry.key_id} appears twice")
            seen.add(entry.key_id)
        return keys


def read_keys_file(path: str | Path) -> KeysFile:
    try:
        raw = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise KeysFileError(f"cannot read keys file {path}: {exc.strerror or exc}") from None
    try:
        return KeysFile.model_validate(json.loads(raw))
    except json.JSONDecodeError as exc:
        raise KeysFileError(f"keys file {path} is not JSON: {exc.msg} at line {exc.lineno}") from None
    except ValidationError as exc:
        # include_input=False: pydantic would otherwise quote the offending value, which may be a hash
        first = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        raise KeysFileError(f"keys file {path}: {where}: {first['msg']}") from None


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts for. Carries no secret, so it may be logged and attached to the request."""

    tenant: str
    plan: str
    key_id: str


_FROM_ENV = object()


def _stamp_of(path: Path) -> tuple[int, int, int, int]:
    # inode too: an atomic rename (our CLI, or Kubernetes swapping the Secret's ..data symlink) may keep mtime
    # within the filesystem's resolution; os.stat follows the symlink to the current target
    st = os.stat(path)
    return st.st_ino, st.st_dev, st.st_mtime_ns, st.st_size


class KeyRing:
    """Answers "which tenant is this bearer token?" in constant time per key format.

    Built from a keys file (`load`, re-read when it changes), from plain development keys (`from_plain`),
    or both. `compare` and `clock` are injectable so tests can count comparisons and skip the reload wait.
    """

    def __init__(self, *, path: str | Path | None = None, plain: Mapping[str, tuple[str, str]] | None = None,
                 pepper: bytes | None | object = _FROM_ENV, compare: Compare = hmac.compare_digest,
                 clock: Callable[[], float] = time.monotonic, reload_interval_s: float = 1.0) -> None:
        self._pepper: bytes | None = pepper_from_env() if pepper is _FROM_ENV else pepper  # type: ignore[assignment]
        self._compare = compare
        self._clock = clock
        self._interval = reload_interval_s
        self._path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._by_id: dict[str, tuple[KeyEntry, Principal]] = {}
        self._stamp: tuple[int, int, int, int] | None = None
        if self._path is not None:
            # stat before reading: a change landing in between is then seen (and re-read) at the next check
            self._stamp = _stamp_of(self._path)
            self._by_id = self._index(read_keys_file(self._path).keys)
        self._plain = self._hash_plain(plain or {})
        # unknown key ids are compared against this, same scheme and length as a real hash
        self._dummy = hash_key(secrets.token_urlsafe(32), self._pepper).encode()
        self._checked_at = clock()

    @classmethod
    def load(cls, path: str | Path, **kwargs: object) -> KeyRing:
        return cls(path=path, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def from_plain(cls, keys: Mapping[str, tuple[str, str]], **kwargs: object) -> KeyRing:
        """Plain `{key: (tenant, plan)}` (local development); hashed at once, the plain text is not kept."""
        return cls(plain=keys, **kwargs)  # type: ignore[arg-type]

    def _hash_plain(self, keys: Mapping[str, tuple[str, str]]) -> list[tuple[bytes, Principal]]:
        out = []
        for n, (key, (tenant, plan)) in enumerate(keys.items()):
            if not key or parse_key_id(key) is not None:
                # a vg_-shaped key is looked up by key_id only, so as a plain key it could never match
                raise ValueError(f"plain key #{n} must be non-empty and not in the vg_<id>_<secret> format")
            for what, value in (("tenant", tenant), ("plan", plan)):
                if not re.match(TENANT_PATTERN, value):
                    raise ValueError(f"plain key #{n}: {what} {value!r} must match {TENANT_PATTERN}")
            out.append((hash_key(key, self._pepper).encode(), Principal(tenant, plan, f"legacy-{n}")))
        return out

    def _index(self, entries: Iterable[KeyEntry]) -> dict[str, tuple[KeyEntry, Principal]]:
        scheme = "hmac-sha256:" if self._pepper else "sha256:"
        index = {}
        for e in entries:
            if e.revoked_at is None and not e.hash.startswith(scheme):
                log.warning("key %s is hashed as %s but this server uses %s (is %s set the same as for the "
                            "CLI?); it cannot authenticate", e.key_id, e.hash.split(":")[0], scheme[:-1],
                            PEPPER_ENV)
            index[e.key_id] = (e, Principal(e.tenant, e.plan, e.key_id))
        return index

    # -- lookup ----------------------------------------------------------------------------------
    def authenticate(self, presented: str) -> Principal | None:
        """The key's principal, or None for a malformed, unknown, wrong or revoked key."""
        self._maybe_reload()
        if not presented or len(presented) > MAX_PRESENTED_CHARS:
            return None
        digest = hash_key(presented, self._pepper).encode()
        key_id = parse_key_id(presented)
        if key_id is not None:
            found = self._by_id.get(key_id)  # one read: a concurrent reload swaps the whole dict
            # an unknown id costs the same one comparison as a known one: timing must not reveal which ids exist
            ok = self._compare(digest, found[0].hash.encode() if found else self._dummy)
            if found is None or not ok:
                log.debug("authentication failed for key_id %s", key_id)
                return None
            entry, principal = found
            if entry.revoked_at is not None:
                log.info("revoked key used: key_id=%s tenant=%s", key_id, entry.tenant)
                return None
            return principal
        # plain keys have no id: compare against every one (at least once), never stopping at the first hit
        match = None
        for expected, principal in self._plain or [(self._dummy, None)]:
            if self._compare(digest, expected) and match is None:
                match = principal
        return match

    def plans_in_use(self) -> set[str]:
        """Plans named by active keys: check them against the configured plans at start-up."""
        return {e.plan for e, _ in self._by_id.values() if e.revoked_at is None} | {p.plan for _, p in self._plain}

    def __len__(self) -> int:
        return len(self._by_id) + len(self._plain)

    def __repr__(self) -> str:
        return (f"KeyRing(path={str(self._path) if self._path else None!r}, keys={len(self._by_id)}, "
                f"plain_keys={len(self._plain)}, peppered={self._pepper is not None})")

    # -- hot reload ------------------------------------------------------------------------------
    def _maybe_reload(self) -> None:
        if self._path is None or self._clock() - self._checked_at < self._interval:
            return
        if not self._lock.acquire(blocking=False):
            return  # another request is checking right now; this one uses the keys as they are
        try:
            self._checked_at = self._clock()
            try:
                stamp = _stamp_of(self._path)
            except OSError as exc:
                log.error("keys file %s is unreadable (%s); keeping the %d keys loaded", self._path,
                          exc.strerror, len(self._by_id))
                return
            if stamp == self._stamp:
                return
            self._stamp = stamp  # a broken file is reported once, and re-read when it changes again
            try:
                by_id = self._index(read_keys_file(self._path).keys)
            except KeysFileError as exc:
                log.error("%s; keeping the %d keys loaded before", exc, len(self._by_id))
                return
            self._by_id = by_id
            log.info("reloaded keys file %s: %d keys", self._path, len(by_id))
        finally:
            self._lock.release()


def keyring_from_config(keys: KeysConfig, legacy_keys: Iterable[str] = ()) -> KeyRing:
    """The ingress's KeyRing: the keys file if configured, plain `api.api_keys` only where allowed."""
    plain = {k: (keys.legacy_tenant, keys.legacy_plan) for k in legacy_keys}
    if keys.keys_file is None:
        return KeyRing.from_plain(plain)
    return KeyRing.load(keys.keys_file, plain=plain if keys.allow_legacy_keys else None,
                        reload_interval_s=keys.reload_interval_s)
