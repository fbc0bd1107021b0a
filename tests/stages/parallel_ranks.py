"""The ranks of the parallel-denoising numerics tests (test_parallel_numerics.py): each case's inputs, the
one-process reference, and the function every spawned rank runs (gloo on CPU, as a multi-GPU replica's ranks do
with NCCL). A module of its own so that `torch.multiprocessing.spawn` children import it by name."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from serve.stages.denoising import DenoisingCancelled
from serve.stages.types import ImageLatents, PromptEmbeddings, SamplingParams

# geometry per tiny variant: 48x48 at 9 frames is 27 video tokens for 2b/5b (3 latent frames of 3x3 patches) and
# 17 frames is 27 for 1.5 (5 latent frames, padded to 6, in 3 temporal patches): uneven over 2 and 4 ranks, so the
# padding of the last shard is exercised. The tiny 5b-i2v makes only 48x32 (18 tokens, even).
GEOMETRY = {"2b": (9, 48, 48), "5b": (9, 48, 48), "1.5": (17, 48, 48), "5b-i2v": (9, 32, 48),
            "1.5-i2v": (17, 48, 48)}


def case_params(variant: str, dynamic_cfg: bool, guidance: float = 6.0, steps: int = 3) -> SamplingParams:
    frames, height, width = GEOMETRY[variant]
    return SamplingParams(num_frames=frames, height=height, width=width, num_inference_steps=steps,
                          guidance_scale=guidance, use_dynamic_cfg=dynamic_cfg, seed=7, fps=8)


def case_inputs(stage, params: SamplingParams, seed: int = 0) -> tuple[PromptEmbeddings, ImageLatents | None]:
    """Random prompt embeddings (and image latents for an image-to-video model), the same in every process."""
    config = stage.transformer.config
    g = torch.Generator("cpu").manual_seed(seed)
    shape = (1, config.max_text_seq_length, config.text_embed_dim)
    emb = PromptEmbeddings(positive=torch.randn(shape, generator=g).numpy(),
                           negative=torch.randn(shape, generator=g).numpy())
    image = None
    if stage.takes_image:
        blank = stage._blank_image(params)
        latents = torch.randn(blank.latents.shape, generator=g).numpy() * 0.5
        image = ImageLatents(latents=latents.astype(np.float32), generator_state=blank.generator_state)
    return emb, image


def run_case(stage, case: dict) -> np.ndarray:
    params = case_params(case["variant"], case["dynamic_cfg"], case.get("guidance", 6.0), case.get("steps", 3))
    emb, image = case_inputs(stage, params)
    if params.guidance_scale <= 1:
        emb = PromptEmbeddings(positive=emb.positive, negative=None)
    should_cancel = None
    cancel_at = case.get("cancel_at")
    if cancel_at is not None and (stage.parallel is None or stage.parallel.is_leader):
        done = []  # rank 0 alone is asked, as in a replica; the others learn it from rank 0 before the step
        should_cancel = lambda: len(done) >= cancel_at
    try:
        return stage.denoise(emb, params, use_cache=case.get("cache") is not None, image=image,
                             should_cancel=should_cancel,
                             on_step=None if should_cancel is None else lambda i, n: done.append(i)).latents
    except DenoisingCancelled as exc:
        if cancel_at is None:
            raise
        return str(exc)


def load(model_dir: str, case: dict, parallel=None):
    from serve.config.accel import AccelConfig
    from serve.stages.denoising import DenoisingStage

    cache = case.get("cache")
    accel = AccelConfig(cache="first_block", first_block={"threshold": cache}) if cache is not None else None
    return DenoisingStage.from_pretrained(model_dir, accel=accel, parallel=parallel)


def rank_main(rank: int, world: int, port: int, plan: dict, models: dict[str, str], cases: list[dict],
              out_dir: str) -> None:
    """One rank: join the group, run every case of `plan`, write latents (and cache decisions) to `out_dir`."""
    torch.set_num_threads(1)
    from serve.config.parallel import ParallelConfig
    from serve.stages.parallel import ParallelContext, init_distributed

    init_distributed(rank, world, "127.0.0.1", port, backend="gloo", timeout_s=60)
    ctx = ParallelContext(ParallelConfig(**plan))
    results = {}
    for case in cases:
        if case.get("cache") == "between_ranks":
            case = {**case, "cache": _threshold_between_ranks(models, case, ctx)}
        stage = load(models[case["variant"]], case, parallel=ctx)
        ctx.stats.reset()
        latents = run_case(stage, case)
        results[case["name"]] = {"latents": latents, "cache_log": list(ctx.cache_log), "threshold": case.get("cache"),
                                 "bytes": ctx.stats.total(), "calls": dict(ctx.stats.calls)}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _threshold_between_ranks(models: dict[str, str], case: dict, ctx) -> float:
    """A First Block Cache threshold at which the ranks, each deciding from its own shard or branch, would part
    ways at the second step, half-way between the agreed ratio and one rank's: a probe run (threshold ~0, every
    step computes) collects every rank's local ratio of that step."""
    probe = load(models[case["variant"]], {**case, "cache": 1e-12}, parallel=ctx)
    run_case(probe, {**case, "cache": 1e-12})
    local, agreed, _ = ctx.cache_log[1]
    ranks = ctx.all_gather(torch.tensor([local], dtype=torch.float64), None, ctx.world, "test")
    ratios = sorted(float(r) for r in ranks)
    low, high = ratios[0], ratios[-1]
    assert low < agreed < high, (ratios, agreed)
    return (agreed + high) / 2


def spawn(plan: dict, models: dict[str, str], cases: list[dict], out_dir: Path) -> list[dict]:
    """Run `cases` on cfg * ulysses spawned ranks; every rank's results, by rank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = plan.get("cfg", 1) * plan.get("ulysses", 1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    mp.spawn(rank_main, args=(world, port, plan, {k: str(v) for k, v in models.items()}, cases, str(out_dir)),
             nprocs=world, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]


def rank_stalls(rank: int, world: int, port: int, timeout_s: float, out_dir: str) -> None:
    """Rank 1 joins and then never takes part (a stalled or dead peer); rank 0's next collective must fail within
    the group's timeout instead of waiting forever. Rank 0 writes when it started waiting and what it saw (gloo
    either raises at the timeout or, from its own thread, aborts the process: no rank waits on)."""
    import time

    from serve.config.parallel import ParallelConfig
    from serve.stages.parallel import ParallelContext, init_distributed

    init_distributed(rank, world, "127.0.0.1", port, backend="gloo", timeout_s=timeout_s)
    ctx = ParallelContext(ParallelConfig(ulysses=world))
    if rank == 1:  # silent until rank 0 has its answer (or long past the timeout)
        deadline = time.time() + timeout_s * 6
        while time.time() < deadline and not (Path(out_dir) / "rank0.pt").exists():
            time.sleep(0.1)
        return
    (Path(out_dir) / "started").write_text(str(time.time()))
    started = time.perf_counter()
    try:
        ctx.agree(True)
        outcome = "returned"
    except Exception as exc:  # noqa: BLE001 - what it raised is the result
        outcome = type(exc).__name__
    torch.save({"outcome": outcome, "seconds": time.perf_counter() - started}, Path(out_dir) / "rank0.pt")
