"""Usage metering: GPU-second math, idempotent per-job records in S3 (local moto), exact sums per tenant and day."""

from __future__ import annotations

import json
from datetime import date, datetime, timezone
from typing import Any

import pytest

from serve.billing.usage import (
    UsageLedger,
    UsageRecord,
    gpu_seconds_from_timings,
    gpus_per_stage,
    parse_usage_period,
)
from serve.errors import ServiceError
from serve.jobs.record import JobRecord, new_job_id
from tests.params import example_params

GPUS = {"text_encoder": 0.25, "denoiser": 2.0, "vae_decoder": 0.5}


def ts(day: str, hour: int = 12) -> int:
    return int(datetime.fromisoformat(f"{day}T{hour:02d}:00:00").replace(tzinfo=timezone.utc).timestamp())


def job(tenant: str = "acme", day: str = "2025-03-10", status: str = "completed", hour: int = 12,
        timings: dict[str, float] | None = None, gpus: dict[str, float] | None = None) -> JobRecord:
    completed_at = ts(day, hour)
    return JobRecord(
        id=new_job_id((completed_at - 60) * 1000), tenant=tenant, status=status, created_at=completed_at - 60,
        completed_at=completed_at, model="cogvideox-2b", prompt="a cat",
        params=example_params(width=720, height=480, num_frames=49, fps=8, seconds="6", num_inference_steps=50),
        timings=timings if timings is not None else {"text_encoder_s": 0.1, "denoiser_s": 0.2,
                                                     "vae_decoder_s": 0.7, "encode_s": 3.0, "upload_s": 1.0},
        gpus=gpus or {},
    )


def record(tenant: str = "acme", day: str = "2025-03-10", **kw: Any) -> UsageRecord:
    return UsageRecord.from_job(job(tenant, day, **kw), GPUS)


# ---- math ---------------------------------------------------------------------------------------------------------


def test_gpu_seconds_are_wall_seconds_times_gpus_with_fractions():
    timings = {"text_encoder_s": 2.0, "denoiser_s": 10.0, "vae_decoder_s": 4.0, "encode_s": 9.0, "upload_s": 9.0}
    assert gpu_seconds_from_timings(timings, GPUS) == {"text_encoder": 0.5, "image_encoder": 0.0, "denoiser": 20.0,
                                                       "vae_decoder": 2.0, "enhancer": 0.0}
    assert gpu_seconds_from_timings({"denoiser_s": 1.0}, GPUS) == {"text_encoder": 0.0, "image_encoder": 0.0,
                                                                   "denoiser": 2.0, "vae_decoder": 0.0, "enhancer": 0.0}
    assert gpu_seconds_from_timings(timings, {}) == {"text_encoder": 0.0, "image_encoder": 0.0, "denoiser": 0.0,
                                                     "vae_decoder": 0.0, "enhancer": 0.0}
    # an enhanced job's Enhancer seconds are their own line, at the Enhancer's GPUs
    assert gpu_seconds_from_timings({"enhancer_s": 3.0}, {"enhancer": 0.5})["enhancer"] == 1.5
    # image-to-video: the VAE encode of the input image is billed as its own line, at the GPUs it ran on
    i2v = {**timings, "image_encoder_s": 0.5}
    assert gpu_seconds_from_timings(i2v, {**GPUS, "image_encoder": 0.5})["image_encoder"] == 0.25
    with pytest.raises(ValueError, match="denoiser"):
        gpu_seconds_from_timings(timings, {"denoiser": -1})


def test_gpus_per_stage_come_from_the_job_or_an_override():
    held = job(gpus={"text_encoder": 0.25, "denoiser": 2, "vae_decoder": 0.5})  # what its replicas reported
    # the image encode runs on the VaeDecoder: without a figure of its own, it is billed at that replica's GPUs
    assert gpus_per_stage(held) == {**GPUS, "image_encoder": 0.5, "enhancer": 0.0}
    assert gpus_per_stage(job(gpus={**GPUS, "image_encoder": 0.125}))["image_encoder"] == 0.125
    assert gpus_per_stage(held, {"denoiser": 1}) == {"text_encoder": 0.0, "image_encoder": 0.0, "denoiser": 1.0,
                                                     "vae_decoder": 0.0, "enhancer": 0.0}
    assert gpus_per_stage(held, {"vae_decoder": 1})["image_encoder"] == 1.0
    assert gpus_per_stage(job()) == {"text_encoder": 0.0, "image_encoder": 0.0, "denoiser": 0.0, "vae_decoder": 0.0,
                                     "enhancer": 0.0}


