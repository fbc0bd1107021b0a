"""benchmarks/parallel_benchmark.py: its analytic bytes per step equal what parallel.py's CommStats counts on gloo
ranks (tiny 2b, 5b and 1.5, cfg2 and ulysses2, every rank), its estimate says it is one, and a section of the same
title is replaced in BENCHMARKS.md, not duplicated."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.stages import parallel_ranks as pr

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import parallel_benchmark as pb  # noqa: E402

VARIANTS = ("2b", "5b", "1.5")  # 1.5: temporal patches, front-padded latent frames, a wider proj_out
STEPS = 3  # parallel_ranks' default schedule


PLANS = {"cfg2": {"cfg": 2}, "ulysses2": {"ulysses": 2}}


def _rank(rank: int, world: int, port: int, models: dict[str, str], out_dir: str) -> None:
    """One gloo rank: both 2-rank plans on every variant (one spawn for all: the test stays fast); CommStats of
    each whole request, counted by parallel.py itself (not by the benchmark's per-step window)."""
    import torch

    from serve.config.parallel import ParallelConfig
    from serve.stages.parallel import ParallelContext, init_distributed

    torch.set_num_threads(1)
    init_distributed(rank, world, "127.0.0.1", port, backend="gloo", timeout_s=60)
    results = {}
    for name, plan in PLANS.items():
        ctx = ParallelContext(ParallelConfig(**plan))
        for variant in VARIANTS:
            case = {"name": variant, "variant": variant, "dynamic_cfg": False, "steps": STEPS}
            stage = pr.load(models[variant], case, parallel=ctx)
            ctx.stats.reset()
            pr.run_case(stage, case)
            results[(name, variant)] = {"bytes": ctx.stats.total(), "calls": dict(ctx.stats.calls)}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_analytic_bytes_equal_measured(tiny_models, tmp_path):
    import torch
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(2, pb._free_port(), {k: str(v) for k, v in tiny_models.items()}, str(tmp_path)),
             nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for name, plan in PLANS.items():
        for variant in VARIANTS:
            config = json.loads((tiny_models[variant] / "transformer" / "config.json").read_text())
            for rank, results in enumerate(ranks):
                got = results[(name, variant)]
                # float32 tiny models: 4 bytes per element; the cancel broadcast is counted on rank 0 only
                want = pb.expected_bytes_per_step(config, pr.GEOMETRY[variant], name, 4, rank=rank)
                assert got["bytes"] == STEPS * want, (name, variant, rank, got, want)
                assert sum(got["calls"].values()) == STEPS * pb.expected_calls_per_step(config, plan, rank=rank)
                if name == "ulysses2":  # the work really was split
                    assert got["calls"]["sp_all_to_all_qkv"] == STEPS * config["num_layers"]
    # 27 video tokens over 2 shards: the padding row is in the counted bytes
    assert pb.sequence(json.loads((tiny_models["5b"] / "transformer" / "config.json").read_text()),
                       pr.GEOMETRY["5b"])["video"] == 27


def test_estimate_is_labelled_and_shows_its_arithmetic():
    text = pb.render_estimate()
    assert text.startswith(pb.ESTIMATE_TITLE) and "estimate" in text.lower() and "ESTIMATE" in text
    assert "nothing in this section was measured" in text
    # 5b ulysses2 at 49x480x720 bf16: 42 x 3 x 2 x 8,775 x 48 x 64 x 2 x 1/2 bytes of qkv all-to-all per step
    assert "= 6,793,113,600 B" in text
    assert "not possible: ulysses 4 does not divide 30 heads" in text  # 2b


def test_write_section_replaces_a_section_of_the_same_title(tmp_path):
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nintro\n\n## Other (2026-01-01)\n\nkept\n")
    pb.write_section(out, "## A", "## A\n\nfirst\n")
    pb.write_section(out, "## B", "## B\n\nb\n")
    pb.write_section(out, "## A", "## A\n\nsecond\n")
    text = out.read_text()
    assert text.count("## A") == 1 and "second" in text and "first" not in text
    assert text.index("## Other") < text.index("## A") < text.index("## B")  # replaced in place
    assert "kept" in text and "intro" in text and text.endswith("b\n")
