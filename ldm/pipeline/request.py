"""What one run of a script is asked to do: :class:`GenerationRequest`, built and checked by
:func:`optimizedSD.arguments.parse_args`, read by :func:`optimizedSD.generation.generate`.

Frozen and typed: every flag has been checked and resolved (the device, the config path, a random seed
drawn, ``--turbo`` and ``--vram_budget`` folded into ``vram``) before the request exists, so the generation
stages read plain values and never an ``argparse.Namespace``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.control.units import ControlSpec

TXT2IMG = "txt2img"
IMG2IMG = "img2img"
INPAINT = "inpaint"
SIZE_MULTIPLE = 64  # H and W must be multiples of this (the UNet halves 8x8-downsampled latents 3 times)


@dataclass(frozen=True)
class MaskOptions:
    """Inpainting's mask: the file (white = repaint), ``--invert_mask``, ``--mask_blur`` px, overlay on/off."""

    path: Path
    invert: bool
    blur: float
    overlay: bool
    area: str = "whole"  # --inpaint_area: "whole" picture, or "only_masked": the mask's box, scaled to H x W
    padding: int = 32  # --only_masked_padding: px around the mask's box
    content: str = "original"  # --masked_content: original, fill, latent_noise, latent_nothing


@dataclass(frozen=True)
class HiresOptions:
    """txt2img's hires fix (:mod:`ldm.passes.hires`): the target (``scale``, or ``resize`` (W, H) with 0 for
    "keep the aspect"), the second pass's steps (0: the first pass's), denoising strength, upscaler, and the
    sampler, schedule and prompts of the second pass (None: the first pass's)."""

    scale: float = 2.0
    resize: tuple[int, int] | None = None
    steps: int = 0
    strength: float = 0.7
    upscaler: str = "latent"
    sampler: str | None = None
    schedule: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None


@dataclass(frozen=True)
class GenerationRequest:
    """One run: what to draw, how, from which model, and where the images go."""

    mode: str  # TXT2IMG, IMG2IMG or INPAINT
    # what to draw
    prompt: str
    negative_prompt: str
    from_file: Path | None  # prompts file, one a line (replaces ``prompt``)
    init_img: Path | None  # img2img, inpaint
    strength: float | None  # img2img, inpaint: how much of the init image to redo
    height: int | None  # None (img2img): the init image's, floored to a multiple of SIZE_MULTIPLE
    width: int | None
    prompt_syntax: str  # "fork" (sub-prompt weights) or "webui" (token emphasis), ldm/conditioning/prompts.py
    # how
    seed: int
    n_samples: int
    n_iter: int
    steps: int
    sampler: str
    eta: float
    scale: float
    fixed_code: bool
    # the model and the machine
    ckpt: Path  # a checkpoint file or a diffusers model folder
    vae: Path | None  # --vae: a VAE file or folder replacing the checkpoint's
    config: Path | None  # None: v1-inference.yaml, or v1-inpainting-inference.yaml for a 9-channel UNet
    use_ema: bool
    loras: tuple[tuple[Path, float], ...]  # --lora FILE[:WEIGHT], merged in this order right after loading
    lora_dir: Path  # where <lora:NAME> tags are looked up
    device: torch.device
    precision: str  # "autocast" (fp16 on CUDA) or "full"
    vram: str  # auto, full, medium or low
    vram_budget_bytes: int | None
    unet_bs: int | None
    attention: str  # auto, sdpa or sliced
    vae_tiling: bool
    embedding_cache: Path | None
    clip_skip: int  # 1: CLIP's last layer; N: the N-th last layer through the final layer norm
    embeddings_dir: Path  # textual-inversion embeddings, usable in prompts by file name
    embeddings_dir_given: bool  # the user named it: then it must exist
    tome: float  # token merging ratio, 0 (off) to 0.75
    quantize: str | None  # None or "int8": the UNet's weights
    # outputs
    outdir: Path
    image_format: str  # png or jpg
    skip_grid: bool
    skip_save: bool
    n_rows: int
    watermark: bool
    # --plan: answer how much GPU memory each memory mode needs, then exit (nothing is loaded)
    plan: bool = False
    plan_json: bool = False
    gpu_memory_bytes: int | None = None  # --gpu_memory: the card --vram auto is asked about in the plan
    safety_checker: Path | None = None  # a diffusers-format safety_checker folder; None: no check
    safety_checker_mode: str = "black"  # what a flagged image becomes: black, blur or warn
    mask: MaskOptions | None = None  # inpaint
    schedule: str = "automatic"  # --schedule: the sigma samplers' schedule type (ldm/samplers/schedules.py)
    img2img_steps: str = "cut"  # how --strength picks img2img's steps: "cut" (CompVis' t_enc) or "webui"
    # the webui's noise (ldm/samplers/noise.py): generator, variation seeds, seed resize, the samplers' eta, ENSD
    rng: str = "cpu"  # "cpu": a CPU generator per image; "gpu": CUDA's torch.randn computed on any device
    subseed: int = 0  # the variation seed of the first image (image k: subseed + k)
    subseed_strength: float = 0.0  # 0: no variation; with a strength every image shares the seed
    seed_resize_from: tuple[int, int] | None = None  # (width, height) px the seed's noise is drawn at
    eta_ancestral: float = 1.0  # --eta: noise amount of the ancestral and SDE samplers (the webui's Eta)
    ensd: int = 0  # eta noise seed delta: every draw after the start noise from seed + ensd
    control: tuple[ControlSpec, ...] = ()  # --control_model/--control_image pairs, in order (ldm/control)
    save_control_map: bool = False  # --save_control_map: each preprocessed map beside the images
    hires: HiresOptions | None = None  # txt2img: the hires fix's second pass (ldm/passes/hires.py)
    backend: str = "torch"  # --backend: the UNet's engine, "torch" or "openvino" (CPU; ldm/backends/)
    backend_cache: Path | None = None  # --backend_cache: converted models kept between runs; None: not kept
    deepcache: int = 0  # --deepcache N: the whole UNet every N steps, its shallow branch between (0: off)
    deepcache_branch: int = 0  # --deepcache_branch B: the shallow branch's depth (input_blocks.0 to B)
    preview_every: int = 0  # --preview_every N: write the running image every N steps (0: never)

    @property
    def img2img(self) -> bool:
        """Starts from an init image: img2img and inpainting."""
        return self.mode in (IMG2IMG, INPAINT)

    @property
    def inpaint(self) -> bool:
        return self.mode == INPAINT

    @property
    def guided(self) -> bool:
        """Classifier-free guidance runs (``scale == 1`` needs no unconditional pass)."""
        return self.scale != 1.0

    @property
    def dtype(self) -> torch.dtype:
        """``autocast`` means fp16 weights on CUDA (as the fork's ``model.half()``); fp32 on CPU and MPS. The
        ``meta`` device (the VRAM ledger's simulated run, ``--plan``) stands for the CUDA GPU it plans for."""
        return torch.float16 if self.precision == "autocast" and self.device.type in ("cuda", "meta") else torch.float32
