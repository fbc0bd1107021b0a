"""Benchmark parallel denoising (serve/stages/parallel.py): one video's CogVideoX steps split across ranks.

No Ray: the ranks are `torchrun` processes (or, for the CPU comparison, `torch.multiprocessing.spawn`ed ones) that
join a torch.distributed group through `init_distributed` and run the same `DenoisingStage.denoise` on the same
inputs, as a multi-GPU Denoiser replica's ranks do. Plans (`model.parallel`): `1` (one process, no
ParallelContext: the baseline), `cfg2`, `ulysses2` (2 ranks), `cfg2xulysses2`, `ulysses4` (4 ranks).

    torchrun --nproc-per-node 1 benchmarks/parallel_benchmark.py --out BENCHMARKS.md   # 1 GPU: the baseline
    torchrun --nproc-per-node 2 benchmarks/parallel_benchmark.py --out BENCHMARKS.md   # 2 GPUs: 1, cfg2, ulysses2
    torchrun --nproc-per-node 4 benchmarks/parallel_benchmark.py --out BENCHMARKS.md   # 4 GPUs: 1, cfg2xulysses2,
                                                                                     #   ulysses4
    torchrun --nproc-per-node 2 benchmarks/parallel_benchmark.py --plan ulysses2 --tiny --steps-measured 2  # CPU
    python benchmarks/parallel_benchmark.py --cpu-compare --estimate --out BENCHMARKS.md                  # CPU

Modes, what each measures, and what it does not:

- **torchrun** (the default mode; RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT from the environment, a
  plain `python` run is one rank). Device cuda:LOCAL_RANK with NCCL when CUDA is available, else the CPU with gloo
  (one thread per rank). A launch of W ranks runs the plans that need exactly W ranks (`--plan auto`), and also the
  baseline `1`: every rank then runs it alone on its own device at the same time, and rank 0's figures are the
  row (on a GPU machine the GPUs are independent, so that is the 1-GPU figure; on a CPU the ranks share the
  cores). The model is CogVideoX-5b (`--model 2b`: CogVideoX-2b) at full size, random weights in the preset
  dtype (bf16; 2b fp16), built by gpu_benchmark.build_transformer (the real transformer configs), at 49x480x720,
  CFG batch 2 (guidance 6; dynamic CFG as the preset has it: 5b on, 2b off), random prompt embeddings (226
  tokens; no T5, no VAE). Every rank builds the same weights (seeded) and the transformer is reused across the
  launch's plans (the Ulysses hooks and processors are reset between them). Each plan
  runs ONE request of a 50-step schedule that rank 0 cancels after `--steps-warm + --steps-measured` steps (the
  cancel decision reaches every rank through the broadcast parallel.py makes before each step); s/step is the
  median of the last `--steps-measured` steps of the slowest rank, and "50 steps s" is that x 50 (an
  extrapolation). Rank 0 prints (and with --out writes) a row per plan: ranks, s/step, speed-up over the 1-GPU row
  (of this launch, or `--baseline-s-per-step` from an earlier one), scaling efficiency = speed-up / ranks, bytes
  each rank sent per step (CommStats over the measured steps, rank 0 and the other ranks) beside the analytic
  figure (`expected_bytes_per_step`), and peak GPU memory per rank. A plan that needs more GPUs than the machine
  has says "needs N GPUs: not run on this machine"; a plan this launch has not the ranks for says which launch
  runs it. Nothing is filled in that was not measured. A plan that fails on one rank only (out of memory) leaves
  the others waiting in a collective until `--timeout-s`. On a GPU, `nvidia-smi topo -m` is appended (how the
  GPUs are linked decides what the Ulysses rows measure). `--tiny`: the tiny models of serve/models/tiny.py in
  float32 at 9x48x48 (checks the code path; not a benchmark).
- **--cpu-compare**: spawns 1, then 2 gloo ranks on this machine (torch.set_num_threads(1) per rank: with 2 cores
  the 1-rank row uses one core and the 2-rank rows one each), tiny 2b and 5b models (serve/models/tiny.py,
  float32) at 9x48x48 (27 video tokens: uneven over 2 ranks, so the padding row is exercised), CFG batch 2. Each
  setting runs `--cpu-repeats` requests of a `--cpu-steps`-step schedule; s/step is the mean of each request's
  steps after its first, median over the requests. Bytes per step per rank are measured (CommStats, by kind) and
  checked to equal `expected_bytes_per_step` exactly (the run fails otherwise). The tiny models' step is so small
  that the rows measure the cost of the collectives and of two processes on two cores, not GPU scaling.
- **--estimate**: no run. Bytes per rank per step from the shapes (`expected_bytes_per_step`) for CogVideoX-5b and
  -2b at 49x480x720 (bf16 / fp16), and the communication time per step they would take at stated bandwidths (H100
  SXM NVLink 4, PCIe Gen5 x16), the arithmetic and every assumption printed. An ESTIMATE, labelled so.

Not measured anywhere here: real weights (the compute is the real one, the video is noise), T5 and the VAE, the
First Block Cache (its cross-rank decision adds an all-gather of 16 bytes per step, sent to every other rank; not
run), torch.compile (parallel.py does not trace the Ulysses all-to-all into compiled blocks), multi-node runs, the Ray
worker actors of deployments/denoiser.py (startup, their object transfers), and whether NCCL overlaps anything
(parallel.py calls every collective synchronously inside the forward, so communication adds to the step).
"""

from __future__ import annotations

import argparse
import datetime as dt
import math
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import torch

_BENCHMARKS = Path(__file__).resolve().parent
if str(_BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(_BENCHMARKS))

import gpu_benchmark as gb  # noqa: E402  (it puts the repo root on sys.path)

from serve.stages.image_encoding import latent_frame_count  # noqa: E402

# plan name -> (cfg, ulysses), in the order of the table
PLANS: dict[str, tuple[int, int]] = {"1": (1, 1), "cfg2": (2, 1), "ulysses2": (1, 2), "cfg2xulysses2": (2, 2),
                                     "ulysses4": (1, 4)}
TINY_GEOMETRY = (9, 48, 48)  # frames, height, width: 27 video tokens for the tiny 2b / 5b
FULL_GEOMETRY = (49, 480, 720)
TEXT_TOKENS = 226
BROADCAST_BYTES = 4  # the cancel flag: one int32, sent by rank 0 to every other rank before each step
# the collectives of parallel.py, in the order of a step
KINDS = ("broadcast", "sp_all_to_all_qkv", "sp_all_gather_text", "sp_all_to_all_out", "sp_all_gather_out",
         "cfg_all_gather")
