"""Command-line flags of ``optimized_txt2img.py`` / ``optimized_img2img.py`` / ``optimized_inpaint.py`` and their checks.

Names and defaults follow the optimizedSD fork (basujindal/stable-diffusion ``optimizedSD/optimized_*.py``)
where it has them: ``--n_samples 5``, ``--ddim_steps 50``, ``--scale 7.5``, ``--precision autocast``,
txt2img samples with PLMS and img2img with DDIM by default. Everything the user can get wrong is checked
here, before any model is loaded, and reported as a :class:`UsageError` (one line, exit code 2).
"""

from __future__ import annotations

import argparse
import logging
import math
import random
from pathlib import Path
from typing import Sequence

import torch

from ldm.checkpoints.hashes import model_hash
from ldm.config import DEFAULT_CONFIG
from ldm.errors import UsageError
from ldm.loading.lora import find_lora_file, lora_short_hash, parse_lora_argument
from ldm.loading.errors import LoraError
from ldm.models.safety_checker import MODES as SAFETY_MODES
from ldm.samplers import SAMPLER_NAMES as SAMPLERS
from ldm.samplers import SAMPLERS as SAMPLER_RECORDS
from ldm.samplers import IMG2IMG_STEPS, find_sampler
from ldm.samplers.schedules import SCHEDULE_NAMES, find_schedule
from ldm.conditioning.embeddings import embedding_file_hashes
from ldm.models.quantize import QUANTIZE_CHOICES
from ldm.models.token_matching import MAX_RATIO
from optimizedSD.from_png import FromPngError, restore_settings
from optimizedSD.infotext import parse_infotext, read_parameters
from optimizedSD.flags.control import add_control_flags, check_control_args, control_settings, restore_control
from optimizedSD.flags.noise import add_noise_flags, check_noise_args, noise_settings
from optimizedSD.flags.speed import add_speed_flags, check_speed_args, speed_settings
from optimizedSD.flags.inpaint_area import (INPAINT_AREA_DESTS, add_inpaint_area_flags, check_inpaint_area_args,
                                            mask_options)
from optimizedSD.flags.hires import HIRES_DESTS, add_hires_flags, check_hires_args, hires_options
from optimizedSD.flags.backend import add_backend_flags, backend_settings, check_backend_args
from ldm.pipeline.request import IMG2IMG, INPAINT, SIZE_MULTIPLE, GenerationRequest

log = logging.getLogger(__name__)

DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
DEFAULT_CONFIG_ARG = "configs/stable-diffusion/v1-inference.yaml"
DEFAULT_LORA_DIR = "models/lora"
DEFAULT_PROMPT = "a painting of a virus monster playing guitar"
DEFAULT_EMBEDDINGS_DIR = "models/embeddings"
PROMPT_SYNTAXES = ("fork", "webui")
VRAM_MODES = ("auto", "full", "medium", "low")
SEED_MAX = 1_000_000  # the fork draws random seeds from [0, 1e6]
MAX_SIDE = 8192  # px; beyond this a single latent no longer fits any GPU or this loop's tensors


