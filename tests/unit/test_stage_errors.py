"""Stage failures are typed where they happen and classified by type: the replica-side decorator, the chain's
'which stage died', pickling across Ray, and Ray's task error keeping the type."""

from __future__ import annotations

import asyncio
import pickle

import pytest

from deployments.compute import stage_call
from serve.jobs.runner import describe_failure
from serve.stages.stage import (
    DENOISER,
    PHASES,
    STAGES,
    TEXT_ENCODER,
    VAE_DECODER,
    StageFailed,
    StageRefused,
    StageUnavailable,
    first_failed,
)


def test_each_stage_is_spelled_once():
    assert [s.deployment for s in STAGES] == ["TextEncoder", "Denoiser", "VaeDecoder"]
    assert [s.key for s in STAGES] == ["text_encoder", "denoiser", "vae_decoder"]
    assert [s.timing_key for s in STAGES] == ["text_encoder_s", "denoiser_s", "vae_decoder_s"]
    assert PHASES == ("queued", "encoding", "denoising", "decoding", "enhancing", "uploading")


def _raising(exc: BaseException):
    @stage_call(DENOISER)
    async def method() -> None:
        raise exc

    return method


def test_stage_call_types_what_a_replica_raises():
    with pytest.raises(StageRefused) as refused:
        asyncio.run(_raising(ValueError("`height` and `width` have to be divisible by 8 but are 30 and 48."))())
    assert refused.value.stage == "Denoiser" and "divisible by 8" in refused.value.message
    with pytest.raises(StageFailed) as failed:
        asyncio.run(_raising(RuntimeError("CUDA error: an illegal memory access on 10.0.0.7"))())
    assert (failed.value.stage, failed.value.message) == ("Denoiser", "RuntimeError")  # nothing internal leaks
    typed = StageUnavailable("VaeDecoder", "ActorDiedError")
    with pytest.raises(StageUnavailable) as passed:  # already typed: kept as it is
        asyncio.run(_raising(typed)())
    assert passed.value is typed
    with pytest.raises(asyncio.CancelledError):  # a cancelled call stays cancelled
        asyncio.run(_raising(asyncio.CancelledError())())


def test_stage_errors_pickle_and_keep_their_type_inside_rays_task_error():
    from ray.exceptions import RayTaskError

    for error in (StageFailed("Denoiser", "RuntimeError"), StageUnavailable("TextEncoder", "ActorDiedError"),
                  StageRefused("VaeDecoder", "bad shape")):
        again = pickle.loads(pickle.dumps(error))
        assert type(again) is type(error) and (again.stage, again.message) == (error.stage, error.message)
        wrapped = RayTaskError("denoise", "Traceback ...", error).as_instanceof_cause()
        assert isinstance(wrapped, type(error))
        assert describe_failure(wrapped) == describe_failure(error)


def test_first_failed_names_the_first_stage_whose_call_raised():
    async def ok() -> str:
        return "done"

    async def dies() -> None:
        raise RuntimeError("ActorDiedError: actor 3f2a on 10.0.0.7")

    async def main() -> None:
        later = dies()
        assert await first_failed([(TEXT_ENCODER, ok()), (DENOISER, dies()), (VAE_DECODER, later)]) is DENOISER
        later.close()  # never awaited: the first failure is the answer
        assert await first_failed([(TEXT_ENCODER, ok()), (DENOISER, ok())]) is None

    asyncio.run(main())


def test_first_failed_does_not_wait_for_a_stage_still_computing_and_passes_cancellation_on():
    async def ok() -> str:
        return "done"

    async def dies() -> None:
        raise RuntimeError("ActorDiedError")

    async def main() -> None:
        computing = asyncio.Event()  # never set: the upstream stage is still at work
        found = await first_failed([(TEXT_ENCODER, ok()), (DENOISER, computing.wait()), (VAE_DECODER, dies())],
                                   wait_s=0.05)
        assert found is VAE_DECODER  # the replica that died, not the one still computing
        blocked = asyncio.ensure_future(first_failed([(DENOISER, asyncio.Event().wait())], wait_s=30))
        await asyncio.sleep(0.05)
        blocked.cancel()
        with pytest.raises(asyncio.CancelledError):  # a cancelled attempt stays cancelled
            await blocked

    asyncio.run(main())


def test_generation_params_keep_what_a_newer_release_wrote():
    """A record written by a newer replica (a field or quality value unknown here) survives this version's
    read-modify-write during a rolling upgrade."""
    from serve.jobs.record import JobRecord, new_job_id
    from tests.params import example_params

    stored = JobRecord(id=new_job_id(), created_at=0, model="m", prompt="p", params=example_params()).model_dump()
    stored["params"].update(future_field={"x": 1}, quality="ultra")
    again = JobRecord.model_validate(stored).model_dump()
    assert again["params"]["future_field"] == {"x": 1} and again["params"]["quality"] == "ultra"
    assert JobRecord.model_validate(stored).params.sampling.quality == "quality"  # unknown: the exact model
