"""Denoiser deployment: embeddings + sampling params -> latents (the DiT loop), progress per step.

One request computes at a time (the replica's lock), but `max_ongoing_requests` 2 lets the next request's
embeddings arrive while this one runs. A cancelled request stops at the next step and frees the lock.
"""

from __future__ import annotations

import asyncio
import threading

from deployments.compute import run_to_end, stage_call
from deployments.ranks import RankGroup, RankState, memory_readings
from deployments.stage import StageReplica
from serve.config import ModelAppArgs
from serve.stages.stage import DENOISER
from serve.stages.types import GenerationRequest, Handoff


class Denoiser(StageReplica):
    stage = DENOISER

    def __init__(self, args: ModelAppArgs | dict) -> None:
        super().__init__(args)
        from serve.stages.denoising import DenoisingStage
        from serve.stages.loading import load_stage, warmup_shapes

        accel = self._model.accel
        self._stage = load_stage(DenoisingStage, self._args, accel=accel)
        # several GPUs per replica (model.parallel): this replica is rank 0 of a group it starts (deployments/ranks.py)
        self._ranks: RankGroup | None = None
        if self._model.parallel.enabled:
            self._ranks = RankGroup(self._stage, self._args.model_dump(mode="json"), self._model.parallel)
            self._ranks.start()
            self._gpus[DENOISER.key] = self._ranks.gpus  # billed for every rank's GPU, not only this process's
        if accel.warmup_on_start:
            # compile and first-call costs for the configured shapes are paid here, not by a request
            warm = self._ranks.warmup if self._ranks is not None else self._stage.warmup
            warm(warmup_shapes(self._model, accel), steps=accel.warmup_steps, without_cfg=accel.warmup_without_cfg)

    async def check_health(self) -> None:
        """Serve's health check: a replica whose worker ranks died (or broke the group) is unhealthy."""
        if self._ranks is not None:
            await self._ranks.check()

    async def ranks(self) -> list[dict]:
        """Each rank's state (rank 0 first): busy, steps of the last request, how it ended, its process id."""
        if self._ranks is None:
            return [RankState(0).as_dict()]
        return await self._ranks.states()

    @stage_call(DENOISER)
    async def denoise(self, req: GenerationRequest, encoded: Handoff, image: Handoff | None = None) -> Handoff:
        """`encoded`: the prompt embeddings; `image` (image-to-video): the VaeDecoder's image latents, with the
        generator's state the loop's noise is drawn from."""
        from serve.jobs.progress import ProgressReporter

        progress = ProgressReporter(self._store, req.job_id, DENOISER.phase, self._settings.progress_interval_s,
                                    req.attempt)
        cancel = threading.Event()

        def stop_at_next_step() -> None:
            cancel.set()
            self._metrics.cancelled()

        async with self.computing(req, report_phase=False) as timer:  # the reporter writes step 0
            progress(0, req.params.num_inference_steps)
            # the lock is kept until the loop has stopped (at its next step) when the request is cancelled
            loop = {"on_step": self._metrics.step_timer(progress), "should_cancel": cancel.is_set,
                    "on_cancel": stop_at_next_step, "image": None if image is None else image.value}
            if self._ranks is None:
                latents = await run_to_end(self._stage.denoise, encoded.value, req.params, **loop)
            else:  # every rank runs the loop; rank 0 (here) decides when it stops
                latents = await self._ranks.denoise(encoded.value, req.params, **loop)
                self._metrics.rank_memory({0: memory_readings(reset_peak=False), **self._ranks.memory})
            self._metrics.count_uncompiled_runs(self._stage)
            ran = self._stage.last_run_info()  # in the lock: the next request's run changes it
        # the last step's write lands after the slot is free: the next job's loop does not wait for S3
        await asyncio.to_thread(progress.flush)
        before = [encoded] if image is None else [encoded, image]
        return Handoff(value=latents, timings={**_merged(before, "timings"), DENOISER.timing_key: timer.seconds},
                       info={**_merged(before, "info"), DENOISER.key: ran},
                       gpus={**_merged(before, "gpus"), **self._gpus})


def _merged(handoffs: list[Handoff], part: str) -> dict:
    """The stages so far, in chain order: their timings, info or GPUs in one dict."""
    out: dict = {}
    for handoff in handoffs:
        out.update(getattr(handoff, part))
    return out
