#!/usr/bin/env python3
"""Time and memory of this project's generator next to diffusers' StableDiffusionPipeline, same file, same run.

    python scripts/benchmark.py                      # CPU: SD v1 shapes, 256x256, 10 DDIM steps, batch 1
    python scripts/benchmark.py --device cuda        # GPU: 512x512 fp16, 20 DPM-Solver++ steps, batch 1 and 4
    python scripts/benchmark.py --H 512 --W 512 --steps 20 --quantize int8 --tome 0.5   # the CPU targets' run, plus
                                                     # rows of our modes with --quantize int8 and with --tome 0.5
    python scripts/benchmark.py --backend openvino --per_step --repeat 2   # rows of --backend openvino (a first
                                                     # row converting into an empty cache, then cache hits), and
                                                     # seconds per step from the runs at --steps and at 1 step

Both sides read the same checkpoint (``--ckpt``; by default random weights in the SD v1 layout are written
to a temporary .safetensors first). Our side runs through ``optimizedSD.generation.generate``, the code the
command-line scripts run, with ``--vram MODE``; diffusers' side builds its UNet, VAE and CLIP from the same
file with ``diffusers.loaders.single_file_utils``' converters, offline, and runs its pipeline with the
scheduler that matches (DDIMScheduler with CompVis' settings, or DPMSolverMultistepScheduler "dpmsolver++").

Every measurement runs in its own subprocess, which reports its own peak RSS (``getrusage(RUSAGE_SELF)``)
and, on CUDA, ``max_memory_allocated`` / ``max_memory_reserved`` over the generation (weights on the device
included). Reported: load time (read + build + place), generation time (prompt encoding, sampling, VAE
decode), their sum, seconds per image, and our/diffusers ratios. On CUDA each side first makes a 2-step
warm-up image (kernel selection, lazy initialisation), not timed.

With ``--quantize int8`` a first row ("check  int8 error") loads the file in fp32 in a process of its own
and reports one UNet forward (batch 2, the run's latent size) with int8 weights against fp32's, relative
L2, and the targets check it against at most 1 %.

Modes compared on CUDA: ours ``full``, ``medium``, ``low``; diffusers resident (``pipe.to``),
``enable_model_cpu_offload``, ``enable_sequential_cpu_offload`` and ``enable_group_offload`` (block level,
one block per group, side stream) where the installed diffusers has it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

RESULT_TAG = "BENCHMARK_RESULT "
PROMPT = "a photograph of an astronaut riding a horse"
OUR_MODES = ("full", "medium", "low")
DIFFUSERS_MODES = ("resident", "model_offload", "sequential_offload", "group_offload")
# Which diffusers setup each of our modes is compared with.
COUNTERPART = {"full": "resident", "medium": "model_offload", "low": "group_offload", "auto": "resident"}
GB = 2**30


# ---- workers (each in its own process) ---------------------------------------------------------------------
def _peak_rss_bytes() -> int:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _cuda_peaks(torch, device) -> dict:
    if device.type != "cuda":
        return {}
    torch.cuda.synchronize(device)
    return {
        "peak_vram_allocated": torch.cuda.max_memory_allocated(device),
        "peak_vram_reserved": torch.cuda.max_memory_reserved(device),
    }


def run_ours(spec: dict) -> dict:
    import torch

    from ldm.pipeline.request import TXT2IMG
    from optimizedSD.arguments import parse_args
    from optimizedSD.generation import generate

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])

    def argv(steps: int, outdir: str) -> list[str]:
        flags = [
            "--prompt", spec["prompt"], "--ckpt", spec["ckpt"], "--config", spec["config"],
            "--H", str(spec["height"]), "--W", str(spec["width"]), "--ddim_steps", str(steps),
            "--n_samples", str(spec["batch"]), "--n_iter", "1", "--sampler", spec["sampler"],
            "--scale", "7.5", "--seed", str(spec["seed"]), "--skip_save", "--skip_grid", "--no-watermark",
            "--vram", spec["mode"], "--device", spec["device"], "--outdir", outdir,
            "--precision", "autocast" if spec["fp16"] else "full",
        ]
        if spec.get("vram_budget") is not None:
            flags += ["--vram_budget", str(spec["vram_budget"])]
        return flags + list(spec.get("flags", []))  # a variant's own flags (--quantize int8, --tome 0.5)

    with tempfile.TemporaryDirectory() as outdir:
        if spec["warmup"]:
            generate(parse_args(argv(2, outdir), TXT2IMG))
            if device.type == "cuda":
                torch.cuda.empty_cache()
        started, cpu_started = time.time(), time.process_time()
        summary = generate(parse_args(argv(spec["steps"], outdir), TXT2IMG))
        finished, cpu = time.time(), time.process_time() - cpu_started
    # CPU seconds of all the process's threads (load included): less moved by other processes on a shared machine.
    result = {"images": summary.images, "total_s": finished - started, "mode_used": summary.memory_mode,
              "load_s": summary.load_seconds, "generate_s": summary.seconds - summary.load_seconds, "cpu_s": cpu}
    result.update(_cuda_peaks(torch, device))
    return result


def _build_diffusers_pipeline(spec: dict, torch, dtype):
    """UNet, VAE and CLIP converted from the CompVis-layout file with diffusers' own converters, offline."""
    from diffusers import AutoencoderKL, DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
        create_unet_diffusers_config_from_ldm,
        create_vae_diffusers_config_from_ldm,
    )
    from omegaconf import OmegaConf
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer

    from ldm.config import load_model_config
    from ldm.conditioning.text_encoder import clip_text_config

    original_config = OmegaConf.to_container(OmegaConf.load(spec["config"]), resolve=True)
    checkpoint = load_file(spec["ckpt"])  # memory-mapped, as diffusers' from_single_file reads it

    def build(cls, config, weights):
        with torch.device("meta"):
            model = cls(**config) if isinstance(config, dict) else cls(config)
        weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
        expected = set(model.state_dict())
        weights = {k: v for k, v in weights.items() if k in expected or not k.endswith("position_ids")}
        model.load_state_dict(weights, strict=True, assign=True)
        return model.eval().requires_grad_(False)

    unet_config = create_unet_diffusers_config_from_ldm(original_config, checkpoint)
    unet = build(UNet2DConditionModel, unet_config, convert_ldm_unet_checkpoint(checkpoint, unet_config))
    vae_config = create_vae_diffusers_config_from_ldm(original_config, checkpoint)
    vae = build(AutoencoderKL, vae_config, convert_ldm_vae_checkpoint(checkpoint, vae_config))

    text_cfg = load_model_config(spec["config"]).text
    clip_config = clip_text_config(text_cfg)
    with torch.device("meta"):
        probe_keys = set(CLIPTextModel(clip_config).state_dict())
    clip_weights = convert_ldm_clip_checkpoint(checkpoint)
    if not any(k.startswith("text_model.") for k in probe_keys):  # transformers >= 5.6 has no text_model.
        clip_weights = {k.removeprefix("text_model."): v for k, v in clip_weights.items()}
    text_encoder = build(CLIPTextModel, clip_config, clip_weights)
    for module in text_encoder.modules():  # a non-persistent buffer no file sets
        ids = module._buffers.get("position_ids")
        if ids is not None and ids.is_meta:
            module._buffers["position_ids"] = torch.arange(ids.shape[-1]).expand(ids.shape).clone()
    del checkpoint

    tokenizer = CLIPTokenizer.from_pretrained(str(REPO / "models" / "tokenizer"), model_max_length=77)
    schedule = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1)
    if spec["sampler"] == "ddim":
        scheduler = DDIMScheduler(**schedule, clip_sample=False, set_alpha_to_one=False)
    elif spec["sampler"] == "dpm_solver":
        scheduler = DPMSolverMultistepScheduler(**schedule, algorithm_type="dpmsolver++", solver_order=2)
    else:
        raise ValueError(f"no diffusers scheduler set up for sampler {spec['sampler']!r}")
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def run_diffusers(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = torch.float16 if spec["fp16"] else torch.float32
    started = time.time()
    pipe = _build_diffusers_pipeline(spec, torch, dtype)
    mode = spec["mode"]
    if mode == "resident":
        pipe.to(device)
    elif mode == "model_offload":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential_offload":
        pipe.enable_sequential_cpu_offload(device=device)
    elif mode == "group_offload":
        if not hasattr(pipe, "enable_group_offload"):
            return {"skipped": "this diffusers has no enable_group_offload"}
        pipe.enable_group_offload(
            onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
            num_blocks_per_group=1, use_stream=device.type == "cuda",
        )
    else:
        raise ValueError(f"unknown diffusers mode {mode!r}")
    pipe.set_progress_bar_config(disable=True)
    loaded = time.time()

    def call(steps: int):
        generator = torch.Generator("cpu").manual_seed(spec["seed"])
        return pipe([spec["prompt"]] * spec["batch"], height=spec["height"], width=spec["width"],
                    num_inference_steps=steps, guidance_scale=7.5, generator=generator, output_type="np").images

    if spec["warmup"]:
        call(2)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    begin = time.time()
    images = call(spec["steps"])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    end = time.time()
    result = {"images": len(images), "load_s": loaded - started, "generate_s": end - begin, "mode_used": mode}
    result["total_s"] = result["load_s"] + result["generate_s"]
    result.update(_cuda_peaks(torch, device))
    return result


def run_quantization_error(spec: dict) -> dict:
    """The int8 error figure: one UNet forward (batch 2, as guidance runs it, at the run's latent size) of
    the file's fp32 weights against the same UNet with ``--quantize``'s weights, relative L2 error."""
    import torch

    from ldm.loading.stable_diffusion import load_stable_diffusion
    from ldm.models.quantize import quantize_unet

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    sd = load_stable_diffusion(spec["ckpt"], spec["config"], dtype=torch.float32)
    unet, cfg = sd.unet.to(device), sd.config
    generator = torch.Generator().manual_seed(spec["seed"])
    factor = cfg.downsampling_factor
    x = torch.randn(2, cfg.latent_channels, spec["height"] // factor, spec["width"] // factor, generator=generator)
    context = torch.randn(2, 77, cfg.unet.context_dim, generator=generator)
    t = torch.tensor([1.0, 600.0])
    with torch.no_grad():
        exact = unet(x.to(device), t.to(device), context.to(device))
        started = time.time()
        quantize_unet(unet, spec["quantize"])
        seconds = time.time() - started
        error = (unet(x.to(device), t.to(device), context.to(device)) - exact).norm() / exact.norm()
    return {"forward_error": error.item(), "quantize_s": seconds}


def _anon_bytes() -> int:
    """This process's private memory (RssAnon): RSS less the file pages the kernel may drop at any time."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))


def _sample_anon_peak(peak: list[int]) -> None:
    while True:
        peak[0] = max(peak[0], _anon_bytes())
        time.sleep(0.05)


def run_worker(spec: dict) -> int:
    logging.basicConfig(level=logging.WARNING)
    runs = {"ours": run_ours, "diffusers": run_diffusers, "check": run_quantization_error}
    if spec.get("fresh_cache"):  # the conversion row: an empty --backend_cache, so that it converts
        shutil.rmtree(spec["fresh_cache"], ignore_errors=True)
    anon = [0]
    if sys.platform.startswith("linux"):
        threading.Thread(target=_sample_anon_peak, args=(anon,), daemon=True).start()
    result = runs[spec["side"]](spec)
    result["peak_rss"] = _peak_rss_bytes()
    result["peak_anon"] = max(anon[0], _anon_bytes()) if sys.platform.startswith("linux") else None
    print(RESULT_TAG + json.dumps(result), flush=True)
    return 0


# ---- the parent: plan, spawn, report -----------------------------------------------------------------------
def measure(spec: dict, timeout: float) -> dict:
    """Run one measurement in a fresh Python process; its JSON result, or {"error": ...}."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    lines = (done.stderr or done.stdout).strip().splitlines()
    return {"error": f"exit {done.returncode}: {lines[-1] if lines else 'no output'}"}


def make_checkpoint(config: str, directory: Path, seed: int) -> Path:
    """Random SD v1-layout weights for ``config``, written by scripts/make_random_checkpoint.py (own process)."""
    path = directory / "random-weights.safetensors"
    subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_random_checkpoint.py"), "--config", config, "--out", str(path), "--seed", str(seed)],
        check=True, cwd=REPO,
    )
    return path


def _fmt(value, scale: float = 1.0, digits: int = 2) -> str:
    return "-" if value is None else f"{value / scale:.{digits}f}"


def setup_name(spec: dict) -> str:
    """The mode, with our variant's label when there is one ("full int8", "full tome 0.5")."""
    return f"{spec['mode']} {spec['variant']}" if spec.get("variant") else spec["mode"]


def format_row(spec: dict, result: dict) -> str:
    name = f"{spec['side']:<10}{setup_name(spec):<26}{spec['batch']:>5}"
    if "error" in result or "skipped" in result:
        return f"{name}   {result.get('error') or 'skipped: ' + result['skipped']}"
    if "forward_error" in result:
        return (f"{name}   one UNet forward {100 * result['forward_error']:.2f} % from fp32 (relative L2; "
                f"quantized in {result['quantize_s']:.1f} s)")
    images = max(result.get("images") or 1, 1)
    generate = result.get("generate_s")
    per_image = (generate if generate is not None else result["total_s"]) / images
    return (
        f"{name}{_fmt(result.get('load_s'), digits=1):>8}{_fmt(generate, digits=1):>12}{_fmt(result['total_s'], digits=1):>9}"
        f"{per_image:>9.2f}{_fmt(result['peak_rss'], GB):>8}"
        f"{_fmt(result.get('peak_vram_allocated'), GB):>14}{_fmt(result.get('peak_vram_reserved'), GB):>13}"
        f"{_fmt(result.get('peak_anon'), GB):>9}{steps_run(spec):>7}"
    )


HEADER = (
    f"{'side':<10}{'mode':<26}{'batch':>5}{'load s':>8}{'generate s':>12}{'total s':>9}{'s/image':>9}"
    f"{'RSS GB':>8}{'VRAM alloc GB':>14}{'reserved GB':>13}{'anon GB':>9}{'steps':>7}"
)


def best_results(rows: list[tuple[dict, dict]]) -> dict[tuple, dict]:
    """Per (side, mode, batch): the fastest successful repeat (times), with the largest peaks seen (memory)."""
    best: dict[tuple, dict] = {}
    for spec, result in main_rows(rows):
        key = (spec["side"], setup_name(spec), spec["batch"])
        if "error" in result or "skipped" in result:
            best.setdefault(key, result)
            continue
        kept = best.get(key)
        if kept is None or "error" in kept or "skipped" in kept:
            best[key] = dict(result)
            continue
        for name in ("load_s", "generate_s", "total_s"):
            if result.get(name) is not None and kept.get(name) is not None:
                kept[name] = min(kept[name], result[name])
        for name in ("peak_rss", "peak_vram_allocated", "peak_vram_reserved"):
            if result.get(name) is not None and kept.get(name) is not None:
                kept[name] = max(kept[name], result[name])
    return best


def main_rows(rows: list[tuple[dict, dict]]) -> list[tuple[dict, dict]]:
    """The rows at the run's step count (``--per_step`` adds rows at 1 step, which only per_step_lines reads)."""
    return [(spec, result) for spec, result in rows if not spec.get("per_step_base")]


LCM_TAESD = "lcm4 taesd"
LCM_STEPS = 4  # the LCM rows' own step count (their spec keeps --steps, to be paired with the plain run)


def steps_run(spec: dict) -> int:
    return LCM_STEPS if spec.get("variant", "").endswith(LCM_TAESD) else spec["steps"]


def make_taesd(directory: Path, seed: int) -> Path:
    """A TAESD with random weights in diffusers' ``AutoencoderTiny`` layout (its timing does not depend on them)."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    AutoencoderTiny().save_pretrained(directory / "taesd")
    return directory / "taesd"


def speed_lines(rows: list[tuple[dict, dict]]) -> list[str]:
    """``--deepcache``'s time per step against the plain run's, in wall and CPU seconds (target at most 0.60x), and
    LCM + TAESD's generate time against the plain run's (target at most 0.10x); best of the repeats."""
    best: dict[tuple, dict] = {}
    for spec, result in rows:
        if spec["side"] == "ours" and result.get("generate_s") is not None:
            key = (setup_name(spec), spec["batch"], spec["steps"])
            kept = best.setdefault(key, {})
            for name in ("generate_s", "cpu_s"):
                if result.get(name) is not None:
                    kept[name] = min(kept.get(name, float("inf")), result[name])
    lines = []
    for (setup, batch, steps), result in best.items():
        plain = best.get((setup.split()[0], batch, steps))
        if "deepcache" in setup and steps > 1 and plain:
            one, plain_one = best.get((setup, batch, 1), {}), best.get((setup.split()[0], batch, 1), {})
            for name, label in (("generate_s", ""), ("cpu_s", " (CPU time)")):
                if all(name in r for r in (result, one, plain, plain_one)):
                    ratio = (result[name] - one[name]) / (plain[name] - plain_one[name])
                    lines.append(f"ours {setup} / plain, batch {batch}: {ratio:.2f}x per step{label} (target at most "
                                 f"0.60x): {'met' if ratio <= 0.60 else 'MISSED'}")
        if setup.endswith(LCM_TAESD) and plain and "generate_s" in plain:
            ratio = result["generate_s"] / plain["generate_s"]
            lines.append(f"ours {setup} / plain, batch {batch}: generate {ratio:.2f}x (target at most 0.10x): "
                         f"{'met' if ratio <= 0.10 else 'MISSED'}")
    return lines


def per_step_lines(rows: list[tuple[dict, dict]]) -> list[str]:
    """Seconds per sampling step of each setup: (generate at --steps - generate at 1 step) / (steps - 1), best
    of the repeats each, so that load, conversion, compilation, prompt encoding and the decode cancel."""
    best: dict[tuple, float] = {}
    for spec, result in rows:
        if result.get("generate_s") is not None and spec["side"] != "check" and not spec.get("fresh_cache"):
            key = (spec["side"], setup_name(spec), spec["batch"], spec["steps"])
            best[key] = min(best.get(key, float("inf")), result["generate_s"])
    lines, per_step = [], {}
    for (side, setup, batch, steps), seconds in best.items():
        if steps > 1 and (side, setup, batch, 1) in best:
            per_step[(side, setup, batch)] = (seconds - best[(side, setup, batch, 1)]) / (steps - 1)
    for (side, setup, batch), value in per_step.items():
        theirs = per_step.get(("diffusers", COUNTERPART.get(setup.split()[0], ""), batch))
        ratio = f", {value / theirs:.2f}x diffusers'" if side == "ours" and theirs else ""
        lines.append(f"{side} {setup}, batch {batch}: {value:.2f} s per step{ratio}")
    return lines


def ratio_lines(rows: list[tuple[dict, dict]]) -> list[str]:
    """ours / diffusers for each of our setups whose counterpart ran (below 1.0 means ours is better)."""
    best = best_results(rows)
    lines = []
    for (side, mode, batch), ours in best.items():
        if side != "ours" or "error" in ours:
            continue
        other_mode = COUNTERPART[mode.split()[0]]
        theirs = best.get(("diffusers", other_mode, batch))
        if not theirs or "error" in theirs or "skipped" in theirs:
            continue
        parts = []
        for label, key in (("generate", "generate_s"), ("total wall", "total_s"), ("peak RSS", "peak_rss"),
                           ("peak VRAM", "peak_vram_allocated")):
            if ours.get(key) and theirs.get(key):
                parts.append(f"{label} {ours[key] / theirs[key]:.2f}x")
        lines.append(f"ours {mode} / diffusers {other_mode}, batch {batch}: " + ", ".join(parts))
    return lines


# The project's targets (docs/benchmarks.md), batch 1: (our mode, compared with, on what, at most). "peak VRAM" is
# absolute (GiB).
TARGETS = (
    ("low", None, "peak VRAM", 0.40),
    ("low", ("ours", "full"), "generate", 1.5),
    ("medium", None, "peak VRAM", 1.75),
    ("medium", ("ours", "full"), "generate", 1.05),
    ("full", ("diffusers", "resident"), "generate", 1.0),
    ("full", ("diffusers", "resident"), "peak RSS", 1.0),
    # CPU at 512x512, 20 steps, fp32; and --quantize int8 (rows with --quantize int8)
    ("full", ("diffusers", "resident"), "generate", 0.85),
    ("full int8", ("ours", "full"), "peak RSS", 0.5),
    ("medium int8", None, "peak VRAM", 1.0),
)
FORWARD_ERROR_PERCENT = 1.0  # target: --quantize's UNet forward against fp32's, relative L2, at most this
_KEYS = {"generate": "generate_s", "peak RSS": "peak_rss", "peak VRAM": "peak_vram_allocated"}


def target_lines(rows: list[tuple[dict, dict]]) -> list[str]:
    """Each target whose measurements ran at batch 1: the figure, the limit, met or missed."""
    best = best_results(rows)
    lines = []
    for mode, other, what, limit in TARGETS:
        ours = best.get(("ours", mode, 1))
        key = _KEYS[what]
        if not ours or ours.get(key) is None:
            continue
        if other is None:
            value, text = ours[key] / GB, f"{ours[key] / GB:.2f} GiB"
            against = f"{limit} GiB"
        else:
            theirs = best.get((*other, 1))
            if not theirs or theirs.get(key) is None:
                continue
            value = ours[key] / theirs[key]
            text, against = f"{value:.2f}x {other[0] if other[0] == 'diffusers' else 'our'} {other[1]}", f"{limit}x"
        verdict = "met" if value <= limit else "MISSED"
        lines.append(f"ours {mode}, batch 1: {what} {text} (target at most {against}): {verdict}")
    for (side, mode, _), result in best.items():
        if side == "check" and result.get("forward_error") is not None:
            error = 100 * result["forward_error"]
            verdict = "met" if error <= FORWARD_ERROR_PERCENT else "MISSED"
            lines.append(f"{mode}: one UNet forward {error:.2f} % from fp32 (target at most "
                         f"{FORWARD_ERROR_PERCENT:g} %): {verdict}")
    return lines


def machine_line() -> str:
    import torch

    try:
        import diffusers

        diffusers_version = diffusers.__version__
    except ImportError:
        diffusers_version = "not installed"
    text = (f"{platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}, "
            f"diffusers {diffusers_version}, {cpu_line()}")
    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    return text


def cpu_line() -> str:
    """The CPU's model, its widest vector ISA (OpenVINO and oneDNN pick kernels by it) and the load average."""
    model, flags = platform.processor() or "?", set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:  # no /proc (not Linux): the model from platform, the ISA unknown
        pass
    isa = "avx512f" + (" + avx512_bf16" if "avx512_bf16" in flags else "") if "avx512f" in flags else (
        "avx2 only" if "avx2" in flags else "no avx2")
    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return f"{model} ({isa}; {kernels_line()}), load average {load}"


def kernels_line() -> str:
    """The kernels PyTorch's side runs: ATen's CPU capability and oneDNN's ISA cap, which
    ``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2`` lower to an AVX2-only CPU's on an AVX-512 one."""
    import torch

    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return f"ATen {torch.backends.cpu.get_cpu_capability()}" + (f", oneDNN max ISA {cap}" if cap else "")


def build_plan(args: argparse.Namespace) -> list[dict]:
    cuda = args.device.startswith("cuda")
    batches = args.batch or ([1, 4] if cuda else [1])
    modes = args.modes or (list(OUR_MODES) if cuda else ["full"])
    theirs = args.diffusers_modes or (list(DIFFUSERS_MODES) if cuda else ["resident"])
    common = dict(
        config=str(args.config), device=args.device, height=args.H or (512 if cuda else 256),
        width=args.W or (512 if cuda else 256), steps=args.steps or (20 if cuda else 10),
        sampler=args.sampler or ("dpm_solver" if cuda else "ddim"), fp16=cuda and not args.fp32,
        threads=args.threads, warmup=cuda, prompt=PROMPT, seed=args.seed, vram_budget=args.vram_budget,
    )
    variants = [("", [])]
    if args.quantize:
        variants.append((args.quantize, ["--quantize", args.quantize]))
    if args.tome:
        variants.append((f"tome {args.tome:g}", ["--tome", str(args.tome)]))
    openvino = ["--backend", "openvino", "--backend_cache", args.backend_cache] if args.backend == "openvino" else []
    if openvino:  # converted once into the cache by the "openvino convert" row, then read
        variants.append(("openvino", openvino))
    if args.deepcache:
        variants.append((f"deepcache {args.deepcache}", ["--deepcache", str(args.deepcache)]))
    if args.lcm_taesd:  # its own step count: no 1-step twin
        lcm = ["--sampler", "lcm", "--ddim_steps", str(LCM_STEPS), "--scale", "1", "--vae", args.lcm_taesd]
        variants.append((LCM_TAESD, lcm))
        if openvino:
            variants.append((f"openvino {LCM_TAESD}", openvino + lcm))
    plan = []
    if args.quantize:  # its forward error, in a process of its own (not inside a timed or RSS-measured run)
        plan.append(dict(common, side="check", mode=f"{args.quantize} error", batch=1, quantize=args.quantize))
    for batch in batches:
        if args.backend == "openvino":
            plan.append(dict(common, side="ours", mode="full", batch=batch, variant="openvino convert",
                             flags=openvino, fresh_cache=args.backend_cache))
        plan += [dict(common, side="ours", mode=m, batch=batch, variant=label, flags=flags)
                 for m in modes for label, flags in variants]
        if not args.skip_diffusers:
            plan += [dict(common, side="diffusers", mode=m, batch=batch) for m in theirs]
    if args.per_step:  # the same setups at 1 step, interleaved with the others
        plan += [dict(spec, steps=1, per_step_base=True) for spec in plan
                 if spec["side"] != "check" and not spec.get("fresh_cache")
                 and not spec.get("variant", "").endswith(LCM_TAESD)]
    return plan


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    parser.add_argument("--ckpt", default=None, help="checkpoint to use (default: random SD v1 weights in a temp file)")
    parser.add_argument("--config", default=str(REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"))
    parser.add_argument("--H", type=int, default=None, help="image height (default 256 on CPU, 512 on CUDA)")
    parser.add_argument("--W", type=int, default=None, help="image width (default 256 on CPU, 512 on CUDA)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default 10 on CPU, 20 on CUDA)")
    parser.add_argument("--sampler", choices=["ddim", "dpm_solver"], default=None,
                        help="ddim (CPU default) or dpm_solver (DPM-Solver++(2M), CUDA default)")
    parser.add_argument("--batch", type=int, action="append", help="batch size; repeat for several (default 1; 1 and 4 on CUDA)")
    parser.add_argument("--modes", nargs="+", choices=OUR_MODES + ("auto",), help="our --vram modes (default full on CPU, all on CUDA)")
    parser.add_argument("--diffusers_modes", nargs="+", choices=DIFFUSERS_MODES, help="diffusers setups (default resident on CPU, all on CUDA)")
    parser.add_argument("--skip_diffusers", action="store_true", help="measure only this project")
    parser.add_argument("--quantize", choices=["int8"], default=None, help="also run each of our modes with --quantize int8")
    parser.add_argument("--tome", type=float, default=None, metavar="RATIO", help="also run each of our modes with --tome RATIO")
    parser.add_argument("--vram_budget", type=float, default=None, metavar="GB", help="--vram_budget for our low mode")
    parser.add_argument("--backend", choices=["torch", "openvino"], default="torch",
                        help="openvino: also rows of our full mode with --backend openvino (a conversion row, then cache hits)")
    parser.add_argument("--backend_cache", default=None, help="--backend_cache of those rows (default: a temporary folder)")
    parser.add_argument("--deepcache", type=int, default=None, metavar="N", help="also run each of our modes with --deepcache N")
    parser.add_argument("--lcm_taesd", nargs="?", const="random", default=None, metavar="TAESD",
                        help="also run --sampler lcm, 4 steps, scale 1, with this TAESD as --vae (default: random weights)")
    parser.add_argument("--per_step", action="store_true",
                        help="also run every setup at 1 step and report seconds per step")
    parser.add_argument("--fp32", action="store_true", help="fp32 weights on CUDA too (default fp16 there)")
    parser.add_argument("--threads", type=int, default=min(os.cpu_count() or 1, 16), help="torch CPU threads per side")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed per measurement")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the whole plan this many times, interleaved; ratios use each setup's best time")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        return run_worker(json.loads(args.worker))
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')}  python scripts/benchmark.py {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"# {machine_line()}")
    with tempfile.TemporaryDirectory(prefix="sd-benchmark-") as tmp:
        if args.backend == "openvino" and args.backend_cache is None:
            args.backend_cache = str(Path(tmp) / "openvino-cache")
        if args.ckpt is None:
            started = time.time()
            args.ckpt = str(make_checkpoint(args.config, Path(tmp), args.seed))
            print(f"# random weights for {args.config} written in {time.time() - started:.0f} s")
        if args.lcm_taesd == "random":
            args.lcm_taesd = str(make_taesd(Path(tmp), args.seed))
        plan = build_plan(args)
        for spec in plan:
            spec["ckpt"] = str(Path(args.ckpt).resolve())
        first = plan[0]
        print(f"# {first['height']}x{first['width']}, {first['steps']} {first['sampler']} steps, "
              f"{'fp16' if first['fp16'] else 'fp32'}, {first['threads']} threads, device {first['device']}")
        print(HEADER)
        rows = []
        for _ in range(max(1, args.repeat)):  # interleaved, so load from other processes hits both sides alike
            for spec in plan:
                result = measure(spec, args.timeout)
                rows.append((spec, result))
                print(format_row(spec, result), flush=True)
    print("\nours / diffusers" + (f" (best of {args.repeat})" if args.repeat > 1 else "") + ":")
    for line in ratio_lines(rows):
        print(line)
    steps = per_step_lines(rows)
    if steps:
        print("\nper sampling step (best of the repeats):")
        print("\n".join(steps))
    speed = speed_lines(rows)
    if speed:
        print("\nfewer and lighter passes (ratios within this run):")
        print("\n".join(speed))
    print(f"# done; {cpu_line()}")
    targets = target_lines(rows)
    if targets:
        print("\ntargets:")
        print("\n".join(targets))
    if args.json:
        Path(args.json).write_text(json.dumps([{"spec": s, "result": r} for s, r in rows], indent=2))
    return 1 if any("error" in r for _, r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
