"""The UNet with its ControlNets: ``controlled(x, t, context) -> eps``, what the guidance adapter calls.

Each step, every ControlNet active at that step (:meth:`ControlUnit.active`) runs on the same latent, timestep
and text context as the UNet (both halves of guidance: diffusers' ``StableDiffusionControlNetPipeline`` without
guess mode, the webui extension's "Balanced"), its residuals are multiplied by its weight and summed over the
ControlNets (diffusers' ``MultiControlNetModel``), and the UNet adds them to its skips and middle block
(:meth:`ldm.models.unet.UNetModel.forward`'s ``control``). With none active the UNet runs alone: weight 0, or
outside ``[start, end]``, is the plain image exactly.

Steps are counted by the sampler's callback (:meth:`ControlledUNet.count_steps`): all the model calls of one
step (Heun's two, PLMS' warm-up) see the same step index, as diffusers' loop index.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ldm.control.units import ControlUnit

Callback = Callable[[int, int, torch.Tensor], "torch.Tensor | None"]


class ControlledUNet:
    """``unet`` (a UNetModel or low mode's StreamedUNet) steered by ``units``; ``steps``: the steps the sampler
    will run (the callback's own total replaces it once known)."""

    def __init__(self, unet, units: Sequence[ControlUnit], steps: int):
        self.unet = unet
        self.units = list(units)
        self.steps = steps
        self.step = 0
        self._hints: dict[int, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        residuals = None
        for index, unit in enumerate(self.units):
            if not unit.active(self.step, self.steps):
                continue
            net = unit.placed.net
            hint = self._device_hint(index, unit, x.device, net.dtype).expand(x.shape[0], -1, -1, -1)
            out = [r * unit.weight for r in unit.placed(x[:, :net.in_channels], hint, t, context)]
            residuals = out if residuals is None else [a + b for a, b in zip(residuals, out)]
        if residuals is None:
            return self.unet(x, t, context)
        return self.unet(x, t, context, control=residuals)

    def _device_hint(self, index: int, unit: ControlUnit, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        hint = self._hints.get(index)
        if hint is None or hint.device != device or hint.dtype != dtype:
            hint = self._hints[index] = unit.hint.to(device=device, dtype=dtype)
        return hint

    def count_steps(self, callback: Callback | None) -> Callback:
        """``callback`` after noting that a step is done (the next model calls belong to the next step)."""

        def counted(step: int, total: int, x: torch.Tensor):
            self.step = step + 1
            if total:
                self.steps = total
            return callback(step, total, x) if callback is not None else None

        return counted

    def release(self) -> None:
        """The ControlNets' streamed weights leave the device (medium and low mode); their hints too."""
        for unit in self.units:
            unit.placed.release()
        self._hints.clear()


def controlled_unet(unet, units: Sequence[ControlUnit], steps: int):
    """``unet`` itself when there is no ControlNet, else a :class:`ControlledUNet`."""
    return ControlledUNet(unet, units, steps) if units else unet
