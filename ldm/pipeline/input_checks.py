"""Checks on what the user hands the scripts, each a one-line ``UsageError`` before anything slow runs.

- text from the command line: Python decodes ``argv`` with ``surrogateescape``, so invalid UTF-8 arrives
  as lone surrogates that fail later (in the tokenizer, the metadata, the folder name): refuse it here;
- input files (prompts files, init images): regular files under a size cap, so ``/dev/zero`` or a FIFO
  cannot hang or exhaust the run;
- init images: the size is read from the header before anything is decoded (a 13000x13000 PNG bomb is
  a few KB on disk), and 16-bit, 32-bit and float images are scaled into 8 bits instead of clipped
  (Pillow's ``convert("RGB")`` clips a 16-bit greyscale PNG to almost all white);
- numbers that reach the sampler: prompt weights, the guidance scale and the conditioning must be finite
  and of sane size (``a:1e300 b:-1e300`` overflows the weighted sum into NaN, a black image);
- folder names: cut to :data:`FOLDER_NAME_BYTES` UTF-8 bytes at a character boundary (file systems count
  bytes: 100 CJK characters are 300 bytes, 70 emoji 280).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ldm.conditioning.errors import PromptError
from ldm.messages import escaped
from ldm.regular_files import read_utf8_text, regular_file_size
from ldm.errors import UsageError

__all__ = [
    "check_text", "check_input_file", "read_text_file", "open_init_image", "to_rgb", "cut_to_bytes",
    "check_prompt_weights", "check_finite", "check_conditioning",
]

MAX_PROMPTS_FILE = 16 * 2**20  # bytes; 100,000 long prompts
MAX_IMAGE_FILE = 256 * 2**20
MAX_IMAGE_PIXELS = 8192 * 8192  # decoded RGB: 200 MB
MAX_IMAGE_SIDE = 16384
MAX_PROMPT_WEIGHT = 1000.0  # webui weights are ~0.1-2; 1e300 is an overflow, not an emphasis
FOLDER_NAME_BYTES = 200  # ext4/APFS/NTFS allow 255; leave room for "-1.png" style suffixes elsewhere


def check_text(text: str, flag: str) -> str:
    """``text`` if it is valid Unicode that encodes to UTF-8 (no lone surrogates from bad argv bytes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise UsageError(f"{flag} is not valid UTF-8 (byte {error.start} of the argument); "
                         "check the terminal's or file's encoding") from None
    return text


def check_input_file(path: str | os.PathLike, what: str, max_bytes: int) -> Path:
    """``path`` if it is a regular file of at most ``max_bytes`` (not a FIFO, device or directory)."""
    path = Path(path)
    shown = escaped(path, 200)
    size = regular_file_size(path, shown, what, UsageError)
    if size > max_bytes:
        raise UsageError(f"{what} {shown} is {size / 2**20:.0f} MiB (at most {max_bytes // 2**20} MiB)")
    return path


def read_text_file(path: str | os.PathLike, what: str, max_bytes: int = MAX_PROMPTS_FILE) -> str:
    """The UTF-8 text of a regular file under ``max_bytes`` (read with the cap, in case it grows)."""
    path = Path(path)
    return read_utf8_text(path, escaped(path, 200), what, UsageError, max_bytes)


def open_init_image(path: str | os.PathLike, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """The image as 8-bit RGB, its size checked from the header before decoding (see the module docstring)."""
    path = check_input_file(path, "init image", MAX_IMAGE_FILE)
    shown = escaped(path, 200)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is lower
            image = Image.open(path)  # reads the header only
        with image:
            width, height = image.size
            if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE or width * height > max_pixels:
                raise UsageError(f"init image {shown} is {width}x{height}; at most {MAX_IMAGE_SIDE} px a side "
                                 f"and {max_pixels / 1e6:.0f} megapixels (resize it first)")
            image.load()
            return to_rgb(ImageOps.exif_transpose(image))
    except UsageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError, MemoryError) as error:
        raise UsageError(f"cannot read init image {shown}: {escaped(error, 200)}") from None


def _scaled_to_8_bits(image: Image.Image) -> Image.Image:
    """Greyscale with more than 8 bits (I;16*, I, F) as 8-bit L, scaled by the range its mode implies."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        finite = values[np.isfinite(values)]
        top = float(finite.max()) if finite.size else 1.0
        full_scale = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0  # [0,1] floats are the usual case
        values = np.nan_to_num(values, nan=0.0, posinf=full_scale, neginf=0.0)
    else:  # 16-bit, or 32-bit integers holding 16-bit data (how Pillow opens most 16-bit PNGs)
        full_scale = 65535.0 if image.mode.startswith("I;16") or values.max(initial=0) <= 65535 else 2.0**32 - 1
    scaled = np.clip(np.rint(values / full_scale * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(scaled, mode="L")


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode as 8-bit RGB: high-bit-depth greyscale scaled (not clipped), transparency flattened."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        image = _scaled_to_8_bits(image)
    if image.mode in ("P", "PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")  # palette transparency survives only through RGBA
    return image.convert("RGB")


def cut_to_bytes(name: str, limit: int = FOLDER_NAME_BYTES) -> str:
    """The longest prefix of ``name`` whose UTF-8 encoding is at most ``limit`` bytes (never half a character)."""
    encoded = name.encode("utf-8")
    if len(encoded) <= limit:
        return name
    return encoded[:limit].decode("utf-8", errors="ignore")  # drops only a trailing partial character


def check_finite(value: float, flag: str, largest: float = 1e6) -> float:
    """A number the sampler can use: finite and of magnitude at most ``largest``."""
    if not math.isfinite(value) or abs(value) > largest:
        raise UsageError(f"{flag} must be a finite number of magnitude at most {largest:g}, got {value!r}")
    return value


def check_prompt_weights(weights: Iterable[float], prompt: str) -> None:
    """Each sub-prompt weight finite and at most :data:`MAX_PROMPT_WEIGHT`, and their sum usable."""
    weights = list(weights)
    for weight in weights:
        if not math.isfinite(weight) or abs(weight) > MAX_PROMPT_WEIGHT:
            raise UsageError(f"prompt weight {weight!r} in {escaped(prompt, 80)!r} is out of range "
                             f"(at most {MAX_PROMPT_WEIGHT:g} in magnitude)")
    if not math.isfinite(math.fsum(weights)):
        raise UsageError(f"the weights of {escaped(prompt, 80)!r} overflow when summed")


def check_conditioning(tensor, what: str) -> None:
    """Text-encoder output must be finite: NaN conditioning (a damaged cache entry, fp16 overflow) gives black images."""
    import torch

    if tensor.is_meta:  # a simulated run (the VRAM ledger) has no values to check
        return
    if not bool(torch.isfinite(tensor).all()):
        raise UsageError(f"the {what} conditioning has NaN or infinite values; try --precision full, "
                         "or delete the embedding cache entry")


def read_prompts_file(path: str | os.PathLike) -> list[str]:
    """One prompt a line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    raw = read_text_file(path, "prompts file")  # a regular file under a size cap: not /dev/zero, a FIFO, 1 GB
    prompts = [line.strip() for line in raw.splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise PromptError(f"prompts file {path} holds no prompts (blank lines and # comments are skipped)")
    return prompts