class _Parser(argparse.ArgumentParser):
    """argparse that raises :class:`UsageError` instead of printing usage and exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


def _positive_multiple(name: str, value: int) -> None:
    if value <= 0 or value % SIZE_MULTIPLE:
        raise UsageError(f"--{name} must be a positive multiple of {SIZE_MULTIPLE}, got {value}")
    if value > MAX_SIDE:
        raise UsageError(f"--{name} must be at most {MAX_SIDE}, got {value}")


def build_parser(mode: str) -> argparse.ArgumentParser:
    """The flags of one script (``mode`` is ``"txt2img"``, ``"img2img"`` or ``"inpaint"``: img2img's and the mask's)."""
    img2img = mode in (IMG2IMG, INPAINT)
    parser = _Parser(
        prog=f"optimized_{mode}.py",
        description=(
            ("Repaint the masked part of an image from a text prompt" if mode == INPAINT else
             "Generate images from a text prompt" + (" and an initial image" if img2img else ""))
            + " with Stable Diffusion v1.x in little GPU memory. See docs/cli.md."
        ),
    )
    add = parser.add_argument
    add("--prompt", type=str, nargs="?", default=DEFAULT_PROMPT,
        help="the prompt to render; 'a:0.3 b:0.7' weights sub-prompts (docs/cli.md)")
    add("--negative_prompt", type=str, default="", help="what to steer away from (same weighting syntax)")
    add("--from-file", dest="from_file", type=str, default=None,
        help="read prompts from this file, one a line (blank lines and # comments skipped)")
    add("--outdir", type=str, nargs="?", default=f"outputs/{mode}-samples", help="dir to write results to")
    if img2img:
        add("--init-img", dest="init_img", type=str, default=None, help="path to the input image (required)")
        add("--strength", type=float, default=1.0 if mode == INPAINT else 0.75,
            help="how much of the init image to destroy: 0 keeps it (VAE round trip), 1 starts from pure noise")
        add("--img2img_steps", choices=IMG2IMG_STEPS, default="cut",
            help="how --strength picks the steps: cut runs the last int(strength*steps) (CompVis); webui the last "
                 "int(min(strength, 0.999)*steps)+1, starting one level higher (AUTOMATIC1111; --from_png sets it)")
    if mode == INPAINT:
        _add_mask_flags(add)
        add_inpaint_area_flags(add)
    if not img2img:
        add_hires_flags(add)
    add("--H", type=int, default=None if img2img else 512,
        help="image height in pixels, a multiple of 64" + (" (default: the init image's, floored to 64)" if img2img else ""))
    add("--W", type=int, default=None if img2img else 512,
        help="image width in pixels, a multiple of 64" + (" (default: the init image's, floored to 64)" if img2img else ""))
    add("--seed", type=int, default=None, help="seed of the first image; image k uses seed + k (random when absent)")
    add("--n_samples", type=int, default=5, help="images per prompt per iteration (the batch size)")
    add("--n_iter", type=int, default=1, help="how many times to sample each prompt")
    add("--ddim_steps", type=int, default=50, help="number of sampling steps")
    add("--ddim_eta", type=float, default=0.0, help="DDIM eta (0.0 is deterministic DDIM)")
    add_noise_flags(add)
    add_control_flags(add)
    add_speed_flags(add)
    add("--scale", type=float, default=7.5,
        help="classifier-free guidance scale: eps = eps(x, neg) + scale * (eps(x, cond) - eps(x, neg))")
    add("--sampler", type=str, default="ddim" if img2img else "plms",
        help="one of: " + ", ".join(SAMPLERS) + (" (default ddim)" if img2img else " (default plms)")
        + "; the webui's labels too (\"DPM++ 2M\", \"DPM++ 2M Karras\"); dpm_solver is dpmpp_2m")
    add("--schedule", type=str, default="automatic", metavar="NAME",
        help="the sigma samplers' schedule type: " + ", ".join(SCHEDULE_NAMES)
        + " (default automatic: the sampler's webui default, Karras for dpmpp_2m, dpmpp_2s_a, dpm2, dpm2_a)")
    add("--precision", type=str, choices=["full", "autocast"], default="autocast",
        help="autocast: fp16 weights on CUDA (fp32 elsewhere); full: fp32 everywhere")
    add("--device", type=str, default=None, help="cuda, cuda:N, mps or cpu (default: cuda, else mps, else cpu)")
    add("--ckpt", type=str, default=DEFAULT_CKPT,
        help="the SD v1 checkpoint: a .ckpt / .safetensors file or a diffusers model folder (model_index.json)")
    add("--vae", type=str, default=None, metavar="FILE",
        help="a VAE to use instead of the checkpoint's: .ckpt / .pt / .safetensors, or a diffusers VAE folder")
    add("--use_ema", action="store_true",
        help="sample with the file's EMA weights (model_ema.*) when it has them; by default the plain weights, "
             "as CompVis, diffusers and AUTOMATIC1111 do")
    add("--config", type=str, default=None, help=f"model config (default {DEFAULT_CONFIG_ARG})")
    add("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
        help="merge a LoRA / LoHa / LoKr file (kohya, webui or diffusers layout) at WEIGHT (default 1.0, may be "
             "negative) into the weights after loading: no extra VRAM or time per step; repeatable")
    add("--lora_dir", type=str, default=DEFAULT_LORA_DIR, metavar="DIR", help="where <lora:NAME> prompt tags are looked up")
    add("--format", type=str, choices=["png", "jpg"], default="png", help="output image format")
    add("--turbo", action="store_true", help="faster, about 1 GB more VRAM (the same as --vram medium)")
    add("--unet_bs", type=int, default=None,
        help="at most this many latents per UNet call (guided and unguided count separately); "
             "default: the whole batch in one call; 1 (the fork's default) needs the least memory")
    add("--fixed_code", action="store_true", help="every batch of the run starts from the first batch's noise (image k of a batch from seed + k)")
    add("--skip_grid", action="store_true", help="do not save a grid of the run")
    add("--skip_save", action="store_true", help="do not save individual images (for timing)")
    add("--n_rows", type=int, default=0, help="images per grid row (default, or 0: n_samples)")
    add("--no-watermark", dest="no_watermark", action="store_true",
        help="do not add the invisible 'StableDiffusionV1' watermark")
    add("--vram", type=str, choices=VRAM_MODES, default="auto",
        help="memory mode: full (everything resident), medium (one model at a time), low (UNet streamed)")
    add("--vram_budget", type=float, default=None, metavar="GB", help="GB of UNet weights the low mode may keep on the GPU at once (implies --vram low)")
    add("--attention", type=str, choices=["auto", "sdpa", "sliced"], default="auto",
        help="attention implementation: sdpa (fused), sliced (query slices), auto (sliced on MPS, else sdpa)")
    add("--vae_tiling", action="store_true", help="decode the VAE in overlapping tiles, and encode in tiles (the same result) (large images in little memory; automatic above 1024 px)")
    add("--embedding_cache", type=str, default=None, metavar="DIR",
        help="keep text encodings in DIR between runs (keyed by prompt and checkpoint)")
    add("--prompt_syntax", type=str, choices=PROMPT_SYNTAXES, default="fork",
        help="fork: 'a:0.3 b:0.7' weights sub-prompts; webui: AUTOMATIC1111's '(word:1.3)', '[word]', BREAK")
    add("--clip_skip", type=int, default=1, metavar="N",
        help="condition on the N-th last layer of the text encoder (1: the last; 2: the webui's 'Clip skip 2')")
    add("--embeddings_dir", type=str, default=None, metavar="DIR",
        help=f"textual-inversion embeddings (.pt, .bin, .safetensors), used in prompts by file name (default {DEFAULT_EMBEDDINGS_DIR})")
    add("--from_png", type=str, default=None, metavar="FILE",
        help="take prompt, negative prompt, seed, sampler, steps, CFG scale, size, clip skip, strength from the "
             "parameters of a PNG/JPEG written by this tool or the webui; flags given here win")
    add("--plan", action="store_true",
        help="print the simulated peak GPU memory of each --vram mode for this run and the mode auto picks, "
             "then exit (reads no checkpoint)")
    add("--json", action="store_true", help="with --plan: print one JSON object")
    add("--gpu_memory", type=float, default=None, metavar="GB",
        help="with --plan: the free GPU memory --vram auto is asked about (default: the detected GPU's)")
    add("--tome", type=float, default=0.0, metavar="RATIO",
        help="token merging: merge this share of the tokens before the UNet's full-resolution self-attention "
             "(0 to 0.75; 0.5 is tomesd's default; faster on large images, changes the image slightly)")
    add_backend_flags(add)
    add("--quantize", type=str, choices=list(QUANTIZE_CHOICES), default=None,
        help="int8: the UNet's weights as int8 with one scale per output channel (half fp16's memory, "
             "a quarter of fp32's; changes the image slightly)")
    add("--safety_checker", type=str, default=None, metavar="DIR",
        help="check every image with the diffusers-format safety checker in DIR (its safety_checker/ folder, or the "
             "pipeline folder holding it); off by default, no weights ship with this repository (README.md)")
    add("--safety_checker_mode", type=str, choices=SAFETY_MODES, default=None,
        help="what a flagged image becomes: black (default, as CompVis and diffusers), blur, or warn (kept, reported)")
    return parser


def _add_mask_flags(add) -> None:
    """optimized_inpaint.py's own flags (ldm/pipeline/masks.py reads the mask)."""
    add("--mask", type=str, default=None, help="the mask (required): white = repaint, black = keep; any image")
    add("--invert_mask", action="store_true", help="repaint the black part of the mask instead")
    add("--mask_blur", type=float, default=4, metavar="PX",
        help="Gaussian blur of the mask, standard deviation in pixels (the webui's Mask blur)")
    add("--no_overlay", action="store_true",
        help="return the decoded image as is (by default the kept pixels are laid back through the blurred mask)")


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def resolve_device(name: str | None) -> torch.device:
    """``--device``: cuda, cuda:N, mps or cpu; refused when that device is not there."""
    name = name or default_device()
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown --device {name!r} (use cuda, cuda:N, mps or cpu)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UsageError(f"--device {name}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise UsageError(f"unsupported --device {name!r} (use cuda, cuda:N, mps or cpu)")
    return device


def resolve_config(value: str | None) -> Path:
    """``--config``; without it the repo's v1-inference.yaml (found from any working directory)."""
    if value is not None:
        return Path(value)
    relative = Path(DEFAULT_CONFIG_ARG)
    return relative if relative.is_file() else DEFAULT_CONFIG


def parse_args(argv: Sequence[str] | None, mode: str) -> GenerationRequest:
    """Parse and check the flags into a :class:`GenerationRequest`: the seed drawn when absent, the device and
    config resolved, ``--turbo`` and ``--vram_budget`` folded into the memory mode."""
    parser = build_parser(mode)
    opt = parser.parse_args(argv)
    opt.mode = mode
    require_values(parser, opt)
    if opt.from_png:
        apply_from_png(opt, given_flags(mode, argv))
    check_args(opt)
    return GenerationRequest(
        mode=mode,
        prompt=opt.prompt, negative_prompt=opt.negative_prompt, prompt_syntax=opt.prompt_syntax,
        from_file=Path(opt.from_file) if opt.from_file else None,
        init_img=Path(opt.init_img) if mode in (IMG2IMG, INPAINT) else None,
        strength=opt.strength if mode in (IMG2IMG, INPAINT) else None,
        height=opt.H,
        width=opt.W,
        seed=random.randint(0, SEED_MAX) if opt.seed is None else opt.seed,
        n_samples=opt.n_samples,
        n_iter=opt.n_iter,
        steps=opt.ddim_steps,
        sampler=opt.sampler,
        schedule=opt.schedule,
        img2img_steps=opt.img2img_steps if mode in (IMG2IMG, INPAINT) else "cut",
        eta=opt.ddim_eta,
        scale=opt.scale,
        fixed_code=opt.fixed_code,
        ckpt=Path(opt.ckpt),
        vae=Path(opt.vae) if opt.vae else None,
        config=None if opt.config is None else resolve_config(opt.config),
        use_ema=opt.use_ema,
        loras=tuple((Path(path), weight) for path, weight in map(parse_lora_argument, opt.lora)),
        lora_dir=Path(opt.lora_dir),
        device=resolve_device(opt.device),
        precision=opt.precision,
        vram=resolve_vram(opt),
        vram_budget_bytes=None if opt.vram_budget is None else int(opt.vram_budget * 2**30),
        unet_bs=opt.unet_bs,
        attention=opt.attention,
        vae_tiling=opt.vae_tiling,
        embedding_cache=Path(opt.embedding_cache) if opt.embedding_cache else None,
        clip_skip=opt.clip_skip,
        embeddings_dir=Path(opt.embeddings_dir or DEFAULT_EMBEDDINGS_DIR),
        embeddings_dir_given=opt.embeddings_dir is not None,
        tome=opt.tome,
        quantize=opt.quantize,
        outdir=Path(opt.outdir),
        image_format=opt.format,
        skip_grid=opt.skip_grid,
        skip_save=opt.skip_save,
        n_rows=opt.n_rows or opt.n_samples,
        watermark=not opt.no_watermark,
        plan=opt.plan, plan_json=opt.json, gpu_memory_bytes=None if opt.gpu_memory is None else int(opt.gpu_memory * 2**30),
        safety_checker=Path(opt.safety_checker) if opt.safety_checker else None,
        safety_checker_mode=opt.safety_checker_mode or "black",
        mask=mask_options(opt) if mode == INPAINT else None,
        **noise_settings(opt), hires=hires_options(opt), **control_settings(opt), **backend_settings(opt),
        **speed_settings(opt),
    )


def given_flags(mode: str, argv: Sequence[str] | None) -> set[str]:
    """The destinations of the flags on the command line (abbreviations and ``--flag=value`` included)."""
    parser = build_parser(mode)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


# --from_png's settings (optimizedSD/from_png.py) -> flag destinations
_FROM_PNG_DESTS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "prompt_syntax": "prompt_syntax",
                   "steps": "ddim_steps", "sampler": "sampler", "scale": "scale", "seed": "seed", "width": "W",
                   "height": "H", "clip_skip": "clip_skip", "strength": "strength", "eta": "ddim_eta", "loras": "lora",
                   "schedule": "schedule", "img2img_steps": "img2img_steps", "rng": "rng", "eta_ancestral": "eta",
                   "ensd": "ensd", "subseed": "subseed", "subseed_strength": "subseed_strength",
                   "seed_resize_from": "seed_resize_from", **{d: d for d in (*HIRES_DESTS, *INPAINT_AREA_DESTS)},
                   "deepcache": "deepcache", "deepcache_branch": "deepcache_branch"}


