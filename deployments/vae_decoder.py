"""VaeDecoder deployment: latents -> frames -> mp4 + cover + metadata in S3; returns only object keys.

For an image-to-video model it also runs the chain's first image call, `encode_image`: the stored input image ->
image latents (the VAE *encoder*, serve/stages/image_encoding.py). It lives here, not in a deployment of its own,
because this replica holds the VAE already: one copy of the weights serves both directions, and the encode (one
frame) is a small fraction of a decode (the whole video), so a GPU of its own would mostly idle. The two calls share
the replica's one computation slot; the image's S3 read and decode run outside it.
"""

from __future__ import annotations

import asyncio

from deployments.compute import run_to_end, stage_call
from deployments.stage import StageReplica
from serve.config import ModelAppArgs
from serve.jobs.record import ChainResult
from serve.stages.stage import IMAGE_ENCODER, UPLOADING, VAE_DECODER
from serve.stages.types import GenerationRequest, Handoff, InputImage, SamplingParams


class VaeDecoder(StageReplica):
    stage = VAE_DECODER

    def __init__(self, args: ModelAppArgs | dict) -> None:
        super().__init__(args)
        from serve.stages.decoding import DecodingStage
        from serve.stages.loading import load_stage, warmup_shapes

        self._stage = load_stage(DecodingStage, self._args, cudnn_benchmark=self._model.vae_cudnn_benchmark)
        self._encoder = None
        if self._model.preset().image_input:
            from serve.stages.image_encoding import ImageEncodingStage
            from serve.stages.loading import local_model_path

            self._encoder = ImageEncodingStage.sharing(
                self._stage.vae, local_model_path(self._model, self._args.s3), device=str(self._stage.device),
                dtype=self._stage.vae.dtype, revision=self._model.revision)
        if self._model.accel.warmup_on_start:
            self._stage.warmup(warmup_shapes(self._model, self._model.accel))

    @stage_call(IMAGE_ENCODER)
    async def encode_image(self, req: GenerationRequest) -> Handoff:
        """Image-to-video: the job's stored input image -> `ImageLatents` (and the generator's state after the
        encoder's draw), for the Denoiser."""
        if self._encoder is None or req.image is None:
            raise ValueError(f"{self._model.name} takes no input image" if self._encoder is None
                             else "an image-to-video job needs its input image")
        picture = await asyncio.to_thread(self._stored_picture, req.image, req.params)
        async with self.computing(req, report_phase=False) as timer:
            latents = await run_to_end(self._encoder.encode, picture, req.params)
        return Handoff(value=latents, timings={IMAGE_ENCODER.timing_key: timer.seconds},
                       info={IMAGE_ENCODER.key: {"input_image": req.image.summary()}},
                       gpus={IMAGE_ENCODER.key: self._gpus[VAE_DECODER.key]})

    def _stored_picture(self, image: InputImage, params: SamplingParams):
        """The accepted bytes from S3, checked against their hash, decoded as the ingress decoded them and fitted
        as the request asked (`image_fit`)."""
        import hashlib

        from serve.errors import ServiceError
        from serve.media.images import decode_image, fit_image
        from serve.storage import NotFound

        try:
            data = self._storage.get_bytes(image.key)
        except NotFound:  # the job was deleted while it ran: another attempt cannot help
            raise ValueError("the input image is no longer stored (the job was deleted)") from None
        if hashlib.sha256(data).hexdigest() != image.sha256:
            raise ValueError("the stored input image does not match the SHA-256 recorded when it was accepted")
        try:  # the ingress applied the caps; these bytes passed them
            picture = decode_image(data, param="input_reference", max_bytes=len(data),
                                   max_pixels=image.width * image.height, min_side=1).image
        except ServiceError as exc:
            raise ValueError(f"the stored input image no longer decodes: {exc.message}") from None
        return fit_image(picture, params.width, params.height, params.image_fit)
    async def _frames(self, req: GenerationRequest, denoised: Handoff) -> Handoff:
        async with self.computing(req) as timer:
            frames = await run_to_end(self._stage.decode_uint8, denoised.value)
            self._metrics.count_tiled_fallbacks(self._stage)
            info = {**denoised.info, VAE_DECODER.key: {"tiled": bool(self._stage.last_decode_tiled)}}
        return Handoff(value=frames, timings={**denoised.timings, VAE_DECODER.timing_key: timer.seconds}, info=info,
                       gpus={**denoised.gpus, **self._gpus})

    @stage_call(VAE_DECODER)
    async def decode(self, req: GenerationRequest, denoised: Handoff) -> ChainResult:
        """The chain's last call for a video delivered as generated: decode, encode, upload."""
        from serve.jobs.delivery import publish_if_wanted

        decoded = await self._frames(req, denoised)
        # encoding and upload run outside the lock: they use the CPU, not the GPU
        await asyncio.to_thread(self._store.put_progress, req.job_id, UPLOADING, 0, req.params.num_inference_steps,
                                attempt=req.attempt)
        out = await asyncio.to_thread(publish_if_wanted, self._store, self._storage, req, decoded.value,
                                      decoded.timings, decoded.info, gpus=decoded.gpus)
        self._metrics.encoded(out.timings["encode_s"])
        return out

    @stage_call(VAE_DECODER)
    async def decode_frames(self, req: GenerationRequest, denoised: Handoff) -> Handoff:
        """An enhanced video: the decoded uint8 frames `[F, H, W, 3]` for the Enhancer (replica to replica; they
        never pass through the ingress)."""
        return await self._frames(req, denoised)
