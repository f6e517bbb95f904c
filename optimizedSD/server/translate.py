"""A webui API request as the scripts' flags: the server runs exactly what ``optimized_txt2img.py`` /
``optimized_img2img.py`` / ``optimized_inpaint.py`` would run for the same settings (one parser, one set of checks,
:func:`optimizedSD.arguments.parse_args`), so a server image and a script image of the same settings are the same.

What the webui decides that the scripts leave to their flags is decided here, as AUTOMATIC1111's webui v1.10 does
(``modules/processing.py``, ``modules/api/api.py``): ``seed: -1`` draws from ``[0, 2**32 - 2]``; the sampler
comes from ``sampler_name`` or the old ``sampler_index``; ``randn_source`` "GPU" is CUDA's generator on a CUDA
device and the CPU's elsewhere (what ``torch.randn`` on the webui's device gives), "NV" always CUDA's;
img2img walks the webui's step rule (``int(min(strength, 0.999) * steps) + 1``); the grid has the webui's
automatic rows (``images.image_grid`` with ``n_rows = -1``) and comes first when there is more than one image.
"""

from __future__ import annotations

import logging
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ldm.errors import UsageError
from ldm.pipeline.request import IMG2IMG, INPAINT, TXT2IMG
from ldm.samplers import SAMPLERS, find_sampler
from ldm.samplers.schedules import SCHEDULES, find_schedule
from optimizedSD.infotext import parse_infotext
from optimizedSD.server.schemas import GenerationFields, Img2ImgRequest, Txt2ImgRequest

log = logging.getLogger(__name__)

SEED_LIMIT = 4294967294  # the webui's random.randrange bound
# The scripts' flags in their error messages, as the API's fields
FIELD_NAMES = {"--W": "width", "--H": "height", "--ddim_steps": "steps", "--n_samples": "batch_size",
               "--n_iter": "n_iter", "--scale": "cfg_scale", "--strength": "denoising_strength", "--seed": "seed",
               "--sampler": "sampler_name", "--schedule": "scheduler", "--subseed_strength": "subseed_strength",
               "--subseed": "subseed", "--clip_skip": "CLIP_stop_at_last_layers", "--ensd": "eta_noise_seed_delta",
               "--eta": "eta", "--ddim_eta": "eta_ddim", "--mask_blur": "mask_blur", "--init-img": "init_images",
               "--mask": "mask", "--prompt": "prompt", "--negative_prompt": "negative_prompt",
               "--seed_resize_from": "seed_resize_from_w/h", "--hires_scale": "hr_scale",
               "--hires_resize": "hr_resize_x/y", "--hires_steps": "hr_second_pass_steps",
               "--hires_strength": "denoising_strength", "--hires_upscaler": "hr_upscaler",
               "--hires_sampler": "hr_sampler_name", "--hires_schedule": "hr_scheduler",
               "--only_masked_padding": "inpaint_full_res_padding", "--control_model": "controlnet model",
               "--control_image": "controlnet image", "--control_weight": "controlnet weight",
               "--control_start": "controlnet guidance_start", "--control_end": "controlnet guidance_end",
               "--canny_low": "controlnet threshold_a", "--canny_high": "controlnet threshold_b",
               "--inpaint_area": "inpaint_full_res"}
MASKED_CONTENT = ("fill", "original", "latent_noise", "latent_nothing")  # inpainting_fill 0..3
SAME = (None, "", "Use same sampler", "Use same scheduler")  # the webui's "as the first pass" values


@dataclass(frozen=True)
class Resolved:
    """What the webui decides before a run: the seeds, the sampler and schedule, the mode."""

    mode: str
    seed: int
    subseed: int
    sampler: str  # this engine's name
    schedule: str


def api_message(message: str) -> str:
    """A scripts' error line with the API's field names for the flags it names."""
    return re.sub(r"--[A-Za-z_-]+", lambda m: FIELD_NAMES.get(m.group(0), m.group(0)), message)


