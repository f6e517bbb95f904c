"""Where a ControlNet's weights are while it runs, by the run's memory mode (:mod:`ldm.memory.residency`).

- ``full``: on the device from its first step until the residency's ``release``, like the other models.
- ``medium`` and ``low``: on the device only while it runs, streamed block by block through
  :meth:`ControlNet.forward`'s part hook by the UNet's own streamer (:class:`ldm.memory.streaming.PartStreamer`):
  the next group copies while the current one computes, and the first group of the next step is copied while
  the UNet runs (the streamer wraps round), so the ControlNet's copies overlap the UNet's work. At most its
  two largest groups are on the device at once (a 1.1 ControlNet of SD v1 in fp16: 0.07 GiB of 0.67 GiB).

The groups are attached to the residency (:meth:`Residency.attach`), so its ``release``, its step down after
out of memory, pinning and the VRAM ledger's counting see them.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from ldm.control.network import ControlNet
from ldm.memory.module_groups import ModuleGroup
from ldm.memory.streaming import PartStreamer, plan_streaming
from ldm.models.unet import call_part


class ControlResidency(Protocol):
    """What the ControlNets need of :class:`~ldm.memory.residency.Residency`."""

    device: torch.device
    mode: str

    def onload(self, group: ModuleGroup, side_stream: bool = False) -> None: ...

    def offload(self, group: ModuleGroup) -> None: ...

    def attach(self, name: str, model: nn.Module, groups: list[ModuleGroup]) -> None: ...


def control_group_layout(net: ControlNet) -> list[list[str]]:
    """Part names per streamed group, in execution order: the time embedding, the hint encoder and the first
    conv together; then each input block with its zero conv; the middle block with its zero conv."""
    names = [name for name, _ in net.parts()]
    groups = [names[:4]]
    rest = names[4:]
    groups += [rest[i:i + 2] for i in range(0, len(rest), 2)]
    return groups


class PlacedControlNet:
    """One ControlNet under the residency: ``placed(x, hint, t, context) -> residuals`` on the device."""

    def __init__(self, residency: ControlResidency, net: ControlNet, name: str):
        self.residency = residency
        self.net = net
        home = "meta" if residency.device.type == "meta" else "cpu"
        self.layout = control_group_layout(net)
        parts = dict(net.parts())
        self.groups = [ModuleGroup(f"{name}." + "+".join(names), [parts[n] for n in names], home) for names in self.layout]
        residency.attach(name, net, self.groups)
        self._streamer: PartStreamer | None = None

    def __call__(self, x: torch.Tensor, hint: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> list[torch.Tensor]:
        if self.residency.mode == "full":
            for group in self.groups:
                if not group.on_device:
                    self.residency.onload(group)
            return self.net(x, hint, t, context, hook=call_part)
        if self._streamer is None:
            plan = plan_streaming([g.nbytes for g in self.groups], None)
            self._streamer = PartStreamer(self.residency, self.net.parts(), self.groups, self.layout, plan, wrap=True)
        return self.net(x, hint, t, context, hook=self._streamer.run_part)

    def release(self) -> None:
        """After the sampling: in medium and low mode nothing of it stays (the prefetched first group goes)."""
        if self._streamer is not None:
            self._streamer.release()
            self._streamer = None
