"""The request bodies of AUTOMATIC1111's webui API v1.10 (``modules/api/models.py``) that this server honours.

The webui builds its models from ``StableDiffusionProcessingTxt2Img``'s fields; these are the fields that change
what this engine draws, with the webui's defaults (``sampler_index`` "Euler", 50 steps, CFG 7, 512 x 512).
Every other field a client sends (face restoration, ``alwayson_scripts`` of extensions) is accepted
(``extra="allow"``) and, where it asks for something, named in one warning line (:func:`ignored_fields`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# What the webui sends for fields this server does not act on, when they ask for nothing (no warning then).
IDLE_VALUES: dict[str, tuple[Any, ...]] = {
    "s_noise": (1, 1.0), "image_cfg_scale": (None, 1.5), "initial_noise_multiplier": (None, 1, 1.0),
    "resize_mode": (0,), "override_settings_restore_afterwards": (True,), "sampler_index": ("Euler", None, ""),
    "firstphase_width": (0,), "firstphase_height": (0,), "hr_checkpoint_name": (None, ""), "s_min_uncond": (0, 0.0), "s_tmax": (0, 0.0, None), "refiner_switch_at": (None, 0, 0.0),
    "force_task_id": (None, ""), "infotext": (None, ""),
}


class GenerationFields(BaseModel):
    """The fields txt2img and img2img share."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    seed: int = -1  # -1: random, as the webui (from [0, 2**32 - 2])
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1  # <= 0: off
    seed_resize_from_w: int = -1
    sampler_name: str | None = None  # a webui label ("DPM++ 2M", "Euler a") or this engine's name
    sampler_index: str = "Euler"  # the webui's old field, read when sampler_name is absent
    scheduler: str | None = None  # "Automatic", "Karras", ...; old labels ("DPM++ 2M Karras") name it too
    batch_size: int = Field(1, ge=1, le=64)
    n_iter: int = Field(1, ge=1, le=100)
    steps: int = Field(50, ge=1, le=1000)
    cfg_scale: float = 7.0
    width: int = Field(512, ge=64, le=8192)
    height: int = Field(512, ge=64, le=8192)
    eta: float | None = None  # the ancestral and SDE samplers' noise amount (the webui's Eta)
    override_settings: dict[str, Any] | None = None  # options for this request only (CLIP_stop_at_last_layers ...)
    send_images: bool = True
    save_images: bool = False


class Txt2ImgRequest(GenerationFields):
    """``POST /sdapi/v1/txt2img``, with the hires fix (``enable_hr``: ``--hires_*``, :mod:`ldm.passes.hires`)."""

    enable_hr: bool = False
    denoising_strength: float | None = Field(None, ge=0.0, le=1.0)  # the hires pass's; None: 0.7, the webui's UI
    hr_scale: float = 2.0
    hr_upscaler: str | None = None  # None: "Latent", the webui's default latent upscale mode
    hr_second_pass_steps: int = Field(0, ge=0, le=1000)  # 0: steps
    hr_resize_x: int = Field(0, ge=0, le=8192)  # either above 0: a size instead of hr_scale
    hr_resize_y: int = Field(0, ge=0, le=8192)
    hr_sampler_name: str | None = None  # None, "" or "Use same sampler": the first pass's
    hr_scheduler: str | None = None
    hr_prompt: str = ""  # "": the first pass's
    hr_negative_prompt: str = ""


class Img2ImgRequest(GenerationFields):
    """``POST /sdapi/v1/img2img``: the init image (base64 or a data URL) and, for inpainting, the mask."""

    init_images: list[str] = Field(..., min_length=1)
    denoising_strength: float = Field(0.75, ge=0.0, le=1.0)
    mask: str | None = None  # white repaints
    mask_blur: float = Field(4, ge=0, le=512)
    inpainting_mask_invert: int = Field(0, ge=0, le=1)  # 1: repaint the black part
    inpainting_fill: int = Field(0, ge=0, le=3)  # Masked content: fill, original, latent noise, latent nothing
    inpaint_full_res: bool = True  # Inpaint area "Only masked" (the webui's default in its API), else "Whole picture"
    inpaint_full_res_padding: int = Field(0, ge=0, le=4096)  # px around the mask's box
    include_init_images: bool = False


class PngInfoRequest(BaseModel):
    """``POST /sdapi/v1/png-info``."""

    image: str


def ignored_fields(body: BaseModel) -> list[str]:
    """The extra fields of ``body`` that ask for something this server does not do (a truthy value that is not
    the webui's idle default), for one warning line."""
    asked = []
    for name, value in (body.model_extra or {}).items():
        if name in IDLE_VALUES and value in IDLE_VALUES[name]:
            continue
        if name == "alwayson_scripts" and isinstance(value, dict):
            value = {key: args for key, args in value.items() if args not in ({}, {"args": []}, {"args": [False]})}
        if value not in (None, False, 0, "", [], {}):
            asked.append(name)
    return sorted(asked)
