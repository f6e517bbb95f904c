"""What keys caches of things made from a checkpoint's weights (OpenVINO's converted UNet, ``--embedding_cache``'s
encodings): each part's tensors, sampled (:func:`ldm.checkpoints.hashes.sampled_fingerprint`), not the file's
first and last MB, which two checkpoints differing only in their VAE, most of their UNet or most of their text
encoder share. The file is memory-mapped and two pages a tensor read, once per file version in a process."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from ldm.checkpoints.hashes import sampled_fingerprint
from ldm.checkpoints.layout import EMA_PREFIX, UNET_PREFIX
from ldm.loading.stable_diffusion import read_model_weights


@dataclass(frozen=True)
class PartFingerprints:
    unet: str  # the UNet's tensors and their EMA copies
    text_encoder: str


def part_fingerprints(checkpoint: Path) -> PartFingerprints:
    """The fingerprints of a checkpoint file's (or diffusers folder's) parts; computed once per file version
    (path, size, modification time), so that a run's UNet cache and prompt cache, and a server's requests, share
    one read."""
    stat = checkpoint.stat()
    return _part_fingerprints(str(checkpoint.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _part_fingerprints(path: str, size: int, mtime_ns: int) -> PartFingerprints:
    state = read_model_weights(Path(path), unread_prefixes=("",))  # no NaN scan: only the samples are read
    return PartFingerprints(unet=sampled_fingerprint(state, (UNET_PREFIX, EMA_PREFIX)),
                            text_encoder=sampled_fingerprint(state, ("cond_stage_model.",)))
