"""The model a server keeps between requests.

A checkpoint (with its VAE) is loaded once and kept in its memory mode; a request that names another one
releases the old model first (its device weights dropped, then every reference to the host copy, then a
collection), so host memory does not grow from switch to switch. LoRAs named in a prompt (``<lora:NAME:W>``)
are merged on a copy of the weights they touch, as :func:`ldm.loading.lora.merge_loras` always gives a weight
new storage: the holder keeps the original tensors and puts them back when the next request asks for another
LoRA set (the weights come back bit for bit, without reading the checkpoint again). The memory mode is set up
again around the changed weights. With ``--quantize`` the UNet's weights are int8 and a LoRA cannot be merged
into them afterwards: there a new LoRA set loads the checkpoint again.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm.loading.lora import LoraFile, load_lora, merge_loras
from ldm.loading.lora_layouts import lora_targets
from ldm.pipeline.model import LoadedModel, load_model, make_residency
from ldm.pipeline.request import GenerationRequest
from optimizedSD.generation import RunInputs

log = logging.getLogger(__name__)


@dataclass
class ModelHolder:
    """The kept model, what it was loaded from, and the LoRA set merged into it."""

    model: LoadedModel | None = None
    key: tuple = ()
    lora_key: tuple[tuple[Path, float], ...] = ()
    originals: list[tuple[torch.nn.Parameter, torch.Tensor]] = field(default_factory=list)
    loads: int = 0  # checkpoint loads so far

    def get(self, request: GenerationRequest, inputs: RunInputs) -> LoadedModel:
        """The model for ``request``: loaded when its checkpoint (or VAE) is not the kept one; its LoRAs merged."""
        loras = tuple((lora.path.resolve(), lora.weight) for lora in inputs.loras)
        key = (request.ckpt.resolve(), request.vae, loras if request.quantize else ())
        if self.model is None or key != self.key:
            self.release()
            log.info("loading %s", request.ckpt)
            self.model = load_model(request, inputs.config, list(loras) if request.quantize else [],
                                    inputs.height, inputs.width)
            self.key, self.lora_key, self.loads = key, loras if request.quantize else (), self.loads + 1
        if loras != self.lora_key:
            self.swap_loras(request, loras, inputs.height, inputs.width)
        return self.model

    def swap_loras(self, request: GenerationRequest, loras: tuple[tuple[Path, float], ...], height: int,
                   width: int) -> None:
        """Put the kept weights back, merge ``loras`` on copies, and set the memory mode up around them."""
        model = self.model
        model.residency.release()
        for parameter, original in self.originals:
            parameter.data = original
        self.originals, merged = [], []
        if loras:
            sd = model.sd
            targets = lora_targets(sd.unet, sd.text_encoder.transformer, sd.config.unet)
            merged = [(load_lora(path, targets), float(weight)) for path, weight in loras]
            self.originals = touched_weights(merged)
            merge_loras(merged)  # each touched weight gets new storage; the originals stay as they were
            log.info("merged %d LoRA file(s) into %d weights", len(merged), len(self.originals))
        model.loras = merged
        model.residency = make_residency(request, model.sd, height, width, model.safety)
        self.lora_key = loras

    def release(self) -> None:
        """Drop the kept model: device weights first, then the host copy."""
        if self.model is not None:
            self.model.residency.release()
            self.model, self.key, self.lora_key, self.originals = None, (), (), []
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


def touched_weights(loras: list[tuple[LoraFile, float]]) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(parameter, its tensor now) for every weight the LoRAs change, each once."""
    seen: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
    for lora, weight in loras:
        for change in lora.changes:
            parameter = change.target.module.weight
            seen.setdefault(id(parameter), (parameter, parameter.data))
    return list(seen.values())
