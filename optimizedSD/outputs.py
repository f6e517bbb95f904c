"""What the scripts write: folder and file names, 8-bit conversion, metadata, grid, watermark.

- Files: ``<outdir>/<prompt folder>/seed_<seed>_<NNNNN>.<png|jpg>`` as the optimizedSD fork names them; the
  counter continues after the highest one already in the folder, and files are opened with exclusive create
  (``open(..., "xb")``) so nothing is ever overwritten, not even by a second run writing at the same time.
- 8-bit: images in [-1, 1] become ``round(255 * clamp((x + 1) / 2, 0, 1))`` as diffusers'
  ``VaeImageProcessor.postprocess`` does. CompVis truncates (``astype(uint8)``), which darkens by half a
  level on average; rounding is the unbiased choice and lets the tests compare against diffusers exactly.
- Metadata: PNGs carry a tEXt chunk ``parameters`` in AUTOMATIC1111's infotext format, so the usual tools
  (A1111's "PNG Info", civitai, ComfyUI importers) read them. JPEGs carry the same text as EXIF UserComment,
  of type UNDEFINED (``optimizedSD/infotext.py``: Pillow's default, BYTE, is unreadable to the webui). Grids
  carry the parameters of their first image.
- Model hash: A1111's current "shorthash" (AutoV2): the first 10 hex digits of the sha256 of the whole file.
  Hashing a 4 GB checkpoint costs a few seconds once per run; tools look models up by this hash.
- Grid: ``<outdir>/grid-NNNN.png``, ``n_rows`` images per row (torchvision ``make_grid``'s ``nrow``, which
  CompVis passes ``--n_rows`` to), 2 px black padding as ``make_grid`` has.
- Watermark: invisible-watermark's ``dwtDct`` with the bytes ``StableDiffusionV1``, as CompVis' txt2img.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from ldm.errors import UserError
from ldm.samplers import resolve_schedule, sampler_record
from optimizedSD.atomic_files import write_new_file
from ldm.pipeline.input_checks import cut_to_bytes
from ldm.pipeline.request import GenerationRequest
from ldm.samplers.grids import TimestepGrid
from ldm.samplers.schedules import SCHEDULES
from optimizedSD.infotext import user_comment_exif

log = logging.getLogger(__name__)

WATERMARK_TEXT = "StableDiffusionV1"
WATERMARK_MIN_SIZE = 256  # invisible-watermark refuses images under 256x256
FOLDER_NAME_MAX = 100
VERSION = "optimizedSD 0.1.0"  # the metadata's Version field (setup.py's version)

_WINDOWS_FORBIDDEN = re.compile(r'[<>:"/\\|?*\x00-\x1f]')
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_SAMPLE_NAME = re.compile(r"^seed_-?\d+_(\d+)\.[A-Za-z0-9]+$")
_GRID_NAME = re.compile(r"^grid-(\d+)\.[A-Za-z0-9]+$")


class OutputError(UserError, OSError):
    """The output folder cannot be used (reported to the user in one line)."""


def prompt_folder_name(prompt: str) -> str:
    """A folder name for ``prompt`` that is valid on Linux, macOS and Windows.

    Spaces and colons become ``_`` (the fork's ``"_".join(re.split(":| ", prompt))``), as do path separators
    and every character Windows refuses; trailing dots and spaces go (Windows drops them), reserved device
    names get a ``_`` prefix, an empty result becomes ``_``, and the name is cut to 100 characters.
    """
    name = _WINDOWS_FORBIDDEN.sub("_", prompt.replace(" ", "_"))
    name = cut_to_bytes(name[:FOLDER_NAME_MAX]).rstrip(". ")  # file systems count bytes: 100 CJK chars are 300
    if not name:
        return "_"
    if name.split(".")[0].upper() in _WINDOWS_RESERVED:
        name = "_" + name[: FOLDER_NAME_MAX - 1]  # "NUL.txt" is reserved too: change the part before the dot
    return name


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` in [-1, 1] -> ``[B, H, W, 3]`` uint8, rounded as diffusers does."""
    x = (images.detach().float().cpu() * 0.5 + 0.5).clamp(0, 1)
    x = x.permute(0, 2, 3, 1).numpy()
    return (x * 255).round().astype(np.uint8)


def _quote(value: object) -> str:
    """A1111's ``infotext_utils.quote``: JSON-quote a value holding a comma, newline or colon."""
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _number(value: float) -> str:
    """7.5 -> "7.5", 7.0 -> "7.0" (A1111 writes Python's float repr)."""
    return repr(float(value))


def infotext(
    prompt: str,
    negative_prompt: str,
    *,
    steps: int,
    sampler: str,
    scale: float,
    seed: int,
    width: int,
    height: int,
    model_hash: str | None,
    model_name: str | None = None,
    vae_hash: str | None = None,
    vae_name: str | None = None,
    strength: float | None = None,
    eta: float | None = None,
    lora_hashes: str | None = None,
    extra: Mapping[str, str] | None = None,
    token_merging_ratio: float | None = None,
    safety_checker: str | None = None,
    schedule: str = "automatic",
    noise: Mapping[str, object | None] | None = None,
    rng: str = "cpu",
) -> str:
    """Generation parameters in AUTOMATIC1111's format (``modules/processing.py::create_infotext``)::

        <prompt>  +  a line 'Negative prompt: <negative>' when there is one
        Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 27, Size: 512x512, Model hash: abcdef1234, ...

    ``Schedule type``: the schedule the sigma samplers walked, ``automatic`` resolved (the webui v1.10 writes
    ``Automatic`` where the sampler has no default: the Uniform grid); none for DDIM, PLMS and UniPC. ``RNG: CPU``,
    since the webui reads its absence as GPU noise; ``rng="gpu"`` writes ``RNG: NV``, the webui's name for the same
    Philox numbers computed off the GPU. ``noise``: :func:`noise_fields`. ``extra``: fields of the prompt encoding
    (``Clip skip``, ``TI hashes``, ``Pad conds``, ``Prompt syntax``). ``Version``: ``optimizedSD ...``.
    """
    record = sampler_record(sampler)
    params: dict[str, object | None] = {
        "Steps": steps,
        "Sampler": record.label,
        "Schedule type": None if isinstance(record.grid, TimestepGrid) else SCHEDULES[resolve_schedule(sampler, schedule)].label,
        "CFG scale": _number(scale),
        "Seed": seed,
        "Size": f"{width}x{height}",
        "Model hash": model_hash,
        "Model": model_name,
        "VAE hash": vae_hash,  # --vae: A1111's sd_vae.get_loaded_vae_hash (shorthash) and _name (file name)
        "VAE": vae_name,
        **(noise or {}),
        "Denoising strength": None if strength is None else _number(strength),
        "Eta DDIM": None if not eta else _number(eta),  # A1111's name for DDIM's eta ("Eta" is the k-samplers')
        "Token merging ratio": None if not token_merging_ratio else _number(token_merging_ratio),
        "Lora hashes": lora_hashes,  # the webui's Lora extension: "name: hash, name: hash" (ldm.loading.lora.lora_hashes_text)
        "Safety checker": safety_checker,  # "flagged (black)" etc. on images the checker flagged
        **(extra or {}),
        "RNG": "CPU" if rng == "cpu" else "NV",
        "Version": VERSION,  # last, as the webui's; --from_png tells this tool's images by it
    }
    params_text = ", ".join(f"{key}: {_quote(value)}" for key, value in params.items() if value is not None)
    negative_text = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative_text}\n{params_text}".strip()