def test_record_from_a_completed_job_and_only_from_one():
    rec = record()
    assert rec.day == "2025-03-10" and rec.tenant == "acme"
    assert rec.gpu_seconds == {"text_encoder": 0.025, "image_encoder": 0.0, "denoiser": 0.4, "vae_decoder": 0.35,
                               "enhancer": 0.0}
    assert rec.image_input is False
    assert rec.gpu_seconds_total == 0.775
    assert (rec.output_seconds, rec.width, rec.height, rec.num_frames, rec.fps, rec.steps) == (6.0, 720, 480, 49,
                                                                                              8, 50)
    assert record(hour=23).day == "2025-03-10" and record("acme", "2025-03-11", hour=0).day == "2025-03-11"
    for status in ("failed", "cancelled", "in_progress"):
        with pytest.raises(ValueError, match="only completed"):
            UsageRecord.from_job(job(status=status), GPUS)


# ---- ledger on S3 -------------------------------------------------------------------------------------------------


def test_recording_a_job_twice_stores_one_record(storage):
    ledger = UsageLedger(storage)
    first = record()
    assert ledger.record(first) is True
    # a retried finish or a second replica: same job, possibly other numbers; the first record stands
    again = first.model_copy(update={"gpu_seconds_total": 999.0})
    assert ledger.record(again) is False
    keys = storage.list_keys(storage.key("usage", "acme", ""))
    assert keys == [storage.key("usage", "acme", "2025-03-10", f"{first.job_id}.json")]
    assert json.loads(storage.get_bytes(keys[0]))["gpu_seconds_total"] == 0.775
    s = ledger.summarize("acme", "2025-03-10", "2025-03-10")
    assert s.jobs == 1 and s.totals.gpu_seconds.total == 0.775


def test_only_completed_jobs_are_billed(storage):
    ledger = UsageLedger(storage)
    assert ledger.record_job(job(status="failed"), GPUS) is False
    assert ledger.record_job(job(status="cancelled"), GPUS) is False
    done = job()
    assert ledger.record_job(done, GPUS) is True
    assert ledger.record_job(done, GPUS) is False
    assert ledger.summarize("acme", "2025-03-01", "2025-03-31").jobs == 1


def test_summary_sums_exactly_per_day_and_in_total(storage):
    ledger = UsageLedger(storage, read_concurrency=4)
    days = ["2025-03-09", "2025-03-10", "2025-03-10", "2025-03-12", "2025-03-12", "2025-03-12"]
    recs = [record(day=d, timings={"text_encoder_s": 0.1 * (i + 1), "denoiser_s": 0.2 + i / 3,
                                   "vae_decoder_s": 0.7}) for i, d in enumerate(days)]
    for r in recs:
        assert ledger.record(r)
    s = ledger.summarize("acme", date(2025, 3, 9), date(2025, 3, 12))

    expected_ms = sum(round(r.gpu_seconds_total * 1000) for r in recs)
    assert round(s.totals.gpu_seconds.total * 1000) == expected_ms
    assert s.totals.jobs == 6
    assert s.totals.output_seconds == 36.0 and s.totals.output_frames == 6 * 49
    for stage in ("text_encoder", "denoiser", "vae_decoder"):
        assert round(getattr(s.totals.gpu_seconds, stage) * 1000) == sum(
            round(r.gpu_seconds[stage] * 1000) for r in recs)
    assert [b.day for b in s.per_day] == ["2025-03-09", "2025-03-10", "2025-03-11", "2025-03-12"]
    assert [b.jobs for b in s.per_day] == [1, 2, 0, 3]
    # the days add up to the total to the millisecond, and each bucket's stages add up to its total
    assert sum(round(b.gpu_seconds.total * 1000) for b in s.per_day) == expected_ms
    for b in s.per_day:
        g = b.gpu_seconds
        assert round(g.total * 1000) == sum(round(x * 1000) for x in (g.text_encoder, g.denoiser, g.vae_decoder))
        assert b.end_time - b.start_time == 86400 and b.start_time == ts(b.day, 0)