def sampler_and_schedule(body: GenerationFields) -> tuple[str, str]:
    """``sampler_name`` (or ``sampler_index``) and ``scheduler`` in this engine's names; an unknown one is a
    :class:`UsageError` that lists the valid labels."""
    name = body.sampler_name or body.sampler_index
    found = find_sampler(name)
    if found is None:
        labels = ", ".join(record.label for record in SAMPLERS.values())
        raise UsageError(f"sampler_name {name!r} is not one of: {labels}")
    record, named = found
    schedule = find_schedule(body.scheduler or "automatic") or find_schedule((body.scheduler or "").lower())
    if schedule is None:
        labels = ", ".join(record.label for record in SCHEDULES.values())
        raise UsageError(f"scheduler {body.scheduler!r} is not one of: {labels}")
    if named is not None and schedule.name == "automatic":
        return record.name, named
    return record.name, schedule.name


def resolve(body: GenerationFields, img2img: bool) -> Resolved:
    """Seeds drawn where -1 (as the webui), sampler and schedule, and the mode (a mask makes it inpainting)."""
    sampler, schedule = sampler_and_schedule(body)
    seed = random.randrange(SEED_LIMIT) if body.seed == -1 else body.seed
    subseed = random.randrange(SEED_LIMIT) if body.subseed == -1 else body.subseed
    mode = TXT2IMG if not img2img else INPAINT if getattr(body, "mask", None) else IMG2IMG
    return Resolved(mode, seed, subseed, sampler, schedule)


def grid_columns(images: int) -> int:
    """The webui's automatic grid (``n_rows = -1``): rows = floor(sqrt(n)), lowered until they divide n."""
    rows = max(1, math.floor(math.sqrt(images)))
    while images % rows:
        rows -= 1
    return math.ceil(images / rows)


def rng_flag(randn_source: str, device: str) -> str:
    """``--rng`` for the webui's ``randn_source``: GPU noise is CUDA's on CUDA, the CPU generator's elsewhere."""
    if randn_source == "NV":
        return "gpu"
    if randn_source == "GPU":
        return "gpu" if device.startswith("cuda") else "cpu"
    return "cpu"


def generation_argv(body: GenerationFields, resolved: Resolved, options: dict[str, Any], device: str,
                    outdir: Path, init: Path | None = None, mask: Path | None = None) -> list[str]:
    """The scripts' flags for ``body`` (the server's model flags come before these)."""
    record = SAMPLERS[resolved.sampler]
    images = body.batch_size * body.n_iter
    argv = ["--prompt", body.prompt, "--negative_prompt", body.negative_prompt, "--prompt_syntax", "webui",
            "--seed", str(resolved.seed), "--subseed", str(resolved.subseed),
            "--subseed_strength", repr(body.subseed_strength), "--n_samples", str(body.batch_size),
            "--n_iter", str(body.n_iter), "--ddim_steps", str(body.steps), "--scale", repr(body.cfg_scale),
            "--W", str(body.width), "--H", str(body.height), "--sampler", resolved.sampler,
            "--schedule", resolved.schedule, "--format", "png", "--outdir", str(outdir),
            "--clip_skip", str(int(options.get("CLIP_stop_at_last_layers", 1))),
            "--ensd", str(int(options.get("eta_noise_seed_delta", 0))),
            "--rng", rng_flag(str(options.get("randn_source", "GPU")), device)]
    if body.seed_resize_from_w > 0 and body.seed_resize_from_h > 0:
        argv += ["--seed_resize_from", f"{body.seed_resize_from_w}x{body.seed_resize_from_h}"]
    eta = body.eta if body.eta is not None else options.get("eta_ancestral", 1.0)
    if "eta" in dict(record.options) and eta != 1:
        argv += ["--eta", repr(float(eta))]
    if record.takes_eta and options.get("eta_ddim", 0):
        argv += ["--ddim_eta", repr(float(options["eta_ddim"]))]
    if images > 1 and options.get("return_grid", True):
        argv += ["--n_rows", str(grid_columns(images))]
    else:
        argv.append("--skip_grid")
    if isinstance(body, Img2ImgRequest):
        argv += ["--init-img", str(init), "--strength", repr(body.denoising_strength), "--img2img_steps", "webui"]
        if mask is not None:
            argv += ["--mask", str(mask), "--mask_blur", repr(float(body.mask_blur))]
            argv += ["--invert_mask"] if body.inpainting_mask_invert else []
            argv += ["--inpaint_area", "only_masked" if body.inpaint_full_res else "whole", "--only_masked_padding",
                     str(body.inpaint_full_res_padding), "--masked_content", MASKED_CONTENT[body.inpainting_fill]]
    elif body.enable_hr:
        argv += hires_argv(body)
    return argv