def apply_from_png(opt: argparse.Namespace, given: set[str]) -> None:
    """``--from_png``: the image's parameters replace the defaults of the flags not given; what cannot be
    honoured is named in one warning line."""
    source = Path(opt.from_png)
    try:
        text = read_parameters(source)
    except (OSError, ValueError) as error:  # missing, not an image, damaged
        raise UsageError(f"--from_png {source}: cannot read it ({error})") from None
    if not text:
        raise UsageError(f"--from_png {source}: no generation parameters in it (PNG 'parameters' chunk or JPEG EXIF UserComment)")
    ckpt = Path(opt.ckpt)
    try:
        info, control = restore_control(opt, given, parse_infotext(text))  # ControlNet's entries, set here
        restored = restore_settings(
            info, img2img=opt.mode == IMG2IMG,
            sampler_labels={record.label: name for name, record in SAMPLER_RECORDS.items()},
            model_hash=model_hash(ckpt) if ckpt.is_file() else None,
            embedding_hashes=embedding_file_hashes(Path(opt.embeddings_dir or DEFAULT_EMBEDDINGS_DIR)),
            size_multiple=SIZE_MULTIPLE,
            find_lora=lambda name: lora_in_folder(name, Path(opt.lora_dir)),
        )
    except FromPngError as error:
        raise UsageError(str(error)) from None
    if "loras" in restored.values:  # as --lora FILE:WEIGHT
        restored.values["loras"] = [f"{path}:{weight!r}" for path, weight in restored.values["loras"]]
    for key, value in restored.values.items():
        dest = _FROM_PNG_DESTS[key]
        if dest not in given and hasattr(opt, dest):
            setattr(opt, dest, value)
    if restored.warning():
        log.warning("%s", restored.warning())


