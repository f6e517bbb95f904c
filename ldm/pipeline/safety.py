"""``--safety_checker DIR`` / ``--safety_checker_mode``: the generation stage that checks finished images.

Off unless the flag is given (no weights ship with this repository; README.md says where they come from).
The checker (:mod:`ldm.models.safety_checker`) is one more model under the run's :class:`~ldm.memory.residency.Residency`,
named ``safety_checker``: on the device only while it runs in medium and low mode, kept there with the others
in full mode, its weights counted like theirs. It sees each batch's images as 8-bit RGB after decoding, before
the watermark, as CompVis' ``check_safety`` and diffusers' ``run_safety_checker`` do.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ldm.models.safety_checker import ImagePreprocessor, SafetyChecker, SafetyVerdict, censor, check_images, load_safety_checker

log = logging.getLogger(__name__)

RESIDENCY_NAME = "safety_checker"
METADATA_KEY = "Safety checker"  # the infotext field of a flagged image: "flagged (black)" etc.


@dataclass
class SafetyStage:
    """The loaded checker and what to do with a flagged image."""

    checker: SafetyChecker
    preprocessor: ImagePreprocessor
    mode: str

    @classmethod
    def load(cls, directory: str | Path, mode: str, dtype: torch.dtype) -> SafetyStage:
        checker, preprocessor = load_safety_checker(directory, dtype)
        return cls(checker, preprocessor, mode)

    @property
    def weight_bytes(self) -> int:
        tensors = list(self.checker.parameters()) + list(self.checker.buffers())
        return sum(t.numel() * t.element_size() for t in tensors)

    def check(self, residency, images: list[np.ndarray]) -> list[tuple[np.ndarray, SafetyVerdict]]:
        """Each image as it is to be kept (censored when flagged, by the mode) with its verdict."""
        with residency.use(RESIDENCY_NAME) as checker, torch.no_grad():
            verdicts = check_images(checker, self.preprocessor, images)
        out = []
        for image, verdict in zip(images, verdicts):
            if verdict.flagged:
                image = censor(image, self.mode)
            out.append((image, verdict))
        if any(v.flagged for v in verdicts):
            log.warning("the safety checker flagged %d of %d images (%s)", sum(v.flagged for v in verdicts),
                        len(verdicts), {"black": "replaced by black images", "blur": "blurred", "warn": "kept as they are"}[self.mode])
        return out

    def metadata(self, verdict: SafetyVerdict) -> str | None:
        """The infotext value for an image: ``flagged (<mode>)``, or None for an image that passed."""
        return f"flagged ({self.mode})" if verdict.flagged else None