def hires_argv(body: Txt2ImgRequest) -> list[str]:
    """The ``--hires_*`` flags of the webui's hires fields (``StableDiffusionProcessingTxt2Img``): a size from
    ``hr_resize_x/y`` when either is set, else ``hr_scale``; empty or "Use same ..." fields keep the first pass's."""
    if body.hr_resize_x or body.hr_resize_y:
        argv = ["--hires_resize", f"{body.hr_resize_x}x{body.hr_resize_y}"]
    else:
        argv = ["--hires_scale", repr(float(body.hr_scale))]
    strength = 0.7 if body.denoising_strength is None else body.denoising_strength
    argv += ["--hires_steps", str(body.hr_second_pass_steps), "--hires_strength", repr(float(strength)),
             "--hires_upscaler", body.hr_upscaler or "Latent"]
    argv += [] if body.hr_sampler_name in SAME else ["--hires_sampler", body.hr_sampler_name]
    argv += [] if body.hr_scheduler in SAME else ["--hires_schedule", body.hr_scheduler]
    argv += ["--hires_prompt", body.hr_prompt] if body.hr_prompt else []
    argv += ["--hires_negative_prompt", body.hr_negative_prompt] if body.hr_negative_prompt else []
    return argv


def info_json(body: GenerationFields, resolved: Resolved, infotexts: list[str], model: str,
              model_hash: str | None, options: dict[str, Any]) -> dict[str, Any]:
    """The webui's ``Processed.js()``: what the images were made with (``info`` of the response, as JSON)."""
    count = body.batch_size * body.n_iter
    vary = body.subseed_strength != 0
    seeds = [resolved.seed + (0 if vary else k) for k in range(count)]
    subseeds = [resolved.subseed + k for k in range(count)]
    return {
        "prompt": body.prompt, "all_prompts": [body.prompt] * count, "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [body.negative_prompt] * count, "seed": resolved.seed, "all_seeds": seeds,
        "subseed": resolved.subseed, "all_subseeds": subseeds, "subseed_strength": body.subseed_strength,
        "width": body.width, "height": body.height, "sampler_name": SAMPLERS[resolved.sampler].label,
        "scheduler": SCHEDULES[resolved.schedule].label, "cfg_scale": body.cfg_scale, "steps": body.steps,
        "batch_size": body.batch_size, "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": model, "sd_model_hash": model_hash, "sd_vae_name": None, "sd_vae_hash": None,
        "seed_resize_from_w": body.seed_resize_from_w, "seed_resize_from_h": body.seed_resize_from_h,
        "denoising_strength": getattr(body, "denoising_strength", None), "extra_generation_params": extension_params(infotexts),
        "index_of_first_image": 1 if count > 1 and options.get("return_grid", True) else 0,
        "infotexts": infotexts, "styles": [], "job_timestamp": "", "is_using_inpainting_conditioning": False,
        "clip_skip": int(options.get("CLIP_stop_at_last_layers", 1)), "version": "optimizedSD",
    }


def extension_params(infotexts: list[str]) -> dict[str, str]:
    """The fields an extension adds to ``p.extra_generation_params`` (sd-webui-controlnet: ``ControlNet 0``, ...),
    as the first image's infotext carries them."""
    if not infotexts:
        return {}
    fields = parse_infotext(infotexts[0]).fields
    return {key: value for key, value in fields.items() if re.fullmatch(r"ControlNet \d+", key)}