def lora_in_folder(name: str, folder: Path) -> tuple[str, str] | None:
    """The file ``<lora:NAME>`` means in ``folder`` and its short hash (webui "Lora hashes"), or None."""
    try:
        path = find_lora_file(name, folder)
    except LoraError:
        return None
    return str(path), lora_short_hash(path)


def resolve_vram(opt: argparse.Namespace) -> str:
    """``--vram``, with the fork's ``--turbo`` (medium: the UNet stays for all steps) and ``--vram_budget``
    (what low mode fits its streamed UNet into) folded in."""
    vram = "medium" if opt.turbo and opt.vram == "auto" else opt.vram
    if opt.vram_budget is None:
        return vram
    if vram == "auto":
        return "low"
    if vram != "low":
        raise UsageError(f"--vram_budget applies to --vram low, not {vram}" + (" (--turbo)" if opt.turbo else ""))
    return vram


def require_values(parser: argparse.ArgumentParser, opt: argparse.Namespace) -> None:
    """The fork declares some flags ``nargs="?"``: given bare (``--outdir`` at the end of a line) they hold None."""
    for action in parser._actions:
        if action.nargs == "?" and action.default is not None and getattr(opt, action.dest, None) is None:
            raise UsageError(f"{action.option_strings[0]} needs a value")


