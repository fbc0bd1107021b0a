"""Usage metering for billing: one record per completed job in S3, summed per tenant and day for `GET /v1/usage`.

Sits after the terminal transition of a job: the ingress replica whose `JobStore.finish(..., "completed")` landed
builds a `UsageRecord` from the finished job record (`UsageRecord.from_job`) and calls `UsageLedger.record`.

Billing rules:
- Only `completed` jobs are billed. Failed and cancelled jobs, and the failed attempts of a job that completed in
  the end, are not: the timings a completed record holds are those of its successful attempt only.
- A job is billed once: its record lives at `usage/<tenant>/<day>/<job_id>.json` (the day of `completed_at`, which
  the job record fixes at its one terminal transition) and is written with put-if-absent, so a repeated `record`
  (a retried finish, a second replica, a backfill) is a no-op.
- GPU-seconds of a stage = its wall seconds x the GPUs its replica holds (a fraction where replicas share a GPU).
  Amounts are kept in whole milli-GPU-seconds when summed, so totals equal the sum of the days, which equals the sum
  of the records, exactly.

`usage/_days/<day>/<tenant>` markers (tenants start with a letter or digit, so `_days` is no tenant) list the tenants
with usage on a day, for `load_day_totals` (rebuilding daily quota state after a restart).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import date, datetime, timedelta, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from serve.errors import ServiceError
from serve.jobs.record import JobRecord
from serve.stages.stage import BILLED_STAGES, IMAGE_ENCODER
from serve.storage import PreconditionFailed, Storage

GPU_STAGES: tuple[str, ...] = tuple(stage.key for stage in BILLED_STAGES)
_TIMING_KEY = {stage.key: stage.timing_key for stage in BILLED_STAGES}  # JobRecord.timings keys the stages write
# a stage call that runs on another stage's replica is billed at that replica's GPUs when neither the record nor
# the override names its own (the image encode runs on the VaeDecoder: `usage.gpus_per_stage: {vae_decoder: 1}`)
_BILLED_LIKE = {IMAGE_ENCODER.key: next(s.key for s in BILLED_STAGES
                                        if s.deployment == IMAGE_ENCODER.deployment and s is not IMAGE_ENCODER)}
_DAY_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DAYS_DIR = "_days"




def gpus_per_stage(job: JobRecord, override: Mapping[str, float] | None = None) -> dict[str, float]:
    """GPUs billed per stage for `job`: those its stage replicas reported holding (Ray's assignment, in the
    job record), or `override` (`usage.gpus_per_stage`, e.g. a CPU run billed as if each stage held one)."""
    held = job.gpus if override is None else override
    return {s: float(held.get(s, held.get(_BILLED_LIKE.get(s, s), 0.0))) for s in GPU_STAGES}


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def gpu_seconds_from_timings(timings: Mapping[str, float], gpus_per_stage: Mapping[str, float]) -> dict[str, float]:
    """GPU-seconds per stage (`text_encoder`, `image_encoder`, `denoiser`, `vae_decoder`), to the millisecond.

    `timings` are a job's wall seconds per stage (`text_encoder_s`, ...; other keys such as `encode_s` and
    `upload_s` are CPU work and not billed); a missing stage counts 0.
    """
    out = {}
    for stage in GPU_STAGES:
        gpus = float(gpus_per_stage.get(stage, 0.0))
        wall = float(timings.get(_TIMING_KEY[stage], 0.0))
        if gpus < 0 or wall < 0:
            raise ValueError(f"{stage}: GPUs ({gpus}) and seconds ({wall}) must be >= 0")
        out[stage] = _ms(wall * gpus) / 1000
    return out


def day_of(ts: float) -> str:
    """UTC yyyy-mm-dd of a unix timestamp."""
    return datetime.fromtimestamp(ts, tz=timezone.utc).date().isoformat()


class UsageRecord(BaseModel):
    """One completed job's billable usage (the object stored at `usage/<tenant>/<day>/<job_id>.json`)."""

    model_config = ConfigDict(extra="allow")

    job_id: str
    tenant: str
    model: str
    completed_at: int = Field(description="Unix seconds of the job's completion.")
    day: str = Field(description="UTC yyyy-mm-dd of completed_at: the bucket it is billed in.")
    gpu_seconds: dict[str, float] = Field(
        description="Per stage call: text_encoder, image_encoder (the VAE encode of an image-to-video job's input "
                    "image, 0 for text-to-video), denoiser, vae_decoder, enhancer (super-resolution and "
                    "interpolation, 0 for a video delivered as generated).")
    gpu_seconds_total: float
    output_seconds: float = Field(description="Length of the video: (num_frames - 1) / fps.")
    width: int
    height: int
    num_frames: int
    fps: int
    steps: int = Field(description="Denoising steps.")
    image_input: bool = Field(default=False, description="Generated from an input image (image-to-video).")

    @classmethod
    def from_job(cls, job: JobRecord, gpus: Mapping[str, float]) -> UsageRecord:
        """The record of a completed job; ValueError for any other status (only completed jobs are billed)."""
        if job.status != "completed" or job.completed_at is None:
            raise ValueError(f"job {job.id} is {job.status}; only completed jobs are billed")
        per_stage = gpu_seconds_from_timings(job.timings, gpus)
        p = job.params
        return cls(
            job_id=job.id, tenant=job.tenant, model=job.model, completed_at=job.completed_at,
            day=day_of(job.completed_at), gpu_seconds=per_stage,
            gpu_seconds_total=sum(_ms(v) for v in per_stage.values()) / 1000,
            output_seconds=float(p.seconds), width=p.width, height=p.height, num_frames=p.num_frames, fps=p.fps,
            steps=p.num_inference_steps, image_input=job.input_image is not None,
        )


