"""Speed options on the tiny models (CPU): caches engage per request only, the attention backend
processor is exact, compile keeps results and compiles only at warm-up, and bad configs say why."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from serve.config.accel import AccelConfig
from serve.stages.accel import apply_accel, cache_for_request, reset_accel
from serve.stages.types import AccelUnavailable, SamplingParams

# Caches need >= 2 blocks (the tiny models have 2). The first-block cache's default threshold never
# skips on tiny random weights; 0.5 does (rel. L2 deviation ~1%).
CACHES = {
    "first_block": {"cache": "first_block", "first_block": {"threshold": 0.5}},
    "pab": {"cache": "pab"},
    "faster": {"cache": "faster"},
}


def _params(**overrides) -> SamplingParams:
    values = dict(num_frames=9, height=32, width=48, num_inference_steps=8, guidance_scale=6.0,
                  use_dynamic_cfg=True, seed=11, fps=8)
    values.update(overrides)
    return SamplingParams(**values)


@pytest.fixture(scope="module")
def emb(stages):
    text, _, _ = stages("5b")
    return text.encode("a panda walking in the forest", None, do_cfg=True)


@pytest.fixture(scope="module")
def baseline(stages, emb) -> np.ndarray:
    _, denoiser, _ = stages("5b")
    return denoiser.denoise(emb, _params()).latents


def _denoiser(tiny_models, variant: str = "5b", **accel):
    """A denoiser of its own: accel options change the transformer in place."""
    from serve.stages.denoising import DenoisingStage

    return DenoisingStage.from_pretrained(str(tiny_models[variant]), accel=AccelConfig(**accel) if accel else None)


def test_accel_config_imports_without_torch():
    code = "import sys, serve.config.accel; serve.config.accel.AccelConfig(); assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


@pytest.mark.parametrize("name", list(CACHES))
def test_cache_engages_per_request_and_stays_close(name, tiny_models, emb, baseline):
    denoiser = _denoiser(tiny_models, **CACHES[name])
    speed = denoiser.denoise(emb, _params(quality="speed")).latents
    assert denoiser.last_cache_used == name
    assert not denoiser.transformer.is_cache_enabled  # hooks only live during the request

    # engaged: different from the exact model, but close to it
    assert np.isfinite(speed).all()
    diff = np.abs(speed - baseline)
    assert diff.max() > 1e-4
    assert np.linalg.norm(speed - baseline) / np.linalg.norm(baseline) < 0.05
    assert diff.max() < 0.5

    # a fresh cache per request: the same request again gives the same result
    again = denoiser.denoise(emb, _params(), use_cache=True).latents
    np.testing.assert_array_equal(speed, again)

    # quality after speed is the exact model, bit for bit
    quality = denoiser.denoise(emb, _params(quality="quality")).latents
    assert denoiser.last_cache_used == "none"
    np.testing.assert_array_equal(quality, baseline)


def test_faster_cache_needs_cfg_and_stays_off_without_it(tiny_models, stages):
    text, exact, _ = stages("5b")
    emb = text.encode("a cat", None, do_cfg=False)
    p = _params(guidance_scale=1.0, quality="speed")
    denoiser = _denoiser(tiny_models, **CACHES["faster"])
    out = denoiser.denoise(emb, p).latents
    assert denoiser.last_cache_used == "none"
    np.testing.assert_array_equal(out, exact.denoise(emb, p).latents)


def test_cache_for_request_removes_hooks_after_an_error(tiny_models):
    denoiser = _denoiser(tiny_models, **CACHES["first_block"])
    transformer = denoiser.transformer
    with pytest.raises(RuntimeError, match="boom"):
        with cache_for_request(transformer, denoiser.accel.cache_config, True) as engaged:
            assert engaged and transformer.is_cache_enabled
            raise RuntimeError("boom")
    assert not transformer.is_cache_enabled
    with cache_for_request(transformer, None, True) as engaged:  # no cache configured
        assert not engaged


@pytest.mark.parametrize("variant", ["2b", "5b"])
def test_math_backend_processor_matches_stock(variant, tiny_models, stages):
    from serve.stages.attention import SdpaBackendCogVideoXAttnProcessor

    text, exact, _ = stages(variant)
    emb = text.encode("a cat", "rain", do_cfg=True)
    p = _params(num_inference_steps=4, use_dynamic_cfg=variant != "2b")
    denoiser = _denoiser(tiny_models, variant, attention_backend="math")
    processors = set(map(type, denoiser.transformer.attn_processors.values()))
    assert processors == {SdpaBackendCogVideoXAttnProcessor}
    np.testing.assert_allclose(denoiser.denoise(emb, p).latents, exact.denoise(emb, p).latents, atol=1e-5)


def test_backend_without_a_kernel_fails_at_start(tiny_models):
    # no cuDNN attention on a CPU: the replica must fail when it starts, not on the first request
    with pytest.raises(AccelUnavailable, match="attention_backend='cudnn' has no kernel for cpu"):
        _denoiser(tiny_models, attention_backend="cudnn")


def test_fp8_on_cpu_says_why(tiny_models):
    denoiser = _denoiser(tiny_models)
    with pytest.raises(AccelUnavailable, match=r"accel.fp8 needs a CUDA GPU of compute capability >= 8.9.*cpu"):
        apply_accel(denoiser.transformer, AccelConfig(fp8=True, compile="regional"), "cpu")


def test_fp8_quantization_leaves_the_process_inductor_config_alone(tiny_models):
    """torchao's default (`set_inductor_config=True`) turns on coordinate-descent tuning for the whole
    process, which multiplies every later compile's time. Ours must not: checked against torchao itself,
    whose quantize_ sets the inductor options before it refuses the CPU."""
    import torch
    import torch._inductor.config as inductor_config
    from torchao.quantization import (
        Float8DynamicActivationFloat8WeightConfig,
        PerRow,
        quantize_,
    )

    from serve.stages.accel import (
        _quantize_fp8,
        fp8_linear_filter,
        fp8_quantization_config,
    )

    assert fp8_quantization_config("row").set_inductor_config is False
    assert fp8_quantization_config("tensor").set_inductor_config is False
    transformer = _denoiser(tiny_models).transformer.to(torch.bfloat16)
    with inductor_config.patch(coordinate_descent_tuning=False):
        with pytest.raises(AssertionError, match="compute capability"):  # float8 refuses the CPU
            _quantize_fp8(transformer, "row")
        assert inductor_config.coordinate_descent_tuning is False
        # the check can fail: torchao's default config does flip it
        with pytest.raises(AssertionError, match="compute capability"):
            quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                      filter_fn=fp8_linear_filter)
        assert inductor_config.coordinate_descent_tuning is True


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"compile": "full", "cache": "first_block"}, "compile='full' cannot be combined with cache='first_block'"),
        ({"compile": "regional", "cache": "pab"}, "compile='regional' cannot be combined with cache='pab'"),
        ({"pab": {"spatial_attention_timestep_skip_range": (800, 100)}}, "low < high"),
        ({"first_block": {"threshold": 0}}, "greater than 0"),
        ({"warmup_shapes": [(49, 480, 721)]}, "multiples of 8"),
        ({"compile": "regional", "warmup_on_start": False}, "compile needs warmup_on_start"),
        ({"fp8": True}, "fp8 needs compile"),
        ({"attention_backend": "xformers"}, "attention_backend"),
        ({"cahce": "pab"}, "Extra inputs are not permitted"),
    ],
)
def test_accel_config_rejects(options, message):
    with pytest.raises(ValidationError, match=message):
        AccelConfig(**options)


def test_pab_needs_the_current_timestep(tiny_models):
    denoiser = _denoiser(tiny_models)
    with pytest.raises(ValueError, match="needs a `current_timestep` callback"):
        apply_accel(denoiser.transformer, AccelConfig(cache="pab"), "cpu")


def test_regional_compile_matches_eager_and_compiles_only_at_warmup(tiny_models, emb, baseline):
    from torch._dynamo.utils import counters

    # "eager" traces with dynamo (fullgraph: any graph break fails) without inductor's CPU codegen
    denoiser = _denoiser(tiny_models, compile="regional", compile_backend="eager", **CACHES["first_block"])
    denoiser.warmup([(9, 32, 48)], steps=2)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    out = denoiser.denoise(emb, _params()).latents
    speed = denoiser.denoise(emb, _params(quality="speed")).latents
    assert counters["stats"]["unique_graphs"] == graphs  # no request compiled anything
    np.testing.assert_allclose(out, baseline, atol=1e-5)

    eager_cached = _denoiser(tiny_models, **CACHES["first_block"]).denoise(emb, _params(quality="speed")).latents
    np.testing.assert_allclose(speed, eager_cached, atol=1e-5)


def test_inductor_regional_compile_matches_eager_on_cpu(tiny_models, emb, baseline):
    """The real compiler (inductor, CPU code generation) on the regional blocks: the same numbers as eager,
    compiled only at warm-up, and the speed cache wraps the compiled blocks without new graphs."""
    from torch._dynamo.utils import counters

    denoiser = _denoiser(tiny_models, compile="regional", **CACHES["first_block"])
    denoiser.warmup([(9, 32, 48)], steps=1)
    graphs = counters["stats"]["unique_graphs"]
    out = denoiser.denoise(emb, _params()).latents
    assert denoiser.last_run_compiled is True
    np.testing.assert_allclose(out, baseline, atol=1e-4)
    speed = denoiser.denoise(emb, _params(quality="speed")).latents
    assert denoiser.last_cache_used == "first_block" and counters["stats"]["unique_graphs"] == graphs
    eager_speed = _denoiser(tiny_models, **CACHES["first_block"]).denoise(emb, _params(quality="speed")).latents
    np.testing.assert_allclose(speed, eager_speed, atol=1e-4)


def test_requests_outside_the_compiled_buckets_run_eagerly_and_never_compile(tiny_models, emb):
    from torch._dynamo.utils import counters

    eager = _denoiser(tiny_models)
    denoiser = _denoiser(tiny_models, compile="regional", compile_backend="eager")
    assert denoiser.warmup([(9, 32, 48)], steps=1) and denoiser.compiled_buckets == {((1, 3, 16, 4, 6), 2)}
    graphs = counters["stats"]["unique_graphs"]

    # the warmed-up bucket runs compiled
    denoiser.denoise(emb, _params(num_inference_steps=2))
    assert denoiser.last_run_compiled is True and denoiser.uncompiled_runs == 0

    # another size, and the warmed size without CFG (batch 1), run eagerly: counted, nothing compiled,
    # the same numbers as the uncompiled model
    for params in (_params(num_frames=17, height=32, width=32, num_inference_steps=2),
                   _params(guidance_scale=1.0, num_inference_steps=2)):
        ran = denoiser.denoise(emb, params).latents
        assert denoiser.last_run_compiled is False
        np.testing.assert_allclose(ran, eager.denoise(emb, params).latents, atol=1e-5)
    assert denoiser.uncompiled_runs == 2
    assert counters["stats"]["unique_graphs"] == graphs

    # warm-up without CFG adds the batch-1 bucket
    assert set(denoiser.warmup([(9, 32, 48)], steps=1, without_cfg=True)) == {"9x32x48", "9x32x48/nocfg"}
    assert ((1, 3, 16, 4, 6), 1) in denoiser.compiled_buckets
    denoiser.denoise(emb, _params(guidance_scale=1.0, num_inference_steps=2))
    assert denoiser.last_run_compiled is True and denoiser.uncompiled_runs == 2

    # without compile there are no buckets to miss
    eager.denoise(emb, _params(num_frames=17, num_inference_steps=2))
    assert eager.last_run_compiled is None and eager.uncompiled_runs == 0


@pytest.mark.parametrize("mode", ["regional", "full"])
def test_a_guard_miss_inside_a_bucket_is_detected_and_counted(mode, tiny_models, emb):
    """A request of a warmed-up shape whose inputs still fail a guard (here: a prompt of another token
    count) runs eagerly under `eager_on_recompile`; it must not be reported as compiled. Dynamo's own
    counters do not move when the stance runs a frame eagerly, so the stage counts eager calls itself."""
    from torch._dynamo.utils import counters

    from serve.stages.types import PromptEmbeddings

    denoiser = _denoiser(tiny_models, compile=mode, compile_backend="eager")
    denoiser.warmup([(9, 32, 48)], steps=1)
    graphs = counters["stats"]["unique_graphs"]
    denoiser.denoise(emb, _params(num_inference_steps=2))
    assert denoiser.last_run_compiled is True and denoiser.uncompiled_runs == 0

    short = PromptEmbeddings(positive=emb.positive[:, :100].copy(), negative=emb.negative[:, :100].copy())
    denoiser.denoise(short, _params(num_inference_steps=2))
    assert denoiser.last_run_compiled is False and denoiser.uncompiled_runs == 1
    assert denoiser.last_run_info()["compiled"] is False
    assert counters["stats"]["unique_graphs"] == graphs  # still nothing compiled on the request path

    denoiser.denoise(emb, _params(num_inference_steps=2))  # and the bucket's graphs serve the next one
    assert denoiser.last_run_compiled is True and denoiser.uncompiled_runs == 1


def test_reset_accel_restores_the_stock_model(tiny_models, emb, baseline):
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    denoiser = _denoiser(tiny_models, attention_backend="math", compile="regional", compile_backend="eager")
    with pytest.raises(RuntimeError, match="already applied"):
        apply_accel(denoiser.transformer, AccelConfig(), "cpu")
    reset_accel(denoiser.transformer)
    assert set(map(type, denoiser.transformer.attn_processors.values())) == {CogVideoXAttnProcessor2_0}
    assert not any("forward" in vars(block) for block in denoiser.transformer.transformer_blocks)
    np.testing.assert_array_equal(denoiser.denoise(emb, _params()).latents, baseline)


def test_warmup_runs_each_stage_once_per_shape(stages):
    text, denoiser, decoder = stages("2b")
    assert set(denoiser.warmup([(9, 32, 48), (17, 32, 32)], steps=1)) == {"9x32x48", "17x32x32"}
    assert set(decoder.warmup([(9, 32, 48)])) == {"9x32x48"}
    assert not decoder.last_decode_tiled
    assert text.warmup() and 226 in text._empty_negative
    assert denoiser.current_timestep is None  # only set while a step runs


def test_warmup_shapes_default_to_the_preset_video():
    from serve.config import ModelConfig
    from serve.stages.loading import warmup_shapes

    model = ModelConfig(family="cogvideox-5b", defaults={"num_frames": 25})
    assert warmup_shapes(model, AccelConfig()) == [(25, 480, 720)]
    assert warmup_shapes(model, AccelConfig(warmup_shapes=[(49, 480, 720), (9, 32, 48)])) == [(49, 480, 720),
                                                                                             (9, 32, 48)]


def test_load_stage_passes_accel_to_the_denoiser(tiny_models):
    from serve.config import AppConfig
    from serve.stages.denoising import DenoisingStage
    from serve.stages.loading import load_stage

    config = AppConfig(model={"source": str(tiny_models["5b"]), "family": "cogvideox-5b", "device": "cpu"})
    stage = load_stage(DenoisingStage, config, accel=AccelConfig(cache="pab", attention_backend="math"))
    assert stage.accel.as_dict() == {"attention_backend": "math", "compile": "off", "fp8": False, "cache": "pab",
                                     "device": "cpu"}