def sampler_and_schedule(sampler: str, schedule: str) -> tuple[str, str]:
    """``--sampler`` and ``--schedule`` in this tool's names; a webui label that names a schedule sets it."""
    found = find_sampler(sampler)
    if found is None:
        raise UsageError(f"unknown --sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)} or a webui label")
    record = find_schedule(schedule)
    if record is None:
        raise UsageError(f"unknown --schedule {schedule!r}; choose one of: {', '.join(SCHEDULE_NAMES)}")
    named = found[1]
    if named is not None and record.name not in ("automatic", named):
        raise UsageError(f"--sampler {sampler!r} names the {named} schedule; --schedule {schedule} contradicts it")
    return found[0].name, named or record.name


def check_args(opt: argparse.Namespace) -> None:
    """The checks that need no file: numbers in range, a known sampler and schedule (both then in this
    tool's names: ``"DPM++ 2M Karras"`` becomes ``dpmpp_2m`` on ``karras``)."""
    opt.sampler, opt.schedule = sampler_and_schedule(opt.sampler, opt.schedule)
    if opt.H is not None:
        _positive_multiple("H", opt.H)
    if opt.W is not None:
        _positive_multiple("W", opt.W)
    if opt.ddim_steps < 1:
        raise UsageError(f"--ddim_steps must be at least 1, got {opt.ddim_steps}")
    if opt.n_samples < 1:
        raise UsageError(f"--n_samples must be at least 1, got {opt.n_samples}")
    if opt.n_iter < 1:
        raise UsageError(f"--n_iter must be at least 1, got {opt.n_iter}")
    if opt.n_rows < 0:
        raise UsageError(f"--n_rows must be 0 (one row per batch) or more, got {opt.n_rows}")
    if opt.unet_bs is not None and opt.unet_bs < 1:
        raise UsageError(f"--unet_bs must be at least 1, got {opt.unet_bs}")
    if not 0 <= opt.ddim_eta <= 1:
        raise UsageError(f"--ddim_eta must be between 0 and 1, got {opt.ddim_eta}")
    if not math.isfinite(opt.scale):
        raise UsageError(f"--scale must be a finite number, got {opt.scale}")
    if opt.ddim_eta != 0 and opt.sampler != "ddim":
        raise UsageError(f"--ddim_eta applies only to --sampler ddim, not {opt.sampler}")
    check_noise_args(opt)
    check_control_args(opt)
    check_hires_args(opt)
    check_inpaint_area_args(opt)
    check_backend_args(opt, default_device())
    check_speed_args(opt)
    if opt.vram_budget is not None and not 0 < opt.vram_budget < 1e6:
        raise UsageError(f"--vram_budget must be a positive number of GB, got {opt.vram_budget}")
    for value in opt.lora:
        if not math.isfinite(parse_lora_argument(value)[1]):
            raise UsageError(f"--lora {value}: the weight must be a finite number")
    if opt.clip_skip < 1:
        raise UsageError(f"--clip_skip must be at least 1, got {opt.clip_skip}")
    if (opt.json or opt.gpu_memory is not None) and not opt.plan:
        raise UsageError("--json and --gpu_memory go with --plan")
    if opt.gpu_memory is not None and not 0 < opt.gpu_memory < 1e6:
        raise UsageError(f"--gpu_memory must be a positive number of GB, got {opt.gpu_memory}")
    if not 0 <= opt.tome <= MAX_RATIO:
        raise UsageError(f"--tome must be between 0 and {MAX_RATIO}, got {opt.tome}")
    if opt.seed is not None and not 0 <= opt.seed < 2**63:
        raise UsageError(f"--seed must be between 0 and 2**63 - 1, got {opt.seed}")
    if opt.mode == INPAINT:
        if not opt.mask:
            raise UsageError("--mask is required")
        if not 0 <= opt.mask_blur <= 512:
            raise UsageError(f"--mask_blur must be between 0 and 512 px, got {opt.mask_blur}")
    if opt.mode in (IMG2IMG, INPAINT):
        if not 0.0 <= opt.strength <= 1.0:
            raise UsageError(f"--strength must be between 0 and 1, got {opt.strength}")
        if not opt.init_img:
            raise UsageError("--init-img is required")
    if opt.safety_checker_mode is not None and opt.safety_checker is None:
        raise UsageError("--safety_checker_mode needs --safety_checker DIR (the checker is off without it)")
    if opt.from_file is None and opt.prompt is None:
        raise UsageError("give a --prompt or a --from-file")