def noise_fields(request: GenerationRequest, subseed: int | None) -> dict[str, object | None]:
    """The webui's fields for the noise settings, each only when it is not the default: ``Variation seed``
    (this image's), ``Variation seed strength``, ``Seed resize from``, ``Eta`` (samplers that take it) and
    ``ENSD`` (whenever not 0: here it also moves img2img's posterior draw, whatever the sampler)."""
    takes_eta = "eta" in dict(sampler_record(request.sampler).options)
    return {
        "Variation seed": subseed if request.subseed_strength else None,
        "Variation seed strength": _number(request.subseed_strength) if request.subseed_strength else None,
        "Seed resize from": None if request.seed_resize_from is None else "{}x{}".format(*request.seed_resize_from),
        "Eta": _number(request.eta_ancestral) if takes_eta and request.eta_ancestral != 1 else None,
        "ENSD": request.ensd or None,
    }


def make_grid(images: Sequence[np.ndarray], per_row: int, padding: int = 2) -> np.ndarray:
    """Tile ``[H, W, 3]`` uint8 images, ``per_row`` to a row, with black padding (torchvision ``make_grid``)."""
    if not images:
        raise ValueError("no images for a grid")
    height, width = images[0].shape[:2]
    cols = max(1, min(per_row, len(images)))
    rows = -(-len(images) // cols)
    grid = np.zeros((rows * (height + padding) + padding, cols * (width + padding) + padding, 3), np.uint8)
    for index, image in enumerate(images):
        row, col = divmod(index, cols)
        top, left = padding + row * (height + padding), padding + col * (width + padding)
        grid[top : top + height, left : left + width] = image
    return grid


class Watermarker:
    """invisible-watermark's DWT-DCT watermark with CompVis' payload; images under 256x256 are left as they are."""

    def __init__(self, text: str = WATERMARK_TEXT) -> None:
        from imwatermark import WatermarkEncoder

        self.encoder = WatermarkEncoder()
        self.encoder.set_watermark("bytes", text.encode("utf-8"))
        self._noted = False

    def __call__(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        if height < WATERMARK_MIN_SIZE or width < WATERMARK_MIN_SIZE:
            if not self._noted:
                log.warning("images under %dx%d are not watermarked (invisible-watermark refuses them)",
                            WATERMARK_MIN_SIZE, WATERMARK_MIN_SIZE)
                self._noted = True
            return image
        bgr = np.ascontiguousarray(image[:, :, ::-1])  # the library works on OpenCV's BGR order
        marked = self.encoder.encode(bgr, "dwtDct")
        return np.ascontiguousarray(marked[:, :, ::-1])


def read_watermark(image: np.ndarray, text: str = WATERMARK_TEXT) -> bytes:
    """Decode a DWT-DCT watermark of ``len(text)`` bytes from an RGB uint8 image."""
    from imwatermark import WatermarkDecoder

    decoder = WatermarkDecoder("bytes", 8 * len(text.encode("utf-8")))
    return decoder.decode(np.ascontiguousarray(image[:, :, ::-1]), "dwtDct")


def _encode_image(image: np.ndarray, fmt: str, text: str | None) -> tuple[Image.Image, dict]:
    pil = Image.fromarray(image)
    if fmt == "png":
        kwargs: dict = {"format": "PNG"}
        if text is not None:
            info = PngImagePlugin.PngInfo()
            info.add_text("parameters", text)
            kwargs["pnginfo"] = info
        return pil, kwargs
    kwargs = {"format": "JPEG", "quality": 95}
    if text is not None:
        try:  # EXIF UserComment of type UNDEFINED, as the webui's reader (piexif) needs it
            kwargs["exif"] = user_comment_exif(text)
        except ValueError as error:  # a prompt too long for one JPEG segment: the image without metadata
            log.warning("%s; written without it", error)
    return pil, kwargs


def _highest(folder: Path, pattern: re.Pattern) -> int:
    highest = -1
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return -1
    for name in names:
        match = pattern.match(name)
        if match:
            highest = max(highest, int(match.group(1)))
    return highest


def _write_exclusive(folder: Path, make_name, start: int, image: Image.Image, kwargs: dict) -> tuple[Path, int]:
    """Write to the first free ``make_name(n)`` with n >= start; exclusive create, so never overwrite."""
    index = start
    while True:
        path = folder / make_name(index)
        try:  # a temporary file linked to its final name once whole: never a partial file under a final name
            write_new_file(path, lambda handle: image.save(handle, **kwargs))
        except FileExistsError:
            index += 1
            continue
        except OSError as error:
            raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
        return path, index


@dataclass
class SampleWriter:
    """Writes the images of one run, each as soon as it is decoded."""

    outdir: Path
    fmt: str = "png"
    watermark: Watermarker | None = None

    def __post_init__(self) -> None:
        self.outdir = Path(self.outdir)
        self._next: dict[Path, int] = {}

    def prepare(self, folder_name: str) -> Path:
        """Create ``<outdir>/<folder_name>``; raises :class:`OutputError` when that is not possible."""
        folder = self.outdir / folder_name
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"cannot create output folder {folder}: {error.strerror or error}") from None
        if not os.access(folder, os.W_OK | os.X_OK):
            raise OutputError(f"output folder {folder} is not writable")
        return folder

    def postprocess(self, image: np.ndarray) -> np.ndarray:
        return self.watermark(image) if self.watermark is not None else image

    def next_number(self, folder_name: str) -> int:
        """One past the highest file number in the folder now (where this run's numbering starts)."""
        return _highest(self.outdir / folder_name, _SAMPLE_NAME) + 1

    def write_sample(self, folder_name: str, seed: int, image: np.ndarray, text: str | None, number: int | None = None) -> Path:
        """Watermark (if on) and write one ``[H, W, 3]`` uint8 image; returns its path. ``number``: the file
        number to use (torchrun ranks use a single process's); by default the next one in the folder."""
        folder = self.prepare(folder_name)
        if folder not in self._next:
            self._next[folder] = self.next_number(folder_name)
        pil, kwargs = _encode_image(self.postprocess(image), self.fmt, text)
        start = self._next[folder] if number is None else number
        path, index = _write_exclusive(folder, lambda n: f"seed_{seed}_{n:05}.{self.fmt}", start, pil, kwargs)
        self._next[folder] = max(self._next[folder], index + 1)
        return path

    def write_grid(self, images: Sequence[np.ndarray], per_row: int, text: str | None) -> Path:
        """Tile the (unwatermarked) images, watermark the grid as a whole (as CompVis does), write it."""
        grid = make_grid(images, per_row)
        self.prepare(".")
        pil, kwargs = _encode_image(self.postprocess(grid), "png", text)
        path, _ = _write_exclusive(self.outdir, lambda n: f"grid-{n:04}.png", _highest(self.outdir, _GRID_NAME) + 1, pil, kwargs)
        return path
