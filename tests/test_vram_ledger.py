"""The VRAM ledger (ldm/ledger): exact on what can be counted by hand, and the memory targets on SD v1.

The SD v1 tests build the real models on the meta device from the config (no weights, no memory) and run
the generator's code on meta: seconds, not a GPU. Figures are GiB of simulated ``max_memory_allocated``
for fp16, batch 1 with guidance (scale 7.5), sdpa attention, DPM-Solver++(2M). Targets: low mode at most
0.40 / 0.45 / 0.60 GiB at 512 / 768 / 1024, low < medium < full, medium at most 1.75 GiB at 512, full no
more than diffusers' resident pipeline; with ``--quantize int8`` medium under 1.0 GiB at 512.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm import samplers
from ldm.ledger import CudaAttentionChoice, DeviceBytes, RunShape, cuda_kernel, meta_stable_diffusion, simulate
from ldm.ledger.plan import memory_plan, pick_mode, plan_steps
from ldm.memory.module_groups import ModuleGroup
from tests.conftest import SD_V1_CONFIG, TINY_CONFIG

GIB = 2**30


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# ---- exact on a hand-counted model --------------------------------------------------------------------------
def test_ledger_counts_weights_and_activations_as_counted_by_hand():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    group = ModuleGroup("model", [model], home="meta")
    weights = nbytes(*model.parameters())
    assert weights == (64 * 128 + 128 + 128 * 32 + 32) * 4
    counter = DeviceBytes("meta")
    with counter, torch.no_grad():
        assert counter.live == 0  # the model built before the mode is the host copy: not device memory
        group.onload(torch.device("meta"), copy=True)
        counter.mark_weights(group.tensors)
        assert counter.live == counter.weights == weights
        x = torch.empty(4, 64, device="meta")
        h = model[0](x)  # views of the weight (its transpose) cost nothing
        assert counter.live == weights + nbytes(x, h)
        h = model[1](h)  # ReLU: a new [4, 128] tensor while its input is still alive
        peak_expected = weights + nbytes(x) + 2 * 4 * 128 * 4
        y = model[2](h)
        del h
        assert counter.live == weights + nbytes(x, y)
        group.offload()  # the device copies die with their last reference
        assert counter.live == nbytes(x, y) and counter.weights == 0
    assert counter.peak.total == peak_expected and counter.peak.weights == weights


def test_ledger_counts_an_int8_layers_dequantized_weight_while_it_runs():
    """``--quantize int8``: the device holds int8 weights, and each layer's fp16 copy ``scale * q`` is live
    for its call (one layer at a time)."""
    from ldm.models.quantize import Int8Linear

    with torch.device("meta"):
        layer = Int8Linear(nn.Linear(256, 512).half())
    group = ModuleGroup("layer", [layer], home="meta")
    counter = DeviceBytes("meta")
    with counter, torch.no_grad():
        group.onload(torch.device("meta"), copy=True)
        counter.mark_weights(group.tensors)
        weights = 256 * 512 * 1 + 512 * (256 // 64) * 2 + 512 * 2  # int8 q, fp16 scales (groups of 64), bias
        assert counter.live == counter.weights == weights
        x = torch.empty(4, 256, device="meta", dtype=torch.float16)
        y = layer(x)
        assert counter.peak.total == weights + nbytes(x) + 256 * 512 * 2 + nbytes(y)  # + the fp16 weight
        assert counter.live == weights + nbytes(x, y)  # which dies with the call
        group.offload()


def test_fused_attention_holds_no_score_matrix_and_math_attention_does():
    replay = CudaAttentionChoice()
    counter = DeviceBytes("meta")
    batch, heads, tokens, dim = 2, 8, 1024, 40
    with replay, counter:
        q, k, v = (torch.empty(batch, tokens, heads, dim, device="meta", dtype=torch.float16).transpose(1, 2)
                   for _ in range(3))  # [B, heads, N, d] with a contiguous last dimension, as CrossAttention's
        inputs = counter.live
        out = F.scaled_dot_product_attention(q, k, v)
        # Flash: the output, its fp32 log-sum-exp and its RNG seed and offset (two + one uint64) while the
        # kernel runs; no [N, N] scores.
        assert counter.peak.total == inputs + nbytes(out) + batch * heads * tokens * 4 + 3 * 8
        assert replay.choices == {"flash": 1}
        strided = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (q, k, v)]  # last-dim stride N
        assert cuda_kernel(*strided) == "math"
        before = counter.peak.total
        F.scaled_dot_product_attention(*strided)
        scores = batch * heads * tokens * tokens * 4  # the math path upcasts fp16 to fp32
        assert counter.peak.total - before >= scores
    assert replay.choices == {"flash": 1, "math": 1}
    wide = torch.empty(1, 1, 4096, 512, device="meta", dtype=torch.float16)  # the VAE's one 512-wide head
    assert cuda_kernel(wide, wide, wide) == "efficient"
    assert cuda_kernel(*(torch.empty(1, 1, 64, 6, device="meta") for _ in range(3))) == "math"  # misaligned


# ---- the simulated run on the tiny model --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_meta():
    return meta_stable_diffusion(TINY_CONFIG, torch.float32)


@pytest.mark.parametrize("sampler", samplers.SAMPLER_NAMES)
def test_the_plans_steps_reach_the_samplers_steady_state(tiny_meta, sampler):
    """The plan simulates a few steps; more give the same peak, in every phase."""
    few = simulate(tiny_meta, "low", RunShape(64, 64, sampler=sampler, steps=plan_steps(sampler, 20)))
    many = simulate(tiny_meta, "low", RunShape(64, 64, sampler=sampler, steps=plan_steps(sampler, 20) + 2))
    assert few.phase_peaks == many.phase_peaks and few.peak == many.peak


def test_the_simulation_leaves_the_models_as_they_were(tiny_meta):
    before = {name: (t.device, t.dtype) for name, t in tiny_meta.unet.state_dict().items()}
    for mode in ("full", "medium", "low"):
        run = simulate(tiny_meta, mode, RunShape(64, 64, steps=2))
        assert set(run.phase_peaks) == {"text_encoder", "unet", "vae"}
        assert 0 < run.peak.weights <= run.peak.total
    assert {name: (t.device, t.dtype) for name, t in tiny_meta.unet.state_dict().items()} == before


def test_pick_mode():
    runs = {name: type("Run", (), {"peak_bytes": peak})() for name, peak in (("full", 3 * GIB), ("medium", 2 * GIB), ("low", GIB // 2))}
    assert pick_mode(runs, None) is None
    assert pick_mode(runs, 8 * GIB) == "full"
    assert pick_mode(runs, int(2.5 * GIB)) == "medium"
    assert pick_mode(runs, GIB) == "low"
    assert pick_mode(runs, GIB // 4) == "low"  # the last resort


# ---- SD v1 on meta: the memory targets, through the generation loop's own stages (--plan) ---------------------
def plan_request(size: int, *extra: str):
    from ldm.pipeline.request import TXT2IMG
    from optimizedSD.arguments import parse_args

    return parse_args(["--plan", "--config", str(SD_V1_CONFIG), "--ckpt", "no-such-file.ckpt", "--device", "cpu",
                       "--H", str(size), "--W", str(size), "--n_samples", "1", "--sampler", "dpm_solver",
                       "--ddim_steps", "20", *extra], TXT2IMG)


@pytest.fixture(scope="module")
def sd_v1_plans():
    from optimizedSD.plan import plan_for

    return {size: plan_for(plan_request(size)) for size in (512, 768, 1024)}


@pytest.mark.parametrize("size, limit", [(512, 0.40), (768, 0.45), (1024, 0.60)])
def test_low_mode_targets(sd_v1_plans, size, limit):
    plan = sd_v1_plans[size]
    low = plan.modes["low"]
    assert low.peak_bytes <= limit * GIB, (size, low.peak_bytes / GIB)
    assert low.peak_bytes < plan.modes["medium"].peak_bytes < plan.modes["full"].peak_bytes
    assert plan.low_tiled == (size > 512)  # decoded whole where it does not set the peak
    assert "math" not in low.attention_kernels  # the VAE's attention too runs a fused kernel


def test_medium_mode_target(sd_v1_plans):
    assert sd_v1_plans[512].modes["medium"].peak_bytes <= 1.75 * GIB


def test_full_mode_is_no_more_than_diffusers_resident_pipeline(sd_v1_plans):
    from tests.ledger_reference import diffusers_resident_run

    ours = sd_v1_plans[512].modes["full"]
    theirs = diffusers_resident_run(SD_V1_CONFIG, 512, 512, steps=plan_steps("dpm_solver", 20))
    assert ours.peak_bytes <= theirs.peak_bytes, (ours.peak_bytes / GIB, theirs.peak_bytes / GIB)
    assert ours.peak.weights <= theirs.peak.weights  # ours leaves the VAE encoder on the host


def test_int8_targets():
    """With ``--quantize int8`` medium mode at 512x512 needs under 1.0 GiB (fp16: 1.734), and low
    mode streams about half fp16's bytes at every step (the UNet's norms, biases, scales and first and
    last convs stay fp16; measured 0.516x). Per step: the UNet onloads of two steps less those of one."""
    from optimizedSD.plan import plan_for

    plan = plan_for(plan_request(512, "--quantize", "int8"))
    assert plan.modes["medium"].peak_bytes < 1.0 * GIB, plan.modes["medium"].peak_bytes / GIB
    assert plan.modes["low"].peak_bytes < plan.modes["medium"].peak_bytes < plan.modes["full"].peak_bytes

    def streamed_per_step(quantize: str | None) -> int:
        sd = meta_stable_diffusion(SD_V1_CONFIG, torch.float16, quantize)
        one, two = (simulate(sd, "low", RunShape(512, 512, sampler="ddim", steps=n)) for n in (1, 2))
        return two.onload_bytes["unet"] - one.onload_bytes["unet"]

    fp16, int8 = streamed_per_step(None), streamed_per_step("int8")
    assert fp16 > 1.5 * GIB
    assert 0.5 < int8 / fp16 < 0.52, int8 / fp16  # int8 and one fp16 scale per 64 weights: 1 + 2/64 bytes


def test_plan_json_shape(sd_v1_plans):
    data = sd_v1_plans[512].as_json()
    assert set(data) == {"height", "width", "batch", "modes", "auto"} and data["auto"] is None
    assert set(data["modes"]) == {"full", "medium", "low"}
    for mode in data["modes"].values():
        assert set(mode) == {"peak_bytes", "phase_peaks", "weight_bytes"}
        assert set(mode["phase_peaks"]) == {"text_encoder", "unet", "vae"}
        assert mode["peak_bytes"] == max(mode["phase_peaks"].values())


# ---- the ledger against a real GPU (CUDA only; scripts/gpu_check.sh runs these) -----------------------------
CUDA_OVERHEAD_BYTES = 64 << 20  # cuBLAS/cuDNN workspaces that go through the caching allocator, at most


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantize", [None, "int8"])
@pytest.mark.parametrize("mode", ["full", "medium", "low"])
def test_ledger_predicts_cuda_max_memory_allocated(tiny_checkpoint, mode, quantize):
    from ldm.ledger.measured import measure_on_cuda
    from ldm.loading.stable_diffusion import load_stable_diffusion
    from ldm.models.quantize import quantize_unet

    shape = RunShape(256, 256, sampler="dpm_solver", steps=3)
    predicted = simulate(meta_stable_diffusion(TINY_CONFIG, torch.float16, quantize), mode, shape)
    sd = load_stable_diffusion(tiny_checkpoint, TINY_CONFIG, dtype=torch.float16)
    if quantize:
        quantize_unet(sd.unet, quantize)
    measured = measure_on_cuda(sd, mode, shape, torch.device("cuda"))
    print(mode, quantize, "ledger", predicted.peak_bytes, "measured", measured["peak_bytes"])
    assert predicted.peak_bytes - (1 << 20) <= measured["peak_bytes"] <= predicted.peak_bytes + CUDA_OVERHEAD_BYTES


@pytest.mark.parametrize("mode", ["full", "low"])
def test_the_ledgers_calls_run_on_a_real_device_as_the_cli_does(tiny_checkpoint, tmp_path, mode):
    """scripts/gpu_check.py measures the ledger's calls on CUDA with real weights; the same calls on the CPU with
    the tiny checkpoint's weights draw the image the command line draws for the same seed, prompt and steps
    (one loop: the ledger's calls are the generation stages)."""
    from contextlib import nullcontext

    import numpy as np
    from PIL import Image

    from ldm.ledger.calls import generation_calls, shape_request
    from ldm.loading.stable_diffusion import load_stable_diffusion
    from ldm.memory.residency import Residency
    from optimizedSD import optimized_txt2img
    from optimizedSD.outputs import to_uint8

    shape = RunShape(64, 64, sampler="ddim", steps=2)
    kept = []

    class Keep:
        def pixels(self, decoded):
            return to_uint8(decoded)[0]

        def add(self, batch, k, decoded):
            kept.append(self.pixels(decoded))

    sd = load_stable_diffusion(tiny_checkpoint, TINY_CONFIG, dtype=torch.float32)
    residency = Residency(sd, torch.device("cpu"), mode)
    calls = generation_calls(shape_request(shape), sink=Keep())
    try:
        with torch.no_grad():
            calls(sd, residency, shape, torch.device("cpu"), lambda name: nullcontext())
    finally:
        residency.release()
    argv = ["--ckpt", str(tiny_checkpoint), "--config", str(TINY_CONFIG), "--device", "cpu", "--H", "64", "--W", "64",
            "--ddim_steps", "2", "--sampler", "ddim", "--seed", "0", "--n_samples", "1", "--prompt", "a prompt",
            "--outdir", str(tmp_path), "--no-watermark", "--skip_grid", "--vram", mode]
    assert optimized_txt2img.main(argv) == 0
    (written,) = sorted(tmp_path.rglob("seed_0_*.png"))
    assert np.abs(np.asarray(Image.open(written), dtype=np.int16) - kept[0].astype(np.int16)).max() <= 1
