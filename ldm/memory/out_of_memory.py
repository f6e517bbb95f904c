"""Out of memory: the one detector, and the two retry ladders of the generation loop.

A batch's sampling writes nothing, so when it runs out of device memory it can simply run again lower:
:func:`retry_lower` steps the :class:`ldm.memory.residency.Residency` down a memory mode (full -> medium -> low,
then low without its budget) and, after the lowest, switches attention to slices. A decode has its own
ladder (:func:`decode_with_retry`): in full mode the UNet and text encoder leave the device first
(medium); then 256 px tiles (their seams blend; a picture with slightly different GroupNorm statistics
beats no picture); then sliced attention for that decode only. Stepping the UNet further down would not
help a decode: medium and low both hold the VAE alone while it decodes.

Each try drops the failed try's traceback before the next: its frames hold the failed try's activations,
which must be freed before the device is emptied and the work runs again.
"""

from __future__ import annotations

import logging
from typing import Callable, TypeVar

import torch

from ldm.models.attention import get_attention_backend, set_attention_backend
from ldm.memory.vae_decoding import SMALL_TILE

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_out_of_memory(error: BaseException) -> bool:
    """Out of device or host memory: CUDA's error, Python's, or an allocator's RuntimeError."""
    if isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _slice_attention() -> bool:
    """The last resort when the lowest memory mode ran out: attention in query slices (only helps where the
    fused kernel falls back to building the whole score matrix). False if it is sliced already."""
    if get_attention_backend().name == "sliced":
        return False
    set_attention_backend("sliced")
    log.warning("out of device memory in the lowest mode: retrying with sliced attention")
    return True


def retry_lower(residency, attempt: Callable[[], T]) -> T:
    """Run ``attempt`` (one batch's sampling, which writes nothing); on out of memory drop to a lower memory
    mode (after the lowest, to sliced attention) and run it again."""
    while True:
        try:
            return attempt()
        except (RuntimeError, MemoryError) as error:
            if not is_out_of_memory(error):
                raise
            failure = error.with_traceback(None)
        if not residency.step_down() and not _slice_attention():
            raise failure
        del failure


def decode_with_retry(residency, decode: Callable[[bool, int | None], T], tiled: bool) -> T:
    """``decode(tiled, tile)`` (``tile`` None: the default size) with the decode's own ladder (module doc)."""
    tile, backend = None, get_attention_backend()
    try:
        while True:
            try:
                return decode(tiled, tile)
            except (RuntimeError, MemoryError) as error:
                if not is_out_of_memory(error):
                    raise
                failure = error.with_traceback(None)
            if residency.mode == "full":
                residency.step_down()
            elif tile != SMALL_TILE:
                tiled, tile = True, SMALL_TILE
                log.warning("out of device memory decoding: decoding in %d px tiles instead", SMALL_TILE * 8)
            elif get_attention_backend().name != "sliced":
                set_attention_backend("sliced")
                log.warning("out of device memory decoding in tiles: retrying with sliced attention")
            else:
                raise failure
            del failure
    finally:
        set_attention_backend(backend.name, backend.slice_size)
