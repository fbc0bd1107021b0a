"""The GPU benchmark's code path, run on the CPU with tiny models (`--dry-run`), writes its table."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_writes_the_table(tmp_path):
    """The dry run builds the models in the serving dtypes (a bf16 T5 shared by a fp16 2b and a bf16 5b
    transformer), so the reference row runs diffusers with mixed dtypes as the GPU run will."""
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\nearlier runs stay.\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_benchmark.py"), "--dry-run", "--out", str(out),
         "--steps-warm", "1", "--steps-measured", "2"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nearlier runs stay.")  # a section is appended, nothing replaced
    assert "(dry run)" in text and "--dry-run" in text
    assert "incomplete" not in text
    rows = [line for line in text.splitlines() if line.startswith("| 2b |") or line.startswith("| 5b |")]
    settings = {line.split("|")[2].strip() for line in rows}
    assert {"pipeline", "sdpa", "cudnn", "flash", "compile", "cudnn_compile", "first_block", "pab", "faster", "fp8",
            "cudnn_fp8", "fastest", "cudnn_fastest"} <= settings
    by_setting = {(line.split("|")[1].strip(), line.split("|")[2].strip()): line for line in rows}

    def deviations(model: str, setting: str) -> tuple[str, str]:
        cells = [cell.strip() for cell in by_setting[(model, setting)].split("|")]
        return cells[13], cells[14]  # max abs dev, rel L2 dev

    # the reference rows ran (2b: fp16 transformer, bf16 T5) and the stages reproduce diffusers exactly
    for model in ("5b", "2b"):
        assert "| ok |" in by_setting[(model, "pipeline")], by_setting[(model, "pipeline")]
        assert deviations(model, "pipeline") == ("0", "0")
    # lossy caches moved the latents; fp8 and cuDNN are unavailable on a CPU and say so
    assert "| ok |" in by_setting[("5b", "pab")] and "0" not in deviations("5b", "pab")
    assert "unavailable: accel.fp8 needs a CUDA GPU" in by_setting[("2b", "fp8")]
    assert "unavailable: attention_backend='cudnn' has no kernel for cpu" in by_setting[("5b", "cudnn_compile")]
    # the compiled setting ran its warmed-up graphs (not eagerly: its shape is a compiled bucket)
    assert "| ok |" in by_setting[("5b", "compile")] and "| ok |" in by_setting[("2b", "compile")]
    # the VAE is timed once (diffusers' post-processing, ours on the device, tiled), attention kernels too
    assert "| ours (uint8 on the device) |" in text and "| ours, tiled |" in text
    assert text.count("VAE decode, 5b VAE") == 1 and "Attention kernels at the full sequence" in text
    assert sum(line.startswith("| 2b | sdpa |") for line in proc.stdout.splitlines()) == 1  # printed too
    # the planned order with each row's estimate is printed before anything runs, and kept in the report
    assert proc.stdout.index("Planned order on a GPU") < proc.stdout.index("[5b] pipeline")
    assert "Planned order on a GPU, before the run" in text
    # the Enhancer rows (pseudo-model `enhance`, last in the plan): tiny SR x2 / x4 (and x4 served at 2x), RIFE 2x at
    # the decoded and the delivered size, each through the service's classes
    assert "Enhancer (CPU dry run, tiny weights" in text and "the numbers mean nothing" in text
    enhance = {tuple(c.strip() for c in line.split("|")[1:4]) for line in text.splitlines()
               if line.startswith(("| sr_x2 |", "| sr_x4 |", "| rife_2x |"))}
    assert {("sr_x2", "RRDBNet x2plus, 2x", "ok"), ("sr_x4", "RRDBNet x4plus, 4x", "ok"),
            ("rife_2x", "RIFE 2x at the decoded size", "ok"),
            ("rife_2x", "RIFE 2x at the delivered size after 2x SR", "ok")} <= enhance, enhance
    assert "| 9x32x48 | 9x64x96 |" in text and "| 9x64x96 | 17x64x96 |" in text


def _plan_table(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().isdigit()]


def test_plan_orders_rows_by_value_and_counts_everything_against_the_budget():
    bench = _benchmark_module()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_benchmark.py"), "--plan-only",
                           "--budget-s", "300"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    table = _plan_table(proc.stdout)
    assert [(m, s) for _, m, s, *_ in table] == bench.PLAN  # the full plan, in the order of value
    order = [s for _, m, s, *_ in table if m == "5b"]
    assert order[:8] == ["pipeline", "sdpa", "cudnn", "attention", "compile", "fp8", "fastest", "vae"]
    assert max(i for i, (_, m, *_) in enumerate(table) if m == "5b" and table[i][2] == "fastest") < \
        min(i for i, (_, m, *_) in enumerate(table) if m == "2b")
    total = 0.0
    for _, model, setting, est, cumulative, fits in table:
        if fits == "yes":
            total += float(est)
        assert abs(float(cumulative) - total) <= len(table)  # rounding of the printed estimates
    assert total <= 300 and any(fits == "no" for *_, fits in table)
    # the first row pays for building T5-XXL and the 5b transformer and VAE; the VAE row for its decodes
    first = float(table[0][3])
    assert first >= bench.T5_BUILD_S + bench.PRIORS["5b"]["build_s"] + bench.VAE_BUILD_S
    vae = next(float(est) for _, m, s, est, *_ in table if s == "vae")
    assert vae >= 2 * bench.VAE_UNTILED_S + 2 * bench.VAE_TILED_S
    # fastest reuses fp8's compiled replica: only its steps
    fastest = next(float(est) for _, m, s, est, *_ in table if (m, s) == ("5b", "fastest"))
    assert fastest < 0.3 * next(float(est) for _, m, s, est, *_ in table if (m, s) == ("5b", "fp8"))


def _benchmark_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_benchmark", ROOT / "benchmarks" / "gpu_benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(bench)
    finally:
        del sys.modules[spec.name]
    return bench


def test_full_size_configs_have_the_published_sizes():
    """The hard-coded configs build the real architectures (on the meta device: no memory, no time)."""
    import torch
    from diffusers import AutoencoderKLCogVideoX, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    bench = _benchmark_module()

    def billions(module) -> float:
        return round(sum(p.numel() for p in module.parameters()) / 1e9, 2)

    with torch.device("meta"):
        assert billions(CogVideoXTransformer3DModel(**bench.TRANSFORMER_CONFIGS["2b"])) == 1.69
        assert billions(CogVideoXTransformer3DModel(**bench.TRANSFORMER_CONFIGS["5b"])) == 5.57
        assert billions(AutoencoderKLCogVideoX(**bench.VAE_CONFIGS["5b"])) == 0.22
        assert billions(T5EncoderModel(T5Config(**bench.T5_XXL_CONFIG))) == 4.76


def test_fp8_quantizes_every_token_wise_linear_of_the_full_size_transformers():
    """fp8 must reach the linears that carry the FLOPs of the real architectures (diffusers' module names):
    attention q/k/v/out and the feed-forward of every block. What it leaves alone acts on the timestep
    embedding (one row per sample) or sits outside the blocks."""
    import torch
    from diffusers import CogVideoXTransformer3DModel

    from serve.stages.accel import fp8_linear_filter

    bench = _benchmark_module()
    for name, config in bench.TRANSFORMER_CONFIGS.items():
        with torch.device("meta"):
            model = CogVideoXTransformer3DModel(**config)
        linears = {fqn: m for fqn, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        chosen = {fqn for fqn, m in linears.items() if fp8_linear_filter(m, fqn)}
        per_block = {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"}
        expected = {f"transformer_blocks.{i}.{leaf}" for i in range(config["num_layers"]) for leaf in per_block}
        assert chosen == expected, name
        left = {fqn.split(".", 2)[-1] if fqn.startswith("transformer_blocks.") else fqn for fqn in set(linears) - chosen}
        assert left <= {"norm1.linear", "norm2.linear", "time_embedding.linear_1", "time_embedding.linear_2",
                        "patch_embed.text_proj", "norm_out.linear", "proj_out"}, (name, left)
        # and they hold most of the linear weights (the modulations, left out, are big but see one row each)
        weights = sum(m.weight.numel() for m in linears.values())
        assert sum(linears[f].weight.numel() for f in chosen) / weights > 0.75, name
