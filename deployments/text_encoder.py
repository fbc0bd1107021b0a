"""TextEncoder deployment: prompt (+ negative) -> T5 embeddings, on its own (GPU-share) replicas."""

from __future__ import annotations

from deployments.compute import run_to_end, stage_call
from deployments.stage import StageReplica
from serve.config import ModelAppArgs
from serve.stages.stage import TEXT_ENCODER
from serve.stages.types import GenerationRequest, Handoff


class TextEncoder(StageReplica):
    stage = TEXT_ENCODER

    def __init__(self, args: ModelAppArgs | dict) -> None:
        super().__init__(args)
        # heavy imports here so the ingress never imports torch
        from serve.stages.loading import load_stage
        from serve.stages.text_encoding import TextEncodingStage

        self._stage = load_stage(TextEncodingStage, self._args, text_encoder=True)
        if self._model.accel.warmup_on_start:
            self._stage.warmup()  # first-call costs (kernels, allocator) paid here, not by a request

    @stage_call(TEXT_ENCODER)
    async def encode(self, req: GenerationRequest) -> Handoff:
        # one forward at a time; the next request's arguments arrive. No phase write: the attempt's start already
        # put `text_encoding` in the record (the runner), and the Denoiser's first step follows soon after
        async with self.computing(req, report_phase=False) as timer:
            emb = await run_to_end(self._stage.encode, req.prompt, req.negative_prompt,
                                   req.params.do_classifier_free_guidance)
        return Handoff(value=emb, timings={TEXT_ENCODER.timing_key: timer.seconds}, gpus=dict(self._gpus))
