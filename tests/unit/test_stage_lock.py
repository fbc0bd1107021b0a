"""A stage replica's progress writes never hold its compute lock (issue 14, part 4): the phase write of one call
runs while the slot is already free for the next, and still lands before the call returns."""

from __future__ import annotations

import asyncio
import threading

from deployments.stage import StageReplica
from serve.jobs.record import new_job_id
from serve.stages.stage import VAE_DECODER
from serve.stages.types import GenerationParams, GenerationRequest


class _Metrics:
    def lock_acquired(self, since: float) -> None: ...

    def processed(self, seconds: float) -> None: ...


class _SlowStore:
    """put_progress blocks until released: an S3 write that takes its time."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.written: list[tuple[str, str]] = []

    def put_progress(self, job_id: str, phase: str, step: int, total: int, attempt: int = 1) -> bool:
        self.release.wait(10)
        self.written.append((job_id, phase))
        return True


def _replica(store: _SlowStore) -> StageReplica:
    replica = object.__new__(StageReplica)  # the skeleton only: no model, no Ray
    replica.stage = VAE_DECODER
    replica._lock = asyncio.Lock()
    replica._metrics = _Metrics()
    replica._store = store
    return replica


def _request() -> GenerationRequest:
    params = GenerationParams(width=48, height=32, size="48x32", num_frames=9, fps=8, seconds="1",
                              num_inference_steps=4, guidance_scale=6, use_dynamic_cfg=False, seed=1)
    return GenerationRequest(job_id=new_job_id(), prompt="p", negative_prompt=None, params=params.sampling,
                             model="m")


def test_the_phase_write_does_not_hold_the_lock_and_lands_before_the_call_returns() -> None:
    async def main() -> None:
        store = _SlowStore()
        replica = _replica(store)
        first, second = _request(), _request()
        entered = asyncio.Event()

        async def call(req: GenerationRequest) -> None:
            async with replica.computing(req):
                entered.set()

        one = asyncio.ensure_future(call(first))
        await entered.wait()
        await asyncio.sleep(0.05)
        # the first call computed and gave the slot back although its phase write still hangs
        assert not replica._lock.locked() and not one.done()
        entered.clear()
        two = asyncio.ensure_future(call(second))
        await asyncio.wait_for(entered.wait(), 2)  # the next request computes meanwhile
        assert store.written == []
        store.release.set()
        await asyncio.wait_for(asyncio.gather(one, two), 5)
        assert sorted(store.written) == sorted([(first.job_id, "decoding"), (second.job_id, "decoding")])

    asyncio.run(main())
