"""`Idempotency-Key` on `POST /v1/videos`: the same key and body give the same job, however many retries race.

Sits in `VideoService.create` between validation and the job record: the request claims the key for a job id it
generated *before* writing the record. S3's conditional create (`put_if_absent`) lets exactly one of N concurrent
claimers win; the others read the winner's claim and answer with its job ("replay"), waiting briefly while the
winner is still between its claim and its record. Keys are scoped per tenant; the same key with another body is 422.

S3 layout under the configured prefix:
    idempotency/<tenant>/<sha256(key)>.json   {"version", "body_hash", "job_id", "created_at", "nonce"}

A claim older than `ttl_s` is void: the key may then be reused (for any body). A claim older than `takeover_after_s`
whose job record does not exist belongs to a winner that died between claim and record (or to a job since deleted):
the next request with the key takes it over (`put_if_match` on the claim's ETag, so only one does) and creates the
job itself. The winner re-asserts its claim (`confirm`) just before writing the record, so a winner that stalled past
`takeover_after_s` and lost its claim does not create a second job.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, TypeVar

from serve.config import IdempotencyConfig  # noqa: F401 - defined with the other config models (import order)
from serve.config.tenancy import TENANT_PATTERN
from serve.errors import ServiceError
from serve.storage import NotFound, PreconditionFailed, Storage

HEADER = "Idempotency-Key"
MAX_KEY_CHARS = 255
_TENANT_RE = re.compile(TENANT_PATTERN)
_CLAIM_ROUNDS = 5  # claim records vanishing under us this often in a row means something is badly wrong
J = TypeVar("J")




@dataclass(frozen=True)
class Claim:
    """Who holds a key: `outcome` is "created" for the request that must create `job_id`, else "replay"."""

    outcome: Literal["created", "replay"]
    job_id: str
    etag: str
    created_at: float


@dataclass(frozen=True)
class Resolution(Generic[J]):
    """What `resolve` decided: create `claim.job_id` now, or answer with `job` (a replay)."""

    outcome: Literal["created", "replay"]
    claim: Claim
    job: J | None = None

    @property
    def job_id(self) -> str:
        return self.claim.job_id


def validate_key(key: str) -> str:
    """1..255 printable ASCII characters, else a 400 naming the header."""
    if not 1 <= len(key) <= MAX_KEY_CHARS or not all(" " <= c <= "~" for c in key):
        shown = key if len(key) <= 40 else key[:40] + "..."
        raise ServiceError(400, f"{HEADER} must be 1 to {MAX_KEY_CHARS} printable ASCII characters, got {shown!r} "
                            f"({len(key)} characters)", param=HEADER, code="invalid_idempotency_key")
    return key


def canonical_body(fields: Mapping[str, Any]) -> bytes:
    """The request as its validated fields, sorted, without unset (None) ones.

    Pass `CreateVideoRequest.model_dump(exclude_none=True)`: JSON and multipart bodies, key order, `"seed": "7"` vs
    `7` and an explicit `null` vs an omitted field then give the same bytes.
    """
    clean = {k: v for k, v in fields.items() if v is not None}
    return json.dumps(clean, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def body_hash(canonical: bytes) -> str:
    return hashlib.sha256(canonical).hexdigest()


def _key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("ascii")).hexdigest()


class IdempotencyStore:
    def __init__(self, storage: Storage, ttl_s: float = 24 * 3600, *, takeover_after_s: float = 30.0,
                 now: Callable[[], float] = time.time) -> None:
        self.storage = storage
        self.ttl_s = ttl_s
        self.takeover_after_s = takeover_after_s
        self._now = now

    @classmethod
    def from_config(cls, storage: Storage, cfg: IdempotencyConfig,
                    now: Callable[[], float] = time.time) -> IdempotencyStore:
        return cls(storage, cfg.ttl_s, takeover_after_s=cfg.takeover_after_s, now=now)

    def record_key(self, tenant: str, key: str) -> str:
        if not _TENANT_RE.match(tenant):
            raise ValueError(f"tenant {tenant!r} does not match {TENANT_PATTERN}")
        return self.storage.key("idempotency", tenant, f"{_key_digest(validate_key(key))}.json")

    def _record(self, body: str, job_id: str) -> bytes:
        # The ETag is the content's MD5: a nonce makes every write a new ETag, so `put_if_match` never mistakes a
        # rewrite with the same fields (same clock reading) for the version it read.
        return json.dumps({"version": 1, "body_hash": body, "job_id": job_id, "created_at": self._now(),
                           "nonce": secrets.token_hex(8)}, separators=(",", ":")).encode()

    # -- the primitive --------------------------------------------------------------------------
    def claim(self, tenant: str, key: str, body: str, new_job_id: str) -> Claim:
        """Claim `key` for `new_job_id`, or learn who holds it.

        Returns `Claim("created", new_job_id)` for the one winner (also when an expired claim was replaced) and
        `Claim("replay", <winner's job id>)` for the others. Raises ServiceError 422 `idempotency_key_reused` if the key
        holds a different body, 400 for a malformed key.
        """
        return self._claim(tenant, key, body, new_job_id, read_first=False)

    def _claim(self, tenant: str, key: str, body: str, new_job_id: str, *, read_first: bool) -> Claim:
        s3_key = self.record_key(tenant, key)
        for _ in range(_CLAIM_ROUNDS):
            got = self.storage.get_with_etag(s3_key) if read_first else None
            if got is None:
                try:
                    data = self._record(body, new_job_id)
                    etag = self.storage.put_if_absent(s3_key, data)
                    return Claim("created", new_job_id, etag, json.loads(data)["created_at"])
                except PreconditionFailed:
                    got = self.storage.get_with_etag(s3_key)
                    if got is None:
                        continue  # abandoned between our write and our read: try again
            read_first = True
            data, etag = got
            rec = json.loads(data)
            created_at = float(rec["created_at"])
            if self._now() - created_at >= self.ttl_s:
                try:
                    new = self._record(body, new_job_id)
                    etag = self.storage.put_if_match(s3_key, new, etag)
                    return Claim("created", new_job_id, etag, json.loads(new)["created_at"])
                except (PreconditionFailed, NotFound):
                    continue  # another request replaced it first: read theirs
            if rec["body_hash"] != body:
                raise ServiceError(422, f"this {HEADER} was already used with a different request body; send a new key "
                                    "for a new request", param=HEADER, code="idempotency_key_reused")
            return Claim("replay", rec["job_id"], etag, created_at)
        raise self._in_use()

    # -- the winner's side ----------------------------------------------------------------------
    def confirm(self, tenant: str, key: str, claim: Claim) -> Claim | None:
        """Re-assert a won claim just before writing the job record; None if it was taken over meanwhile.

        Refreshes `created_at`, so the record write that follows has `takeover_after_s` of margin again.
        """
        got = self.storage.get_with_etag(self.record_key(tenant, key))
        if got is None or got[1] != claim.etag:
            return None
        rec = json.loads(got[0])
        try:
            data = self._record(rec["body_hash"], claim.job_id)
            etag = self.storage.put_if_match(self.record_key(tenant, key), data, claim.etag)
        except (PreconditionFailed, NotFound):
            return None
        return Claim("created", claim.job_id, etag, json.loads(data)["created_at"])

    def abandon(self, tenant: str, key: str, claim: Claim) -> None:
        """Give a won claim up when its job will not be created (admission refused it), so a retry can claim again."""
        s3_key = self.record_key(tenant, key)
        got = self.storage.get_with_etag(s3_key)
        if got is not None and json.loads(got[0])["job_id"] == claim.job_id:
            self.storage.delete(s3_key)

    # -- the whole dance, for VideoService.create -----------------------------------------------
    async def resolve(self, tenant: str, key: str, body: str, new_job_id: str,
                      get_job: Callable[[str], J | None], *, wait_s: float = 2.0,
                      poll_s: float = 0.1) -> Resolution[J]:
        """Claim `key`; for a replay, wait up to `wait_s` for the winner's job record (`get_job(id)`, sync).

        "created": the caller admits, `confirm`s, writes the record for `resolution.job_id` (= `new_job_id`, or
        `abandon`s on refusal). "replay": `resolution.job` is the winner's record. A winner dead between claim and
        record is taken over after `takeover_after_s`; before that a retry that outwaits `wait_s` gets 409
        `idempotency_key_in_use` with Retry-After.
        """
        deadline = time.monotonic() + wait_s
        claim = await asyncio.to_thread(self.claim, tenant, key, body, new_job_id)
        while True:
            if claim.outcome == "created":
                return Resolution("created", claim)
            job = await asyncio.to_thread(get_job, claim.job_id)
            if job is not None:
                return Resolution("replay", claim, job)
            if self._now() - claim.created_at >= self.takeover_after_s:
                taken = await asyncio.to_thread(self._take_over, tenant, key, claim, body, new_job_id)
                if taken is not None:
                    return Resolution("created", taken)
            elif time.monotonic() >= deadline:
                raise self._in_use()
            else:
                await asyncio.sleep(poll_s)
            # re-read: the winner may have abandoned the key (admission refused) or someone took it over
            claim = await asyncio.to_thread(self._claim, tenant, key, body, new_job_id, read_first=True)

    def _take_over(self, tenant: str, key: str, stale: Claim, body: str, new_job_id: str) -> Claim | None:
        data = self._record(body, new_job_id)
        try:
            etag = self.storage.put_if_match(self.record_key(tenant, key), data, stale.etag)
        except (PreconditionFailed, NotFound):
            return None
        return Claim("created", new_job_id, etag, json.loads(data)["created_at"])

    @staticmethod
    def _in_use() -> ServiceError:
        return ServiceError(409, f"a request with this {HEADER} is still being processed; retry shortly",
                        param=HEADER, code="idempotency_key_in_use", headers={"Retry-After": "1"})