KIND_LABELS = {"broadcast": "cancel broadcast", "sp_all_to_all_qkv": "qkv all-to-all",
               "sp_all_gather_text": "text all-gather", "sp_all_to_all_out": "out all-to-all",
               "sp_all_gather_out": "proj_out all-gather", "cfg_all_gather": "cfg all-gather"}
# --estimate: link bandwidths per direction per GPU (GB = 1e9 bytes) and the share of it assumed achievable
LINKS = {
    "nvlink": {"name": "H100 SXM, NVLink 4 (NVSwitch)", "raw_gbps": 450.0, "achievable": 0.70,
               "what": "900 GB/s total bidirectional per GPU (18 links x 50 GB/s) = 450 GB/s per direction"},
    "pcie": {"name": "PCIe Gen5 x16", "raw_gbps": 64.0, "achievable": 50.0 / 64.0,
             "what": "64 GB/s per direction (32 GT/s x 16 lanes, 128b/130b)"},
}
LATENCY_US = (10, 30)  # per collective, a range of NCCL's small-message latency (not in the estimate's times)
GB = 1e9
GiB = 1024**3


# 1. The analytic bytes
def _conf(config, key: str, default=None):
    """A transformer config value from a dict (gpu_benchmark.TRANSFORMER_CONFIGS, config.json) or a config object."""
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def plan_degrees(plan) -> tuple[int, int]:
    """(cfg, ulysses) of a plan name, a {"cfg", "ulysses"} dict or a ParallelConfig."""
    if isinstance(plan, str):
        return PLANS[plan]
    if isinstance(plan, Mapping):
        return int(plan.get("cfg", 1)), int(plan.get("ulysses", 1))
    return int(plan.cfg), int(plan.ulysses)


def sequence(model_config, geometry, vae_spatial: int = 8, vae_temporal: int = 4) -> dict[str, int]:
    """Token counts and latent shape of one request: text 226, video = latent frames / patch_t x (h/8/p) x (w/8/p)."""
    frames, height, width = geometry
    p, pt = _conf(model_config, "patch_size"), _conf(model_config, "patch_size_t")
    latent_frames, _ = latent_frame_count(frames, vae_temporal, pt)
    lh, lw = height // vae_spatial, width // vae_spatial
    return {"text": int(_conf(model_config, "max_text_seq_length", TEXT_TOKENS)),
            "video": latent_frames // (pt or 1) * (lh // p) * (lw // p),
            "latent_frames": latent_frames, "latent_h": lh, "latent_w": lw}