def test_period_filtering_includes_both_ends_and_nothing_else(storage):
    ledger = UsageLedger(storage)
    for d, hour in [("2025-02-28", 23), ("2025-03-01", 0), ("2025-03-15", 12), ("2025-03-31", 23),
                    ("2025-04-01", 0)]:
        ledger.record(record(day=d, hour=hour))
    assert ledger.summarize("acme", "2025-03-01", "2025-03-31").jobs == 3
    assert ledger.summarize("acme", "2025-03-15", "2025-03-15").jobs == 1
    assert ledger.summarize("acme", "2025-03-02", "2025-03-14").jobs == 0
    assert ledger.summarize("acme", "2025-02-01", "2025-04-30").jobs == 5


def test_tenants_are_separate_even_when_one_name_prefixes_another(storage):
    ledger = UsageLedger(storage)
    ledger.record(record("a"))
    ledger.record(record("ab"))
    ledger.record(record("ab"))
    assert ledger.summarize("a", "2025-03-10", "2025-03-10").jobs == 1
    assert ledger.summarize("ab", "2025-03-10", "2025-03-10").jobs == 2
    assert ledger.summarize("b", "2025-03-10", "2025-03-10").jobs == 0


def test_summary_pages_through_long_listings(s3_config, s3_client):
    from serve.storage import Storage

    storage = Storage(s3_config, client=s3_client, list_page_size=2)
    storage.ensure_bucket()
    ledger = UsageLedger(storage)
    for d in ["2025-03-01", "2025-03-02", "2025-03-02", "2025-03-03", "2025-03-04", "2025-03-05"]:
        ledger.record(record(day=d))
    assert ledger.summarize("acme", "2025-03-02", "2025-03-04").jobs == 4


def test_today_and_day_totals_for_quota_rebuilds(storage):
    ledger = UsageLedger(storage, clock=lambda: ts("2025-03-10", 18))
    ledger.record(record("acme", "2025-03-10"))
    ledger.record(record("acme", "2025-03-10"))
    ledger.record(record("globex", "2025-03-10"))
    ledger.record(record("acme", "2025-03-09"))
    assert ledger.gpu_seconds_today("acme") == 1.55
    assert ledger.gpu_seconds_today("initech") == 0.0
    assert ledger.load_day_totals("2025-03-10") == {"acme": 1.55, "globex": 0.775}
    assert ledger.load_day_totals(date(2025, 3, 9)) == {"acme": 0.775}
    assert ledger.load_day_totals("2025-03-08") == {}


# ---- GET /v1/usage ------------------------------------------------------------------------------------------------


def test_wire_response_is_the_callers_own_usage(storage):
    ledger = UsageLedger(storage)
    ledger.record(record("acme", "2025-03-10"))
    body = ledger.summarize("acme", "2025-03-09", "2025-03-10").to_wire().model_dump()
    assert body["object"] == "usage"
    assert (body["start"], body["end"]) == ("2025-03-09", "2025-03-10")
    assert "tenant" not in json.dumps(body)
    assert body["totals"]["jobs"] == 1 and body["totals"]["gpu_seconds"]["total"] == 0.775
    assert [(b["object"], b["day"], b["jobs"]) for b in body["data"]] == [("usage.bucket", "2025-03-09", 0),
                                                                          ("usage.bucket", "2025-03-10", 1)]


TODAY = date(2025, 3, 20)


@pytest.mark.parametrize(("start", "end", "expected"), [
    ("2025-03-01", "2025-03-20", (date(2025, 3, 1), date(2025, 3, 20))),
    ("2025-03-05", "2025-03-05", (date(2025, 3, 5), date(2025, 3, 5))),
    (None, None, (date(2025, 3, 1), TODAY)),
    ("2025-01-01", "2025-04-02", (date(2025, 1, 1), date(2025, 4, 2))),  # 92 days
])
def test_usage_period_accepts(start, end, expected):
    assert parse_usage_period(start, end, TODAY) == expected


@pytest.mark.parametrize(("start", "end", "param", "fragment"), [
    ("2025-3-1", "2025-03-20", "start", "YYYY-MM-DD"),
    ("2025-03-01", "20250320", "end", "YYYY-MM-DD"),
    ("2025-02-30", "2025-03-20", "start", "YYYY-MM-DD"),
    ("yesterday", None, "start", "YYYY-MM-DD"),
    ("2025-03-20", "2025-03-19", "end", "must not be before"),
    ("2025-01-01", "2025-04-03", "start", "93 days"),
])
def test_usage_period_refuses(start, end, param, fragment):
    with pytest.raises(ServiceError) as info:
        parse_usage_period(start, end, TODAY)
    assert (info.value.status, info.value.param) == (400, param)
    assert fragment in info.value.message
