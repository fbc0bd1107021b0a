"""S3 access for one bucket and key prefix: videos, covers, metadata and the job store's records.

Sits under everything that touches S3: `serve.jobs.store` (job records, conditional writes), the upload step after
VAE decoding (videos/covers) and the content endpoint (presigned GET URLs). Built from `S3Config`; works against AWS
(standard credential chain) or any S3-compatible endpoint (moto locally, MinIO, ...).

Every method that takes a `key` expects a full key as returned by `Storage.key(...)` (prefix already applied), and
`list_keys` returns full keys, so a key read from a listing can be passed straight back.

Every write also feeds `WriteHealth`, from which the ingress's /readyz judges whether S3 takes writes now without a
write per probe (`Storage.write_problem`; a canary write only when the replica has been idle).
"""

from __future__ import annotations

import io
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import quote

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from serve.config import S3Config
from serve.metrics import ObservedS3Client, StorageObserver, s3_error_code

logger = logging.getLogger(__name__)

_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchBucket"})
# S3 answers a failed If-None-Match/If-Match with 412; a conditional write racing another write on the same key can
# also get 409 ConditionalRequestConflict. Both mean "someone else moved the object first".
_PRECONDITION_CODES = frozenset({"412", "PreconditionFailed", "409", "ConditionalRequestConflict"})
_DELETE_BATCH = 1000  # DeleteObjects limit
CANARY_KEY = "health/canary"  # under the prefix; one object every replica overwrites


class StorageError(Exception):
    """S3 is unreachable, misconfigured or refused the call. Maps to HTTP 503 at the API."""

    status_code = 503


class NotFound(StorageError):
    """The key (or bucket) does not exist."""

    status_code = 404


class PreconditionFailed(StorageError):
    """A conditional write lost: the object exists (IfNoneMatch) or changed since it was read (IfMatch)."""

    status_code = 409


CHUNK_BYTES = 1024 * 1024  # what one read of a streamed object returns at most


def _chunks(body: Any) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(CHUNK_BYTES)
    finally:
        body.close()


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str
    content_type: str | None
    last_modified: datetime | None
    metadata: dict[str, str] = field(default_factory=dict)


def _error_code(exc: ClientError) -> str:
    err = exc.response.get("Error", {})
    code = str(err.get("Code", ""))
    status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return code or status