def expected_bytes_by_kind(model_config, geometry, plan, dtype_bytes: int, *, rank: int = 0,
                           do_cfg: bool = True) -> dict[str, int]:
    """Bytes rank `rank` sends per denoising step, by CommStats kind, from the shapes alone (no step cache).

    With B the batch each rank's transformer runs (1 with CFG-parallel or without guidance, else 2), U the Ulysses
    degree, L = ceil(video tokens / U) rows per shard (padding included), T the text tokens, H heads of d, and e
    bytes per element (the model dtype), per layer: the qkv all-to-all sends 3*B*L*H*d*e*(U-1)/U, the output
    all-to-all B*L*H*d*e*(U-1)/U, the text heads' all-gather B*T*(H/U)*d*e*(U-1); per step: the proj_out
    all-gather B*L*out_dim*e*(U-1) (out_dim = p*p*[p_t*]C_out), the CFG all-gather of the noise prediction
    (latent frames*C_out*h/8*w/8*e*(cfg-1)), and on rank 0 only the cancel broadcast (4 bytes*(world-1)).
    CommStats counts what the ideal algorithm puts on the wire (see serve/stages/parallel.py)."""
    cfg, u = plan_degrees(plan)
    world = cfg * u
    seq = sequence(model_config, geometry)
    heads, head_dim = int(_conf(model_config, "num_attention_heads")), int(_conf(model_config, "attention_head_dim"))
    layers = int(_conf(model_config, "num_layers"))
    c_out = int(_conf(model_config, "out_channels"))
    p, pt = int(_conf(model_config, "patch_size")), _conf(model_config, "patch_size_t")
    split_cfg = cfg > 1 and do_cfg
    batch = 1 if split_cfg or not do_cfg else 2
    e = int(dtype_bytes)
    out: dict[str, int] = {}
    if world > 1 and rank == 0:
        out["broadcast"] = BROADCAST_BYTES * (world - 1)
    if u > 1:
        if heads % u:
            raise ValueError(f"ulysses {u} does not divide {heads} attention heads")
        local = math.ceil(seq["video"] / u)
        # per call as CommStats counts it (numel * e * (U-1) // U), times the layers
        out["sp_all_to_all_qkv"] = layers * (3 * batch * local * heads * head_dim * e * (u - 1) // u)
        out["sp_all_gather_text"] = layers * (batch * seq["text"] * (heads // u) * head_dim * e * (u - 1))
        out["sp_all_to_all_out"] = layers * (batch * local * heads * head_dim * e * (u - 1) // u)
        out_dim = p * p * (pt or 1) * c_out
        out["sp_all_gather_out"] = batch * local * out_dim * e * (u - 1)
    if split_cfg:
        out["cfg_all_gather"] = seq["latent_frames"] * c_out * seq["latent_h"] * seq["latent_w"] * e * (cfg - 1)
    return out


def expected_bytes_per_step(model_config, geometry, plan, dtype_bytes: int, *, rank: int = 0,
                            do_cfg: bool = True) -> int:
    """Bytes rank `rank` (default 0, the one that also broadcasts the cancel flag) sends per step; see
    `expected_bytes_by_kind`."""
    return sum(expected_bytes_by_kind(model_config, geometry, plan, dtype_bytes, rank=rank, do_cfg=do_cfg).values())


def expected_calls_per_step(model_config, plan, *, rank: int = 0, do_cfg: bool = True) -> int:
    cfg, u = plan_degrees(plan)
    layers = int(_conf(model_config, "num_layers"))
    calls = 1 if cfg * u > 1 and rank == 0 else 0
    if u > 1:
        calls += 3 * layers + 1
    if cfg > 1 and do_cfg:
        calls += 1
    return calls


# 2. One rank's run of one plan
def build_tiny(variant: str):
    """A tiny model's transformer (float32, eval) and its scheduler class and config, built in memory (the same
    seeded weights in every process)."""
    from serve.models.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(variant)
    return pipe.transformer.float().eval(), type(pipe.scheduler), dict(pipe.scheduler.config)


def build_full(model: str, device: torch.device):
    """A full-size random-weight transformer (gpu_benchmark.build_transformer) and the preset's scheduler."""
    import diffusers

    scheduler_name, snr_shift, _, _ = gb.MODELS[model]
    scheduler_cls = getattr(diffusers, scheduler_name)
    config = dict(scheduler_cls(**gb._SCHEDULER_BASE, snr_shift_scale=snr_shift).config)
    return gb.build_transformer(model, device, dry_run=False), scheduler_cls, config


def random_embeddings(transformer_config, seed: int = 0):
    from serve.stages.types import PromptEmbeddings

    g = torch.Generator("cpu").manual_seed(seed)
    shape = (1, int(transformer_config.max_text_seq_length), int(transformer_config.text_embed_dim))
    return PromptEmbeddings(positive=torch.randn(shape, generator=g).numpy(),
                            negative=torch.randn(shape, generator=g).numpy())


def reset_parallel(transformer) -> None:
    """Back to the one-process model between plans: the Ulysses hooks removed, the stock attention processors."""
    from serve.stages.attention import install_attention_backend

    for handle in getattr(transformer, "_videogen_parallel_hooks", ()):
        handle.remove()
    transformer._videogen_parallel_hooks = []
    install_attention_backend(transformer, "sdpa")


def make_context(plan: str, device: torch.device):
    """The ParallelContext of `plan` (None for `1`); every rank must call this in the same order (new_group)."""
    if plan == "1":
        return None
    from serve.config.parallel import ParallelConfig
    from serve.stages.parallel import ParallelContext

    cfg, u = PLANS[plan]
    return ParallelContext(ParallelConfig(cfg=cfg, ulysses=u), device=str(device))


def run_request(transformer, scheduler_cls, scheduler_config, device: torch.device, ctx, emb, params,
                n_run: int, n_measured: int, clock) -> dict:
    """One request on this rank, stopped (by rank 0) after `n_run` steps when the schedule is longer. Returns the
    measured steps' seconds, the bytes/calls this rank sent over them (total and by kind), and the peak GiB."""
    from serve.stages.denoising import DenoisingCancelled, DenoisingStage

    reset_parallel(transformer)
    stage = DenoisingStage(transformer, scheduler_cls, scheduler_config, device=str(device), parallel=ctx)
    marks: list[float] = []
    snaps: list[tuple[dict, dict]] = []

    def on_step(i: int, n: int) -> None:
        marks.append(clock.now())
        snaps.append((dict(ctx.stats.bytes_sent), dict(ctx.stats.calls)) if ctx is not None else ({}, {}))

    leader = ctx is None or ctx.is_leader
    should_cancel = (lambda: len(marks) >= n_run) if leader and n_run < params.num_inference_steps else None
    if ctx is not None:
        ctx.stats.reset()
    clock.reset_peak()
    start = clock.now()
    try:
        stage.denoise(emb, params, on_step=on_step, should_cancel=should_cancel, use_cache=False)
    except DenoisingCancelled:
        pass
    if len(marks) != n_run:
        raise RuntimeError(f"ran {len(marks)} steps, expected {n_run}")
    first, last = snaps[-n_measured - 1], snaps[-1]  # the window of the measured steps
    by_kind = {k: v - first[0].get(k, 0) for k, v in last[0].items() if v - first[0].get(k, 0)}
    calls = sum(v - first[1].get(k, 0) for k, v in last[1].items())
    steps = gb.step_durations(start, marks)[-n_measured:]
    return {"steps": steps, "window_steps": n_measured, "bytes": sum(by_kind.values()), "by_kind": by_kind,
            "calls": calls, "peak_gib": clock.peak_gib()}


def _error(exc: BaseException) -> str:
    return f"error: {type(exc).__name__}: {exc}".replace("|", "/").replace("\n", " ")[:200]


# 3. --cpu-compare: spawned gloo ranks
def cpu_rank_main(rank: int, world: int, port: int, plans: list[str], variants: list[str], steps: int,
                  repeats: int, out_dir: str) -> None:
    """One spawned rank: every variant x plan, `repeats` requests each; results to out_dir/rank{rank}.pt."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    from serve.stages.parallel import init_distributed
    from serve.stages.types import SamplingParams

    device = torch.device("cpu")
    if world > 1:
        init_distributed(rank, world, "127.0.0.1", port, backend="gloo", timeout_s=120)
    contexts = {plan: make_context(plan, device) for plan in plans}
    clock = gb.Clock(device)
    results = []
    for variant in variants:
        transformer, scheduler_cls, scheduler_config = build_tiny(variant)
        emb = random_embeddings(transformer.config)
        frames, height, width = TINY_GEOMETRY
        params = SamplingParams(num_frames=frames, height=height, width=width, num_inference_steps=steps,
                                guidance_scale=6.0, use_dynamic_cfg=variant != "2b", seed=7, fps=8)
        for plan in plans:
            runs = [run_request(transformer, scheduler_cls, scheduler_config, device, contexts[plan], emb, params,
                                steps, steps - 1, clock) for _ in range(repeats)]
            results.append({"variant": variant, "plan": plan, "rank": rank, "runs": runs,
                            "config": dict(transformer.config), "dtype_bytes": transformer.dtype.itemsize})
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    if world > 1:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(world: int, plans: list[str], variants: list[str], steps: int, repeats: int) -> list[list[dict]]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="parallel-bench-") as tmp:
        mp.spawn(cpu_rank_main, args=(world, _free_port(), plans, variants, steps, repeats, tmp), nprocs=world,
                 join=True)
        return [torch.load(Path(tmp) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def cpu_compare(args) -> tuple[str, bool]:
    """Spawn 1 then 2 gloo ranks; the section's text and whether every measured byte count equals the analytic."""
    variants = args.cpu_models
    load_before = os.getloadavg()[0]
    t0 = time.monotonic()
    per_rank = {1: spawn_ranks(1, ["1"], variants, args.cpu_steps, args.cpu_repeats),
                2: spawn_ranks(2, ["cfg2", "ulysses2"], variants, args.cpu_steps, args.cpu_repeats)}
    wall = time.monotonic() - t0
    load = (load_before, os.getloadavg()[0])
    rows: list[dict] = []
    for world, ranks in per_rank.items():
        for i, first in enumerate(ranks[0]):
            entries = [ranks[r][i] for r in range(world)]
            rows.append(summarize(first["variant"], first["plan"], entries))
    baseline = {r["variant"]: r["s_step"] for r in rows if r["plan"] == "1"}
    for r in rows:
        base = baseline.get(r["variant"])
        r["speedup"] = base / r["s_step"] if base and r["s_step"] else None
    ok = all(r["matches"] for r in rows)
    text = render_cpu(args, rows, wall, load)
    return text, ok


def summarize(variant: str, plan: str, entries: list[dict]) -> dict:
    """One table row from every rank's runs of (variant, plan): median s/step of the slowest rank, per-rank bytes
    per step measured and analytic."""
    world = PLANS[plan][0] * PLANS[plan][1]
    per_rank_s, spreads, measured, analytic, by_kind, calls, mismatches = [], [], [], [], {}, [], []
    for entry in entries:
        runs = entry["runs"]
        means = [statistics.fmean(run["steps"]) for run in runs]
        per_rank_s.append(statistics.median(means))
        spreads.append((min(means), max(means)))
        n = runs[0]["window_steps"]
        want = expected_bytes_by_kind(entry["config"], TINY_GEOMETRY, plan, entry["dtype_bytes"], rank=entry["rank"])
        got = runs[0]["by_kind"]
        for run in runs:  # every request of the same plan sends the same bytes
            if run["by_kind"] != got:
                mismatches.append(f"rank {entry['rank']}: requests differ")
        got_per_step = {k: v / n for k, v in got.items()}
        if {k: v * n for k, v in want.items()} != got:
            mismatches.append(f"rank {entry['rank']}: measured {got_per_step} != analytic {want}")
        measured.append(sum(got.values()) / n)
        analytic.append(sum(want.values()))
        calls.append(runs[0]["calls"] / n)
        if entry["rank"] == 0:
            by_kind = got_per_step
    slowest = per_rank_s.index(max(per_rank_s))
    return {"variant": variant, "plan": plan, "ranks": world, "s_step": max(per_rank_s), "per_rank_s": per_rank_s,
            "spread": spreads[slowest],
            "measured": measured, "analytic": analytic, "by_kind": by_kind, "calls": calls,
            "matches": not mismatches, "mismatches": mismatches, "config": entries[0]["config"]}


# 4. torchrun mode
def torchrun_main(args) -> int:
    from serve.stages.parallel import init_distributed
    from serve.stages.types import SamplingParams

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    address, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    gpus = torch.cuda.device_count() if use_cuda else 0
    if use_cuda:
        if local_rank >= gpus:
            print(f"rank {rank}: LOCAL_RANK {local_rank} but this machine has {gpus} GPU(s); launch with "
                  f"--nproc-per-node <= {gpus}", file=sys.stderr)
            return 2
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    requested = list(PLANS) if args.plan == "auto" else args.plan
    to_run = [p for p in PLANS if p in requested and (p == "1" or math.prod(PLANS[p]) == world)]
    if world > 1:
        init_distributed(rank, world, address, port, timeout_s=args.timeout_s, device=str(device))
    t0 = time.monotonic()
    started = dt.datetime.now(dt.timezone.utc)
    if args.tiny:
        transformer, scheduler_cls, scheduler_config = build_tiny(args.model)
        transformer = transformer.to(device)
        geometry = TINY_GEOMETRY
    else:
        transformer, scheduler_cls, scheduler_config = build_full(args.model, device)
        geometry = (args.frames, args.height, args.width)
    build_s = time.monotonic() - t0
    frames, height, width = geometry
    emb = random_embeddings(transformer.config, args.seed)
    n_run = args.steps_warm + args.steps_measured
    params = SamplingParams(num_frames=frames, height=height, width=width, num_inference_steps=max(50, n_run),
                            guidance_scale=6.0, use_dynamic_cfg=gb.MODELS[args.model][3], seed=args.seed, fps=8)
    clock = gb.Clock(device)
    heads = int(transformer.config.num_attention_heads)
    mine: dict[str, dict] = {}
    for plan in to_run:
        u = PLANS[plan][1]
        if heads % u:
            mine[plan] = {"status": f"not possible: ulysses {u} does not divide the {heads} attention heads"}
            continue
        if rank == 0:
            print(f"[{plan}] running {n_run} steps on {world if plan != '1' else 1} rank(s) ...", flush=True)
        try:
            ctx = make_context(plan, device)
            result = run_request(transformer, scheduler_cls, scheduler_config, device, ctx, emb, params, n_run,
                                 args.steps_measured, clock)
            mine[plan] = {"status": "ok", **result}
        except Exception as exc:  # a failed plan (out of memory) keeps the others' rows
            mine[plan] = {"status": _error(exc)}
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
    results = [mine]
    if world > 1:
        results = [None] * world
        torch.distributed.all_gather_object(results, mine)
    if rank == 0:
        text = render_torchrun(args, device, gpus, world, geometry, transformer, requested, results, build_s,
                               started, time.monotonic() - t0)
        print(text, flush=True)
        if args.out:
            title = text.splitlines()[0]
            write_section(args.out, title, text)
            print(f"section {title!r} written to {args.out}", flush=True)
    if world > 1:
        torch.distributed.destroy_process_group()
    return 0


# 5. Rendering
def fmt_int(n) -> str:
    return "-" if n is None else f"{round(n):,}"


def fmt_mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:,.2f}"


def machine_line(device: torch.device) -> str:
    env = gb.environment(device)
    rest = ", ".join(f"{k} {v}" for k, v in env.items() if k != "card")
    host = f", host {platform.machine()} with {os.cpu_count()} CPU cores" if device.type == "cuda" else ""
    return f"{env['card']}{host}; {rest}"


def command_line() -> str:
    return " ".join(shlex.quote(a) for a in ["python", *sys.argv])


def render_cpu(args, rows: list[dict], wall_s: float, load: tuple[float, float]) -> str:
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    frames, height, width = TINY_GEOMETRY
    config = rows[0]["config"]
    seq = sequence(config, TINY_GEOMETRY)
    lines = [
        f"## Parallel denoising on CPU (gloo, tiny models) ({date})",
        "",
        f"Machine: {machine_line(torch.device('cpu'))}. Command: `{command_line()}` (the CPU comparison: "
        f"{wall_s:.0f} s). `torch.set_num_threads(1)` in every rank: on these {os.cpu_count()} cores the 1-rank row "
        "uses one core, the 2-rank rows one each. gloo over loopback; ranks started by torch.multiprocessing.spawn "
        f"(no Ray, no torchrun). 1-minute load average {load[0]:.1f} before the runs, {load[1]:.1f} after"
        + (f" (above the {os.cpu_count()} cores: other processes shared the machine, so the times are noisy)."
           if max(load) > (os.cpu_count() or 1) else "."),
        "",
        f"Tiny models of serve/models/tiny.py ({config['num_layers']} layers, {config['num_attention_heads']} heads "
        f"of {config['attention_head_dim']}, float32), {frames}x{height}x{width}: {seq['video']} video tokens "
        f"(uneven over 2 ranks: {math.ceil(seq['video'] / 2)} rows per shard, one of them padding) and "
        f"{seq['text']} text tokens, CFG batch 2, random prompt embeddings. Each row: {args.cpu_repeats} requests "
        f"of a {args.cpu_steps}-step schedule; s/step = mean of each request's steps 2-{args.cpu_steps}, median "
        "over the requests, of the slowest rank. Bytes: what each rank put on the wire per step (CommStats, the "
        "ideal algorithm's payload) over those steps, beside `expected_bytes_per_step` from the shapes; rank 0 "
        "also sends the 4-byte cancel flag to each other rank.",
        "",
        "| model | plan | ranks | s/step | s/step range over the requests | speed-up vs 1 rank | scaling efficiency "
        "| bytes/step rank 0 (measured) "
        "| bytes/step rank 1 (measured) | analytic rank 0 / rank 1 | = analytic | rank 0 by kind (bytes/step) "
        "| collectives/step rank 0 |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for r in rows:
        world = r["ranks"]
        eff = r["speedup"] / world if r["speedup"] else None
        kinds = "; ".join(f"{KIND_LABELS[k]} {fmt_int(v)}" for k, v in sorted(r["by_kind"].items(),
                                                                              key=lambda kv: KINDS.index(kv[0])))
        lines.append(
            f"| {r['variant']} | {r['plan']} | {world} | {r['s_step']:.4f} "
            f"| {r['spread'][0]:.4f}-{r['spread'][1]:.4f} | {gb.fmt(r['speedup'], 2)} "
            f"| {gb.fmt(eff, 2)} | {fmt_int(r['measured'][0])} "
            f"| {fmt_int(r['measured'][1]) if world > 1 else '-'} "
            f"| {' / '.join(fmt_int(a) for a in r['analytic'])} | {'yes' if r['matches'] else 'NO'} "
            f"| {kinds or '- (no collectives)'} | {fmt_int(r['calls'][0])} |")
    lines += ["", "Notes:", ""]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        by_plan = {r["plan"]: r for r in rows if r["variant"] == variant}
        base = by_plan.get("1")
        parts = []
        for plan in ("cfg2", "ulysses2"):
            r = by_plan.get(plan)
            if r and base and r["speedup"]:
                word = "faster" if r["speedup"] > 1 else "slower"
                parts.append(f"{plan} {r['s_step'] * 1e3:.1f} ms ({r['speedup']:.2f}x, {word}; "
                             f"{fmt_int(r['calls'][0])} collectives per step)")
        if base:
            lines.append(f"- **{variant}**: 1 rank {base['s_step'] * 1e3:.1f} ms/step; " + "; ".join(parts) + ".")
    mism = [m for r in rows for m in r["mismatches"]]
    if mism:
        lines.append("- **Measured bytes differ from the analytic figure**: " + "; ".join(mism))
    else:
        lines.append("- Measured bytes equal `expected_bytes_per_step` exactly, for every rank, plan and model, kind "
                     "by kind: the formula the H100 estimate uses counts what parallel.py sends.")
    layers = int(config["num_layers"])
    per_call = [v / (layers if k in ("sp_all_to_all_qkv", "sp_all_gather_text", "sp_all_to_all_out") else 1)
                for r in rows for k, v in r["by_kind"].items()]
    smallest, largest = (round(min(per_call)), round(max(per_call))) if per_call else (0, 0)
    lines += [
        "- What these rows measure: the tiny models' step is a few milliseconds of float32 compute on one core "
        "(2 layers of width 32), so splitting it saves little, and every collective through gloo over loopback "
        f"costs a fixed time whatever its size (here {smallest:,} bytes to {largest:,} bytes per call). cfg2 makes 2 "
        "collectives per step "
        "(the cancel broadcast and the noise-prediction all-gather), ulysses2 3 per layer plus 2: the speed-ups are "
        "those costs against the halved compute, on a CPU. They say nothing about GPUs, where a 5b step is about "
        "a second or more of compute and NVLink moves hundreds of GB/s (see the estimate section, and `torchrun` "
        "on GPUs for measurements).",
        "- The 2-rank rows ran both ranks on this machine's 2 cores with one thread each, so the 1-rank row had a "
        "core to itself and the 2-rank rows had no spare core for gloo's own threads.",
    ]
    return "\n".join(lines) + "\n"


def render_torchrun(args, device, gpus: int, world: int, geometry, transformer, requested, results: list[dict],
                    build_s: float, started: dt.datetime, wall_s: float) -> str:
    frames, height, width = geometry
    config = transformer.config
    dtype_bytes = transformer.dtype.itemsize
    seq = sequence(config, geometry)
    cuda = device.type == "cuda"
    unit, fmt_bytes = ("bytes", fmt_int) if args.tiny else ("MB", fmt_mb)
    launch = os.environ.get("LOCAL_WORLD_SIZE", str(world))
    date = started.strftime("%Y-%m-%d")
    title = (f"## Parallel denoising on GPU ({date}, torchrun --nproc-per-node {launch})" if cuda else
             f"## Parallel denoising, torchrun on CPU ({date}, --nproc-per-node {launch})")
    what = (f"CogVideoX-{args.model} at full size, random weights, {str(transformer.dtype).removeprefix('torch.')}"
            if not args.tiny else f"tiny {args.model} (serve/models/tiny.py), float32: checks the code path, the "
            "numbers are not a benchmark")
    base_row = results[0].get("1", {})
    baseline_s = statistics.median(base_row["steps"]) if base_row.get("status") == "ok" else None
    baseline_src = "this launch's `1` row (rank 0 alone)"
    if baseline_s is None and args.baseline_s_per_step:
        baseline_s, baseline_src = args.baseline_s_per_step, f"--baseline-s-per-step {args.baseline_s_per_step}"
    lines = [
        title, "",
        f"Machine: {machine_line(device)}; {gpus} GPU(s) visible. Command: "
        f"`torchrun --nproc-per-node {launch} {' '.join(shlex.quote(a) for a in sys.argv)}` ({wall_s:.0f} s, "
        f"model build {build_s:.0f} s).",
        "",
        f"{what}; {frames}x{height}x{width}: {seq['video']} video + {seq['text']} text tokens, "
        f"{config.num_layers} layers, {config.num_attention_heads} heads of {config.attention_head_dim}; CFG batch 2. "
        f"Each plan: one request of a {max(50, args.steps_warm + args.steps_measured)}-step schedule cancelled by "
        f"rank 0 after {args.steps_warm} + {args.steps_measured} steps; s/step = median of the last "
        f"{args.steps_measured} steps, slowest rank; 50 steps = s/step x 50 (extrapolated); speed-up against "
        f"{baseline_src if baseline_s else 'no 1-GPU figure (none measured or passed)'}; efficiency = speed-up / "
        "ranks. Bytes: what a rank put on the wire per measured step (CommStats), rank 0 (it also broadcasts the "
        "cancel flag) and the others, beside `expected_bytes_per_step`. The `1` row in a launch of several ranks: "
        "every rank ran it alone at the same time (rank 0's figures).",
        "",
        f"| plan | ranks | status | s/step | 50 steps s (extrap.) | speed-up vs 1 {'GPU' if cuda else 'rank'} "
        f"| scaling efficiency | {unit}/step rank 0 (measured) | {unit}/step other ranks (measured) "
        f"| {unit}/step analytic (rank 0) | = analytic "
        "| collectives/step | peak GiB per rank | measured steps s (rank 0) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---|",
    ]
    for plan, (cfg, u) in PLANS.items():
        need = cfg * u
        res = [r.get(plan) for r in results]
        mine = res[0]
        if mine is None:
            if cuda and need > gpus:
                status = f"needs {need} GPUs: not run on this machine"
            elif plan not in requested:
                status = "not requested (--plan)"
            else:
                status = f"needs {need} ranks: run `torchrun --nproc-per-node {need}`"
            lines.append(f"| {plan} | {need} | {status} | - | - | - | - | - | - | - | - | - | - | - |")
            continue
        if mine.get("status") != "ok" or any(r is None or r.get("status") != "ok" for r in res):
            status = next(r["status"] for r in res if r is not None and r.get("status") != "ok")
            lines.append(f"| {plan} | {need} | {status} | - | - | - | - | - | - | - | - | - | - | - |")
            continue
        ranks = res if plan != "1" else res[:1]
        s_step = max(statistics.median(r["steps"]) for r in ranks)
        speedup = baseline_s / s_step if baseline_s else None
        measured = [r["bytes"] / r["window_steps"] for r in ranks]
        analytic = [expected_bytes_per_step(config, geometry, plan, dtype_bytes, rank=i) for i in range(len(ranks))]
        matches = all(r["bytes"] == a * r["window_steps"] for r, a in zip(ranks, analytic))
        others = sorted({fmt_bytes(m) for m in measured[1:]})
        peaks = " / ".join(gb.fmt(r["peak_gib"], 1) for r in ranks) if cuda else "-"
        lines.append(
            f"| {plan} | {need} | ok | {s_step:.3f} | {s_step * 50:.1f} | {gb.fmt(speedup, 2)} "
            f"| {gb.fmt(speedup / need if speedup else None, 2)} | {fmt_bytes(measured[0])} "
            f"| {', '.join(others) or '-'} | {fmt_bytes(analytic[0])} | {'yes' if matches else 'NO'} | {fmt_int(ranks[0]['calls'] / ranks[0]['window_steps'])} "
            f"| {peaks} | {' '.join(f'{s:.3f}' for s in ranks[0]['steps'])} |")
    lines += ["", "Notes:", "",
              "- Not measured: T5, the VAE, real weights (random ones: the compute is the real one), the First Block "
              "Cache, torch.compile, the Ray worker ranks of deployments/denoiser.py (their start, their object "
              "transfers); one node only.",
              "- Rows with status `needs N GPUs` or `needs N ranks` were not run; nothing in them is estimated. "
              "The communication they would need is estimated (and labelled so) in \"Parallel denoising: expected "
              "communication on H100s (estimate)\"."]
    if cuda:
        try:
            topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError):
            topo = ""
        if topo.strip():
            lines += ["", "<details><summary>nvidia-smi topo -m</summary>", "", "```", topo.rstrip(), "```", "",
                      "</details>"]
    return "\n".join(lines) + "\n"


# 6. --estimate
ESTIMATE_TITLE = "## Parallel denoising: expected communication on H100s (estimate)"


def render_estimate(models: tuple[str, ...] = ("5b", "2b"), geometry=FULL_GEOMETRY) -> str:
    """The estimate section: bytes per rank per step from the shapes, and the time they take at stated bandwidths."""
    frames, height, width = geometry
    nv, pcie = LINKS["nvlink"], LINKS["pcie"]
    nv_bw, pcie_bw = nv["raw_gbps"] * nv["achievable"], pcie["raw_gbps"] * pcie["achievable"]
    plans = [p for p in PLANS if p != "1"]
    lines = [
        ESTIMATE_TITLE, "",
        "**ESTIMATE: nothing in this section was measured.** Written by "
        "`python benchmarks/parallel_benchmark.py --estimate --out BENCHMARKS.md`. The bytes come from the shapes "
        "(`expected_bytes_per_step`; the section \"Parallel denoising on CPU (gloo, tiny models)\" checks that it equals what parallel.py's CommStats "
        "counts, collective by collective, for the tiny models); the times are those bytes divided by an assumed "
        "bandwidth. A GPU run (`torchrun`, module docstring) replaces them with measurements.",
        "",
        "Assumptions (all of them):",
        "",
        f"- Geometry {frames}x{height}x{width}, CFG batch 2 (guidance > 1), no step cache; CogVideoX-5b in bf16 and "
        "-2b in fp16 (2 bytes per element, the presets' dtypes); the real transformer configs "
        "(benchmarks/gpu_benchmark.py TRANSFORMER_CONFIGS: 5b 42 layers, 48 heads of 64, patch 2; 2b 30 layers, 30 "
        f"heads of 64, patch 2; text {TEXT_TOKENS} tokens).",
        "- The collectives of serve/stages/parallel.py, each rank's payload as its CommStats counts it (the ideal "
        "algorithm: an all-to-all sends (U-1)/U of its input, an all-gather U-1 copies): per layer the qkv "
        "all-to-all 3*B*L*H*d*e*(U-1)/U, the output all-to-all B*L*H*d*e*(U-1)/U and the text heads' all-gather "
        "B*T*(H/U)*d*e*(U-1); per step the proj_out all-gather B*L*(p*p*16)*e*(U-1), the CFG all-gather of the "
        "noise prediction (13*16*60*90*e*(cfg-1)) and rank 0's 4-byte cancel flag to each other rank. B = batch per "
        "rank (1 with cfg2, else 2), U = Ulysses degree, L = ceil(video tokens / U), T = text tokens, e = 2 bytes.",
        f"- {nv['name']}: {nv['what']}; assumed achievable for NCCL all-to-all / all-gather at these message sizes "
        f"(MB to hundreds of MB per call): {nv['achievable']:.0%} = **{nv_bw:.0f} GB/s per direction**.",
        f"- {pcie['name']}: {pcie['what']}; assumed achievable: **{pcie_bw:.0f} GB/s per direction**, with P2P "
        "through a PCIe switch and no other GPU sharing the uplink (through the CPU's root complex, or with GPUs "
        "sharing a switch uplink, less).",
        "- Time = bytes a rank sends / per-direction bandwidth (each rank sends and receives the same amount at "
        "once; the links are full duplex). Not in the times: the latency of each collective (NCCL, of order "
        f"{LATENCY_US[0]}-{LATENCY_US[1]} us each: collectives/step x that, below), and any overlap: parallel.py "
        "calls every collective synchronously inside the forward, so the time adds to the step.",
        "- The compute, for context only: the one-GPU s/step planning priors of benchmarks/gpu_benchmark.py (PRIORS: "
        f"5b {gb.PRIORS['5b']['step_s']} s, 2b {gb.PRIORS['2b']['step_s']} s per CFG step at 49x480x720, eager; its "
        "comment calls them H200 figures from notes that are not in this repository, and BENCHMARKS.md has no GPU "
        "run yet, so they are unverified), divided by the ranks as if the compute split perfectly (it does not "
        "quite: the patch embedding and the text tokens' projections run whole on every Ulysses rank). An H100 SXM "
        "has about an H200's compute. comm share = comm / (compute per rank + comm).",
        "",
        "| model | plan | ranks | MB/rank/step | of it attention all-to-alls MB | collectives/step "
        f"| NVLink ms/step ({nv_bw:.0f} GB/s) | PCIe ms/step ({pcie_bw:.0f} GB/s) | compute/rank/step s (prior / ranks) "
        "| comm share NVLink | comm share PCIe | per 50-step video: NVLink s / PCIe s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    arithmetic: list[str] = []
    est: dict[tuple[str, str], dict] = {}
    for model in models:
        config = gb.TRANSFORMER_CONFIGS[model]
        e = gb.MODELS[model][2].itemsize
        seq = sequence(config, geometry)
        heads, d, layers = config["num_attention_heads"], config["attention_head_dim"], config["num_layers"]
        arithmetic.append(f"{model}: video tokens = {seq['latent_frames']} latent frames x ({seq['latent_h']}/2) x "
                          f"({seq['latent_w']}/2) = {seq['video']:,}; text T = {seq['text']}; H x d = {heads} x {d}"
                          f" = {heads * d}; {layers} layers; e = {e} bytes")
        for plan in plans:
            cfg, u = PLANS[plan]
            world = cfg * u
            if heads % u:
                lines.append(f"| {model} | {plan} | {world} | not possible: ulysses {u} does not divide {heads} "
                             "heads | - | - | - | - | - | - | - | - |")
                arithmetic.append(f"  {plan}: not possible ({heads} heads are not divisible by {u})")
                continue
            kinds = expected_bytes_by_kind(config, geometry, plan, e, rank=0)
            total = sum(kinds.values())
            a2a = kinds.get("sp_all_to_all_qkv", 0) + kinds.get("sp_all_to_all_out", 0)
            calls = expected_calls_per_step(config, plan)
            nv_s, pcie_s = total / (nv_bw * GB), total / (pcie_bw * GB)
            compute = gb.PRIORS[model]["step_s"] / world
            est[(model, plan)] = {"bytes": total, "nv_s": nv_s, "pcie_s": pcie_s, "compute": compute,
                                  "nv_share": nv_s / (compute + nv_s), "pcie_share": pcie_s / (compute + pcie_s)}
            lines.append(
                f"| {model} | {plan} | {world} | {total / 1e6:,.1f} | {a2a / 1e6:,.1f} | {calls} | {nv_s * 1e3:.2f} "
                f"| {pcie_s * 1e3:.2f} | {compute:.3f} | {nv_s / (compute + nv_s):.1%} "
                f"| {pcie_s / (compute + pcie_s):.1%} | {50 * nv_s:.2f} / {50 * pcie_s:.2f} |")
            batch = 1 if cfg > 1 else 2
            local = math.ceil(seq["video"] / u)
            arithmetic.append(f"  {plan} (cfg {cfg}, ulysses {u}: B = {batch}"
                              + (f", L = ceil({seq['video']:,}/{u}) = {local:,}" if u > 1 else "") + "):")
            if u > 1:
                arithmetic += [
                    f"    qkv all-to-all      {layers} x 3 x {batch} x {local:,} x {heads} x {d} x {e} x {u - 1}/{u}"
                    f" = {kinds['sp_all_to_all_qkv']:,} B",
                    f"    out all-to-all      {layers} x {batch} x {local:,} x {heads} x {d} x {e} x {u - 1}/{u}"
                    f" = {kinds['sp_all_to_all_out']:,} B",
                    f"    text all-gather     {layers} x {batch} x {seq['text']} x {heads // u} x {d} x {e} x {u - 1}"
                    f" = {kinds['sp_all_gather_text']:,} B",
                    f"    proj_out all-gather {batch} x {local:,} x {2 * 2 * 16} x {e} x {u - 1}"
                    f" = {kinds['sp_all_gather_out']:,} B"]
            if cfg > 1:
                arithmetic.append(f"    cfg all-gather      {seq['latent_frames']} x 16 x {seq['latent_h']} x "
                                  f"{seq['latent_w']} x {e} x {cfg - 1} = {kinds['cfg_all_gather']:,} B")
            arithmetic += [
                f"    cancel broadcast    4 x {world - 1} = {kinds['broadcast']} B (rank 0)",
                f"    total {total:,} B = {total / 1e6:,.1f} MB; NVLink {total / 1e6:,.1f} MB / {nv_bw:.0f} GB/s = "
                f"{nv_s * 1e3:.2f} ms; PCIe {total / 1e6:,.1f} MB / {pcie_bw:.0f} GB/s = {pcie_s * 1e3:.2f} ms; "
                f"latency {calls} collectives x {LATENCY_US[0]}-{LATENCY_US[1]} us = "
                f"{calls * LATENCY_US[0] / 1e3:.2f}-{calls * LATENCY_US[1] / 1e3:.2f} ms (not in the times)"]
    lines += ["", "The arithmetic (bytes rank 0 sends per step; MB = 1e6 bytes, GB = 1e9):", "", "```", *arithmetic,
              "```", "", "Reading it (an estimate, not a measurement):", ""]
    c2, u2, cu, u4 = (est.get(("5b", p)) for p in ("cfg2", "ulysses2", "cfg2xulysses2", "ulysses4"))
    if c2:
        lines.append(f"- cfg2 moves one noise prediction per step ({c2['bytes'] / 1e6:.1f} MB for 5b): "
                     f"{c2['nv_s'] * 1e3:.3f} ms on NVLink, {c2['pcie_s'] * 1e3:.3f} ms on PCIe, no more than the latency "
                     f"of its two collectives ({2 * LATENCY_US[0]}-{2 * LATENCY_US[1]} us). Its speed-up is bounded by the compute split (the two branches are the "
                     "same size) and by anything the ranks do twice (the scheduler step), not by bandwidth.")
    if u2:
        lines.append(f"- Ulysses moves every layer's activations: {u2['bytes'] / 1e9:.2f} GB per rank per step for 5b "
                     f"at ulysses2 (batch 2 on each rank), {u2['nv_s'] * 1e3:.0f} ms on NVLink "
                     f"({u2['nv_share']:.1%} of the step at the prior's compute split) but "
                     f"{u2['pcie_s'] * 1e3:.0f} ms on PCIe Gen5 ({u2['pcie_share']:.1%}).")
    if u2 and u4:
        lines.append(f"- ulysses4 sends 3/4 of a shard half the size instead of 1/2 of it: "
                     f"{u4['bytes'] / u2['bytes']:.2f} x ulysses2's bytes per rank while the compute per rank halves "
                     f"again, so the comm share grows with U ({u4['nv_share']:.1%} NVLink, {u4['pcie_share']:.1%} "
                     "PCIe for 5b).")
    if cu and u4:
        lines.append(f"- cfg2xulysses2 sends {cu['bytes'] / 1e9:.2f} GB per rank per step (batch 1 per rank: half of "
                     f"ulysses2's) for the same 4-way split of the compute as ulysses4 ({u4['bytes'] / 1e9:.2f} GB): "
                     "by this count the cheaper 4-rank plan on either link.")
    b2 = est.get(("2b", "ulysses2"))
    if b2 and u2:
        lines.append(f"- CogVideoX-2b cannot run ulysses4 (30 heads). Its activations are 1920 wide instead of 3072, over "
                     f"30 layers instead of 42: ulysses2 sends {b2['bytes'] / 1e9:.2f} GB per rank per step, but its "
                     f"step is shorter too, so its comm shares ({b2['nv_share']:.1%} NVLink, {b2['pcie_share']:.1%} "
                     f"PCIe) are a little above the 5b's.")
    lines.append("")
    return "\n".join(lines)


# 7. BENCHMARKS.md
def write_section(path: Path, title: str, body: str) -> None:
    """Put `body` (a section starting with the line `title`) into the markdown file at `path`: in place of the
    section with the same title if there is one (up to the next `## ` heading), else appended."""
    path = Path(path)
    text = path.read_text() if path.exists() else ""
    lines = text.splitlines()
    body = body.rstrip("\n") + "\n"
    try:
        start = lines.index(title)
    except ValueError:
        path.write_text(text.rstrip("\n") + "\n\n" + body if text.strip() else body)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    before, after = "\n".join(lines[:start]), "\n".join(lines[end:])
    new = (before.rstrip("\n") + "\n\n" if before.strip() else "") + body
    if after.strip():
        new += "\n" + after.rstrip("\n") + "\n"
    path.write_text(new)


# 8. The command line
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", default="auto", help=f"comma-separated of {list(PLANS)}, or auto: `1` and every "
                        "plan that needs exactly WORLD_SIZE ranks (torchrun mode)")
    parser.add_argument("--model", default="5b", choices=["5b", "2b"])
    parser.add_argument("--tiny", action="store_true", help="torchrun mode: the tiny model in float32 at 9x48x48 "
                        "(CPU check of the code path)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu"], help="auto: cuda:LOCAL_RANK if CUDA "
                        "is available, else the CPU")
    parser.add_argument("--steps-warm", type=int, default=1, help="steps per request not measured (>= 1)")
    parser.add_argument("--steps-measured", type=int, default=3, help="steps per request measured")
    parser.add_argument("--frames", type=int, default=FULL_GEOMETRY[0])
    parser.add_argument("--height", type=int, default=FULL_GEOMETRY[1])
    parser.add_argument("--width", type=int, default=FULL_GEOMETRY[2])
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--baseline-s-per-step", type=float, default=None, help="the 1-GPU s/step of an earlier "
                        "launch, for the speed-ups when this launch does not run the `1` plan")
    parser.add_argument("--timeout-s", type=float, default=300.0, help="every collective's timeout")
    parser.add_argument("--cpu-compare", action="store_true", help="spawn 1 and 2 gloo ranks on tiny models "
                        "(no torchrun needed)")
    parser.add_argument("--cpu-models", default="2b,5b")
    parser.add_argument("--cpu-steps", type=int, default=5, help="--cpu-compare: the schedule's steps (>= 2)")
    parser.add_argument("--cpu-repeats", type=int, default=5)
    parser.add_argument("--estimate", action="store_true", help="print the communication estimate for H100s")
    parser.add_argument("--out", type=Path, default=None, help="write the section(s) into this markdown file")
    args = parser.parse_args(argv)
    if args.plan != "auto":
        args.plan = [p for p in args.plan.split(",") if p]
        for p in args.plan:
            if p not in PLANS:
                parser.error(f"--plan takes {list(PLANS)} or auto, got {p!r}")
    args.cpu_models = [m for m in args.cpu_models.split(",") if m]
    if args.steps_warm < 1 or args.steps_measured < 1:
        parser.error("--steps-warm and --steps-measured must be >= 1")
    if args.cpu_steps < 2:
        parser.error("--cpu-steps must be >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse_args(argv)
    if not (args.cpu_compare or args.estimate):
        return torchrun_main(args)
    ok = True
    if args.cpu_compare:
        text, ok = cpu_compare(args)
        print(text, flush=True)
        if args.out:
            write_section(args.out, text.splitlines()[0], text)
    if args.estimate:
        text = render_estimate()
        print(text, flush=True)
        if args.out:
            write_section(args.out, ESTIMATE_TITLE, text)
    if args.out:
        print(f"written to {args.out}", flush=True)
    if not ok:
        print("measured bytes differ from expected_bytes_per_step (see the table)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