# ---- sums ---------------------------------------------------------------------------------------------------------


class _Acc:
    """Exact running sums (integer milli-units)."""

    def __init__(self) -> None:
        self.jobs = 0
        self.gpu_ms = dict.fromkeys(GPU_STAGES, 0)
        self.output_ms = 0
        self.frames = 0

    def add(self, rec: UsageRecord) -> None:
        self.jobs += 1
        for s in GPU_STAGES:
            self.gpu_ms[s] += _ms(rec.gpu_seconds.get(s, 0.0))
        self.output_ms += _ms(rec.output_seconds)
        self.frames += rec.num_frames

    def merge(self, other: _Acc) -> None:
        self.jobs += other.jobs
        for s in GPU_STAGES:
            self.gpu_ms[s] += other.gpu_ms[s]
        self.output_ms += other.output_ms
        self.frames += other.frames

    def totals(self) -> UsageTotals:
        return UsageTotals(
            jobs=self.jobs,
            gpu_seconds=GpuSeconds(**{s: v / 1000 for s, v in self.gpu_ms.items()},
                                   total=sum(self.gpu_ms.values()) / 1000),
            output_seconds=self.output_ms / 1000, output_frames=self.frames)


# ---- wire (GET /v1/usage) -----------------------------------------------------------------------------------------


class GpuSeconds(BaseModel):
    text_encoder: float = 0.0
    image_encoder: float = Field(default=0.0, description="The VAE encode of image-to-video input images.")
    denoiser: float = 0.0
    vae_decoder: float = 0.0
    enhancer: float = Field(default=0.0, description="Super-resolution and frame interpolation (enhanced videos).")
    total: float = Field(default=0.0, description="Sum of the stages.")


class UsageTotals(BaseModel):
    jobs: int = Field(default=0, description="Completed jobs billed.")
    gpu_seconds: GpuSeconds = Field(default_factory=GpuSeconds)
    output_seconds: float = Field(default=0.0, description="Seconds of video produced.")
    output_frames: int = Field(default=0, description="Frames of video produced.")


class UsageBucket(UsageTotals):
    object: Literal["usage.bucket"] = "usage.bucket"
    day: str = Field(description="UTC yyyy-mm-dd.")
    start_time: int = Field(description="Unix seconds, start of the day (inclusive).")
    end_time: int = Field(description="Unix seconds, end of the day (exclusive).")


class UsageResponse(BaseModel):
    """`GET /v1/usage`: the caller's own usage over [start, end] (UTC days, both inclusive)."""

    object: Literal["usage"] = "usage"
    start: str
    end: str
    totals: UsageTotals
    data: list[UsageBucket] = Field(description="One bucket per day of the period, oldest first, empty days included.")


class UsageSummary(BaseModel):
    tenant: str
    start: str
    end: str
    totals: UsageTotals
    per_day: list[UsageBucket]

    @property
    def jobs(self) -> int:
        return self.totals.jobs

    def to_wire(self) -> UsageResponse:
        """Without the tenant: callers only ever see their own usage."""
        return UsageResponse(start=self.start, end=self.end, totals=self.totals, data=self.per_day)


def parse_usage_period(start: str | None, end: str | None, today: date,
                       max_days: int = 92) -> tuple[date, date]:
    """Validate `start`/`end` (yyyy-mm-dd, UTC); defaults: end = today, start = the first day of end's month."""

    def parse(name: str, value: str) -> date:
        try:
            if not _DAY_RE.match(value):
                raise ValueError
            return date.fromisoformat(value)
        except ValueError:
            raise ServiceError(400, f"{name} must be a date as YYYY-MM-DD, got {value!r}", param=name,
                           code="invalid_value") from None

    end_d = parse("end", end) if end is not None else today
    start_d = parse("start", start) if start is not None else end_d.replace(day=1)
    if end_d < start_d:
        raise ServiceError(400, f"end ({end_d}) must not be before start ({start_d})", param="end", code="invalid_value")
    days = (end_d - start_d).days + 1
    if days > max_days:
        raise ServiceError(400, f"the period spans {days} days; at most {max_days} are accepted", param="start",
                       code="invalid_value")
    return start_d, end_d