def _is(exc: ClientError, codes: frozenset[str]) -> bool:
    err = exc.response.get("Error", {})
    status = str(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
    return str(err.get("Code", "")) in codes or status in codes


def _content_disposition(filename: str) -> str:
    # ASCII fallback for old clients plus RFC 6266 filename* for the real (possibly non-ASCII) name.
    ascii_name = filename.encode("ascii", "replace").decode("ascii").replace('"', "").replace("\\", "")
    ascii_name = "".join(c if c.isprintable() else "_" for c in ascii_name) or "download"
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"


class WriteHealth:
    """Whether S3 takes writes now, judged from the outcomes of this process's own writes: no write per question.

    `Storage` records the outcome of every write it makes (puts, conditional puts, multipart uploads, deletes,
    bucket creation). The rule: S3 is not writable while the latest outcome is a failure, or while a canary has
    been unanswered for `canary_timeout_s`; the next write that succeeds clears it. One failure is enough to flip,
    as a failed write already is botocore's `S3Config.max_attempts` tries. An answer S3 gives on purpose (a lost
    conditional write, 412/409; a missing key) is the write path working, not failing. Under a partial outage the
    verdict follows each write, so it flaps as the writes do.

    No verdict goes stale while someone asks: once nothing was written for `canary_interval_s`, `claim_canary`
    hands one caller the canary write (one at a time, at most one per interval), whose outcome lands here like any
    other write's. Thread-safe; `clock` (monotonic seconds) is injectable for tests.
    """

    def __init__(self, canary_interval_s: float, canary_timeout_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.canary_interval_s = canary_interval_s
        self.canary_timeout_s = canary_timeout_s
        self._clock = clock
        self._lock = threading.Lock()
        self._last_at: float | None = None  # when the latest outcome landed
        self._last_error: str | None = None  # "<operation>: <code>" while the latest outcome is a failure
        self._failing_since = 0.0  # when the first of the failures in a row landed
        self._failures = 0  # failures in a row
        self._canary_started: float | None = None  # the latest canary's start
        self._canary_running = False

    def record(self, operation: str, error: str | None) -> None:
        """One write's outcome: `error` is the S3 error code of a failure, None for a success."""
        with self._lock:
            now = self._clock()
            self._last_at = now
            if error is None:
                self._last_error, self._failures = None, 0
                return
            if self._failures == 0:
                self._failing_since = now
            self._failures += 1
            self._last_error = f"{operation}: {error}"

    def problem(self) -> str | None:
        """Why S3 does not take writes now (safe to show unauthenticated: no key, bucket or endpoint), or None."""
        with self._lock:
            now = self._clock()
            if self._last_error is not None:
                return (f"writes failing for {now - self._failing_since:.0f}s ({self._failures} in a row; the latest "
                        f"{now - self._last_at:.0f}s ago, {self._last_error})")
            # a hung canary says nothing once a later real write was answered
            started = self._canary_started
            answered_since = started is not None and self._last_at is not None and self._last_at >= started
            if self._canary_running and started is not None and not answered_since \
                    and now - started >= self.canary_timeout_s:
                return f"canary write unanswered for {now - started:.0f}s"
            return None

    def claim_canary(self) -> bool:
        """True for the one caller that should write the canary now (then call `canary_finished`): nothing was
        written, and no canary started, for `canary_interval_s`, and none is in flight. True before any write."""
        with self._lock:
            now = self._clock()
            latest = max((t for t in (self._last_at, self._canary_started) if t is not None), default=None)
            if self._canary_running or (latest is not None and now - latest < self.canary_interval_s):
                return False
            self._canary_started, self._canary_running = now, True
            return True

    def canary_finished(self) -> None:
        with self._lock:
            self._canary_running = False


class Storage:
    """One bucket + prefix. Thread-safe: boto3 clients may be shared between threads."""

    def __init__(self, cfg: S3Config, client: Any | None = None, list_page_size: int = 1000,
                 observer: StorageObserver | None = None, write_health: WriteHealth | None = None) -> None:
        self.cfg = cfg
        self.write_health = write_health if write_health is not None else WriteHealth(
            cfg.canary_interval_s, cfg.canary_timeout_s)
        self._page = max(1, min(list_page_size, 1000))  # ListObjectsV2 returns at most 1000 keys a page
        self.bucket = cfg.bucket
        prefix = cfg.prefix.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self._client = client if client is not None else self._make_client(cfg.max_attempts)
        if observer is not None:  # per-call seconds, bytes and errors for metrics (deployments/metrics.py)
            self._client = ObservedS3Client(self._client, observer)
        self._probe_client: Any | None = None
        self._transfer = TransferConfig(
            multipart_threshold=cfg.multipart_threshold_bytes,
            multipart_chunksize=cfg.multipart_threshold_bytes,
            max_concurrency=4,
        )

    @classmethod
    def from_config(cls, cfg: S3Config, observer: StorageObserver | None = None) -> Storage:
        return cls(cfg, observer=observer)

    @property
    def client(self) -> Any:
        """The configured boto3 S3 client (endpoint, SigV4, retries), e.g. for downloading model weights."""
        return self._client

    def _make_client(self, total_max_attempts: int) -> Any:
        cfg = self.cfg
        if cfg.endpoint_url or "." in cfg.bucket:
            # S3-compatible stores (moto, MinIO, Ceph) are addressed by path: virtual-host names such as
            # `bucket.localhost` do not resolve everywhere; dotted bucket names break TLS on virtual hosts.
            addressing = "path"
        else:
            # botocore's default ("auto") presigns against the global `bucket.s3.amazonaws.com` even for other
            # regions; S3 may answer that with a redirect to the regional host, and the SigV4 signature (which
            # covers the host) then fails. "virtual" gives `bucket.s3.<region>.amazonaws.com`.
            addressing = "virtual"
        config = Config(
            # Without s3v4 boto3 presigns SigV2-style URLs against a custom endpoint.
            signature_version="s3v4",
            # total_max_attempts counts the first try; `max_attempts` in the same dict would count retries only.
            retries={"mode": "standard", "total_max_attempts": total_max_attempts},
            connect_timeout=cfg.connect_timeout_s,
            read_timeout=cfg.read_timeout_s,
            region_name=cfg.region,
            s3={"addressing_style": addressing},
            max_pool_connections=cfg.io_threads,  # one connection per I/O thread (botocore's default is 10)
        )
        # A session per Storage: the default session is not thread-safe to create clients from.
        session = boto3.session.Session()
        return session.client("s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region, config=config)

    # ---- keys ---------------------------------------------------------------------------------------------------

    def key(self, *parts: str) -> str:
        """Join parts with '/' under the prefix. A last part that is "" or ends in '/' keeps a trailing '/':
        `key("index", tenant, "")` is a listing prefix that cannot match another tenant's `index/<tenant>x/`."""
        if not parts:
            return self.prefix
        rel = "/".join(p.strip("/") for p in parts if p.strip("/"))
        if rel and (parts[-1] == "" or parts[-1].endswith("/")):
            rel += "/"
        return self.prefix + rel

    # ---- bucket -------------------------------------------------------------------------------------------------

    def ensure_bucket(self) -> None:
        """Create the bucket when `create_bucket` is set (local runs); an existing bucket is fine."""
        if not self.cfg.create_bucket:
            return
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.cfg.region != "us-east-1":
            # us-east-1 rejects an explicit LocationConstraint; every other region needs one.
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.cfg.region}
        try:
            self._client.create_bucket(**kwargs)
            logger.info("created bucket %s", self.bucket)
        except ClientError as exc:
            if _error_code(exc) in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                self._record("create_bucket", None)
                return
            self._record("create_bucket", exc)
            raise StorageError(f"cannot create bucket {self.bucket!r}: {exc}") from exc
        except BotoCoreError as exc:
            self._record("create_bucket", exc)
            raise StorageError(f"cannot create bucket {self.bucket!r} at {self._where()}: {exc}") from exc
        self._record("create_bucket", None)

    def check(self) -> None:
        """HeadBucket, once and without retries (readiness should reflect now); raises StorageError."""
        if self._probe_client is None:
            self._probe_client = self._make_client(1)
        try:
            self._probe_client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = _error_code(exc)
            if code in ("404", "NoSuchBucket", "NotFound"):
                msg = f"bucket {self.bucket!r} does not exist at {self._where()}"
            elif code in ("403", "AccessDenied", "Forbidden"):
                msg = f"access to bucket {self.bucket!r} at {self._where()} denied (check credentials/policy)"
            else:
                msg = f"bucket {self.bucket!r} at {self._where()} answered {code}"
            raise StorageError(msg) from exc
        except BotoCoreError as exc:
            raise StorageError(f"S3 at {self._where()} unreachable: {exc}") from exc

    def write_problem(self, wait_s: float) -> str | None:
        """Why S3 does not take writes now, or None (`WriteHealth`'s rule). Writes nothing itself unless the canary
        is due (see `WriteHealth.claim_canary`); then it writes `CANARY_KEY` on a thread of its own, through the
        same client and retries as every write (it fails when a real write would), and waits up to `wait_s` for the
        outcome, so this answer reflects it. A slower canary lands in a later answer."""
        if self.write_health.claim_canary():
            done = threading.Event()
            threading.Thread(target=self._write_canary, args=(done,), name="s3-write-canary", daemon=True).start()
            done.wait(wait_s)
        return self.write_health.problem()

    def _write_canary(self, done: threading.Event) -> None:
        try:
            self.put_json(self.key(CANARY_KEY), {"written_at": time.time()})  # put_json records the outcome
        except StorageError as exc:
            logger.warning("S3 write canary failed: %s", exc)
        finally:
            self.write_health.canary_finished()
            done.set()

    def _record(self, operation: str, exc: BaseException | None) -> None:
        """Feed one write's outcome to `write_health`; an error S3 answers on purpose (412, 409, a missing key;
        `s3_error_code` says None) shows the write path working, so it counts as a success."""
        self.write_health.record(operation, None if exc is None else s3_error_code(exc))

    def _where(self) -> str:
        return self.cfg.endpoint_url or f"AWS {self.cfg.region}"

    # ---- plain objects ------------------------------------------------------------------------------------------

    def put_bytes(
        self, key: str, data: bytes, content_type: str, metadata: Mapping[str, str] | None = None
    ) -> None:
        """Upload; above `multipart_threshold_bytes` as a multipart upload (parallel parts, per-part retries)."""
        extra: dict[str, Any] = {"ContentType": content_type}
        if metadata:
            extra["Metadata"] = dict(metadata)
        try:
            if len(data) < self.cfg.multipart_threshold_bytes:
                # Small objects: one PutObject, skipping the transfer manager's thread pool.
                self._client.put_object(Bucket=self.bucket, Key=key, Body=data, **extra)
            else:
                self._client.upload_fileobj(
                    io.BytesIO(data), self.bucket, key, ExtraArgs=extra, Config=self._transfer
                )
        except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
            self._record("put", exc)
            raise StorageError(f"put s3://{self.bucket}/{key} failed: {exc}") from exc
        self._record("put", None)

    def get_bytes(self, key: str) -> bytes:
        got = self.get_with_etag(key)
        if got is None:
            raise NotFound(f"s3://{self.bucket}/{key} not found")
        return got[0]

    def get_json(self, key: str) -> Any:
        return json.loads(self.get_bytes(key))

    def put_json(self, key: str, value: Any) -> None:
        self.put_bytes(key, _dumps(value), "application/json")

    def _read(self, op: str, key: str, call: Callable[..., Any], **kwargs: Any) -> Any:
        """One S3 read of `key`: a missing object is `NotFound`, any other failure `StorageError`."""
        try:
            return call(Bucket=self.bucket, Key=key, **kwargs)
        except ClientError as exc:
            if _is(exc, _NOT_FOUND_CODES):
                raise NotFound(f"s3://{self.bucket}/{key} not found") from exc
            raise StorageError(f"{op} s3://{self.bucket}/{key} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"{op} s3://{self.bucket}/{key} failed: {exc}") from exc

    def head(self, key: str) -> ObjectInfo:
        r = self._read("head", key, self._client.head_object)
        return ObjectInfo(
            key=key,
            size=int(r.get("ContentLength", 0)),
            etag=r.get("ETag", ""),
            content_type=r.get("ContentType"),
            last_modified=r.get("LastModified"),
            metadata=dict(r.get("Metadata") or {}),
        )

    def open_range(self, key: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes `start..end` (inclusive) of an object, streamed in chunks (never the whole object in memory).
        The S3 response is opened here, so a missing object raises `NotFound` before the first chunk."""
        r = self._read("get", key, self._client.get_object, Range=f"bytes={start}-{end}")
        return _chunks(r["Body"])

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except NotFound:
            return False
        return True

    # Deletes count as writes for `write_health`: they change the bucket as puts do, and fail with them in an
    # outage; a replica whose deletes fail cannot honour DELETE /v1/videos either.
    def delete(self, key: str) -> None:
        """Idempotent: deleting a missing key succeeds."""
        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            self._record("delete", exc)
            raise StorageError(f"delete s3://{self.bucket}/{key} failed: {exc}") from exc
        self._record("delete", None)

    def delete_many(self, keys: Iterable[str]) -> None:
        keys = list(dict.fromkeys(keys))
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = keys[i : i + _DELETE_BATCH]
            try:
                r = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            except (ClientError, BotoCoreError) as exc:
                self._record("delete", exc)
                raise StorageError(f"delete of {len(batch)} keys in {self.bucket!r} failed: {exc}") from exc
            # DeleteObjects answers 200 even when single keys fail; the failures are in the body.
            errors = [e for e in r.get("Errors", []) if e.get("Code") not in ("NoSuchKey",)]
            self.write_health.record("delete", str(errors[0].get("Code") or "other") if errors else None)
            if errors:
                first = errors[0]
                raise StorageError(
                    f"delete of {len(errors)} keys in {self.bucket!r} failed, "
                    f"e.g. {first.get('Key')!r}: {first.get('Code')} {first.get('Message')}"
                )

    def list_keys(self, prefix: str, start_after: str | None = None, max_keys: int = 1000) -> list[str]:
        """Up to `max_keys` full keys under `prefix`, in key order, strictly after `start_after`."""
        keys: list[str] = []
        token: str | None = None
        while len(keys) < max_keys:
            kwargs: dict[str, Any] = {
                "Bucket": self.bucket,
                "Prefix": prefix,
                "MaxKeys": min(self._page, max_keys - len(keys)),
            }
            if token:
                kwargs["ContinuationToken"] = token
            elif start_after:
                kwargs["StartAfter"] = start_after
            r = self._list_page(kwargs)
            keys.extend(obj["Key"] for obj in r.get("Contents", []))
            token = r.get("NextContinuationToken")
            if not r.get("IsTruncated") or not token:
                break
        return keys[:max_keys]

    def _list_page(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """One ListObjectsV2 call (`kwargs` name the bucket, prefix and cursor)."""
        try:
            return self._client.list_objects_v2(**kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"list s3://{self.bucket}/{kwargs.get('Prefix', '')} failed: {exc}") from exc

    def list_prefixes(self, prefix: str) -> list[str]:
        """The "directories" one level under `prefix` (S3 common prefixes with delimiter '/'), each ending in '/'."""
        out: list[str] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/"}
            if token:
                kwargs["ContinuationToken"] = token
            r = self._list_page(kwargs)
            out.extend(p["Prefix"] for p in r.get("CommonPrefixes", []))
            token = r.get("NextContinuationToken")
            if not r.get("IsTruncated") or not token:
                return out

    def put_lifecycle(self, rules: list[dict[str, Any]]) -> None:
        """Replace the bucket's lifecycle configuration with `rules` (S3's `Rules` shape)."""
        try:
            self._client.put_bucket_lifecycle_configuration(Bucket=self.bucket,
                                                            LifecycleConfiguration={"Rules": rules})
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"put lifecycle of s3://{self.bucket} failed: {exc}") from exc

    def get_lifecycle(self) -> list[dict[str, Any]]:
        try:
            return self._client.get_bucket_lifecycle_configuration(Bucket=self.bucket).get("Rules", [])
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") == "NoSuchLifecycleConfiguration":
                return []
            raise StorageError(f"get lifecycle of s3://{self.bucket} failed: {exc}") from exc

    # ---- conditional primitives (the job store's compare-and-swap) ----------------------------------------------

    def get_with_etag(self, key: str) -> tuple[bytes, str] | None:
        try:
            r = self._client.get_object(Bucket=self.bucket, Key=key)
            return r["Body"].read(), r["ETag"]
        except ClientError as exc:
            if _is(exc, _NOT_FOUND_CODES):
                return None
            raise StorageError(f"get s3://{self.bucket}/{key} failed: {exc}") from exc
        except BotoCoreError as exc:
            raise StorageError(f"get s3://{self.bucket}/{key} failed: {exc}") from exc

    def put_if_absent(self, key: str, data: bytes, content_type: str = "application/json") -> str:
        """Create `key` only if it does not exist; returns the new ETag. Raises PreconditionFailed if it exists."""
        return self._put_conditional(key, data, content_type, IfNoneMatch="*")

    def put_if_match(self, key: str, data: bytes, etag: str, content_type: str = "application/json") -> str:
        """Replace `key` only if its ETag is still `etag`; returns the new ETag.

        Raises PreconditionFailed if it changed, NotFound if it was deleted meanwhile.
        """
        return self._put_conditional(key, data, content_type, IfMatch=etag)

    def _put_conditional(self, key: str, data: bytes, content_type: str, **cond: str) -> str:
        try:
            r = self._client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type, **cond)
        except ClientError as exc:
            self._record("conditional_put", exc)  # a lost race is S3 answering; NoSuchBucket is not
            if _is(exc, _PRECONDITION_CODES):
                raise PreconditionFailed(f"conditional put of s3://{self.bucket}/{key} lost ({cond})") from exc
            if _is(exc, _NOT_FOUND_CODES):
                raise NotFound(f"s3://{self.bucket}/{key} not found for conditional put") from exc
            raise StorageError(f"put s3://{self.bucket}/{key} failed: {exc}") from exc
        except BotoCoreError as exc:
            self._record("conditional_put", exc)
            raise StorageError(f"put s3://{self.bucket}/{key} failed: {exc}") from exc
        self._record("conditional_put", None)
        return r["ETag"]

    # ---- presigned URLs -----------------------------------------------------------------------------------------

    def presign_get(
        self,
        key: str,
        expires_s: int | None = None,
        filename: str | None = None,
        content_type: str | None = None,
    ) -> str:
        """A SigV4 GET URL, minted per call and never stored (it carries a short-lived signature)."""
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if filename:
            params["ResponseContentDisposition"] = _content_disposition(filename)
        if content_type:
            params["ResponseContentType"] = content_type
        try:
            return self._client.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=int(expires_s or self.cfg.presign_expires_s)
            )
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"presign s3://{self.bucket}/{key} failed: {exc}") from exc


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