def _bucket(day: date, acc: _Acc) -> UsageBucket:
    start = int(datetime(day.year, day.month, day.day, tzinfo=timezone.utc).timestamp())
    return UsageBucket(day=day.isoformat(), start_time=start, end_time=start + 86400,
                       **acc.totals().model_dump())


# ---- the ledger ---------------------------------------------------------------------------------------------------


class UsageLedger:
    """Usage records in S3. Blocking (boto3): call it through `asyncio.to_thread` from async code."""

    def __init__(self, storage: Storage, read_concurrency: int = 16,
                 clock: Callable[[], float] = time.time) -> None:
        self._storage = storage
        self._workers = max(1, read_concurrency)
        self._clock = clock
        self._days_marked: set[tuple[str, str]] = set()  # (day, tenant) whose day marker this ledger wrote

    def record_key(self, tenant: str, day: str, job_id: str) -> str:
        return self._storage.key("usage", tenant, day, f"{job_id}.json")

    def record(self, rec: UsageRecord) -> bool:
        """Store `rec` unless this job is recorded already; True if this call wrote it."""
        # the day marker first: a crash in between leaves a marker without a record (harmless), never the reverse;
        # once per (day, tenant) from this ledger (markers are never deleted)
        if (rec.day, rec.tenant) not in self._days_marked:
            self._storage.put_bytes(self._storage.key("usage", _DAYS_DIR, rec.day, rec.tenant), b"", "text/plain")
            self._days_marked.add((rec.day, rec.tenant))
            if len(self._days_marked) > 100_000:
                self._days_marked.clear()
        try:
            self._storage.put_if_absent(self.record_key(rec.tenant, rec.day, rec.job_id),
                                        rec.model_dump_json().encode("utf-8"))
        except PreconditionFailed:
            return False
        return True

    def record_job(self, job: JobRecord, gpus: Mapping[str, float]) -> bool:
        """Record a finished job if it completed; False for other statuses (not billed) or if already recorded."""
        if job.status != "completed":
            return False
        return self.record(UsageRecord.from_job(job, gpus))

    def _keys(self, tenant: str, start: date, end: date) -> list[str]:
        """Record keys of `tenant` for the days start..end: one listing sweep (keys sort by day)."""
        prefix = self._storage.key("usage", tenant, "")
        stop = prefix + (end + timedelta(days=1)).isoformat()
        after = prefix + start.isoformat()
        keys: list[str] = []
        while True:
            page = self._storage.list_keys(prefix, start_after=after, max_keys=1000)
            keys.extend(k for k in page if k < stop)
            if len(page) < 1000 or page[-1] >= stop:
                return keys
            after = page[-1]

    def _load(self, keys: Iterable[str]) -> list[UsageRecord]:
        keys = list(keys)
        if len(keys) <= 1:
            return [UsageRecord.model_validate_json(self._storage.get_bytes(k)) for k in keys]
        with ThreadPoolExecutor(max_workers=min(self._workers, len(keys))) as pool:
            return [UsageRecord.model_validate_json(b) for b in pool.map(self._storage.get_bytes, keys)]

    def summarize(self, tenant: str, start_day: date | str, end_day: date | str) -> UsageSummary:
        """Totals and one bucket per day (empty days included) of `tenant`'s usage, start..end inclusive."""
        start = date.fromisoformat(start_day) if isinstance(start_day, str) else start_day
        end = date.fromisoformat(end_day) if isinstance(end_day, str) else end_day
        by_day = {start + timedelta(days=i): _Acc() for i in range((end - start).days + 1)}
        for rec in self._load(self._keys(tenant, start, end)):
            by_day[date.fromisoformat(rec.day)].add(rec)
        total = _Acc()
        for acc in by_day.values():
            total.merge(acc)
        return UsageSummary(tenant=tenant, start=start.isoformat(), end=end.isoformat(), totals=total.totals(),
                            per_day=[_bucket(d, acc) for d, acc in by_day.items()])

    def gpu_seconds_today(self, tenant: str) -> float:
        today = date.fromisoformat(day_of(self._clock()))
        return self.summarize(tenant, today, today).totals.gpu_seconds.total

    def load_day_totals(self, day: date | str) -> dict[str, float]:
        """GPU-seconds per tenant on `day` (UTC), e.g. to rebuild daily quota counters after a restart."""
        day_s = day if isinstance(day, str) else day.isoformat()
        marker_prefix = self._storage.key("usage", _DAYS_DIR, day_s, "")
        tenants = [k[len(marker_prefix):] for k in _list_all(self._storage, marker_prefix)]
        d = date.fromisoformat(day_s)
        return {t: self.summarize(t, d, d).totals.gpu_seconds.total for t in tenants}


def _list_all(storage: Storage, prefix: str) -> list[str]:
    keys: list[str] = []
    after: str | None = None
    while True:
        page = storage.list_keys(prefix, start_after=after, max_keys=1000)
        keys.extend(page)
        if len(page) < 1000:
            return keys
        after = page[-1]
