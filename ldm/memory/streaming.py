"""Low-VRAM streaming: a model's weights copied to the device group by group while its own forward runs.

A model that names its parts to a hook (``UNetModel.forward(..., hook)``, ``AutoencoderKL.decode(z, hook)``,
see :data:`ldm.models.unet.PartHook`) can run with only some of its weights on the device: :class:`PartStreamer`
is such a hook. Entering a group's first part: onload the group unless a prefetch already did (then wait
for that copy). Once its first part's kernels are queued: start copying the next streamed group (wrapping
to the next call when ``wrap``) if it fits the plan's memory limit, after waiting for the GPU to finish
the previously offloaded group. Leaving a group's last part: offload it unless the plan keeps it resident.

The model's forward is the one that runs: a change to the UNet or the VAE is made once, in the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ldm.memory.module_groups import ModuleGroup


class GroupMover(Protocol):
    """What a streamer needs of :class:`~ldm.memory.residency.Residency`: its device, and moving one group."""

    device: torch.device

    def onload(self, group: ModuleGroup, side_stream: bool = False) -> None: ...

    def offload(self, group: ModuleGroup) -> None: ...


@dataclass(frozen=True)
class StreamPlan:
    """Which groups stay on the device (``resident``), whether the next group is prefetched, and the
    most weight bytes on the device at once (resident groups + the streaming window)."""

    resident: frozenset[int]
    prefetch: bool
    limit_bytes: int


def plan_streaming(sizes: list[int], budget_bytes: int | None) -> StreamPlan:
    """Fit the groups (byte ``sizes`` in execution order) into ``budget_bytes`` of device memory.

    Streaming needs the running group and the next one at once (the two largest groups bound that);
    what the budget leaves beyond this window goes to groups kept resident for good, largest first,
    since each of those saves its copy at every step. ``None`` means the least memory: stream all.
    """
    if not sizes:
        raise ValueError("nothing to stream")
    total = sum(sizes)
    largest = sorted(sizes, reverse=True)
    window = largest[0] + (largest[1] if len(largest) > 1 else 0)
    if budget_bytes is None:
        return StreamPlan(frozenset(), True, window)
    if budget_bytes >= total:
        return StreamPlan(frozenset(range(len(sizes))), False, total)
    if budget_bytes < largest[0]:
        raise ValueError(
            f"vram budget {budget_bytes / 2**30:.2f} GB is smaller than the largest UNet group "
            f"({largest[0] / 2**30:.2f} GB); raise it or leave it unset"
        )
    prefetch = budget_bytes >= window
    room = budget_bytes - (window if prefetch else largest[0])
    resident = set()
    for index in sorted(range(len(sizes)), key=lambda i: -sizes[i]):
        if sizes[index] <= room:
            resident.add(index)
            room -= sizes[index]
    return StreamPlan(frozenset(resident), prefetch, budget_bytes - room)


def unet_group_layout(unet: nn.Module) -> list[list[str]]:
    """Part names per streamed UNet group, in execution order: one group per block; the small time
    embedding rides with ``input_blocks.0`` and ``out`` with the last output block (25 groups for SD v1)."""
    names = [name for name, _ in unet.parts()]
    groups = [[n] for n in names[1:-1]]
    groups[0].insert(0, names[0])
    groups[-1].append(names[-1])
    return groups


def decoder_group_layout(vae: nn.Module) -> list[list[str]]:
    """Part names per streamed VAE-decoder group: everything before the first upsampling level together
    (``post_quant_conv``, ``conv_in``, ``mid``), then one group per resolution level, the output
    convolution with the last. At the full-resolution level, where the decode's peak is, only that
    level's few weights are on the device (2.4 MB of SD v1's 99 MB decoder)."""
    groups: list[list[str]] = []
    current_level = None
    for name, _ in vae.decoder_parts():
        level = name.split(".")[2] if name.startswith("decoder.up.") else None
        if level is not None and level != current_level:
            groups.append([])
            current_level = level
        if not groups:
            groups.append([])
        groups[-1].append(name)
    return groups


class PartStreamer:
    """A :data:`ldm.models.unet.PartHook` that puts each group of parts on the device just before it runs.

    ``chunk`` (set per call by the adapters) runs each part on at most that many batch items at a time.
    """

    def __init__(
        self, residency: GroupMover, parts: list[tuple[str, nn.Module]], groups: list[ModuleGroup],
        layout: list[list[str]], plan: StreamPlan, wrap: bool = True,
    ):
        self.residency = residency
        self.groups = groups
        self.plan = plan
        self.modules = dict(parts)
        self.layout = layout
        self.first_part = {names[0]: index for index, names in enumerate(layout)}
        self.last_part = {names[-1]: index for index, names in enumerate(layout)}
        self.streamed = [i for i in range(len(groups)) if i not in plan.resident]
        self.chunk: int | None = None
        self.skipped: frozenset[str] = frozenset()  # parts this call does not run (DeepCache's cached steps)
        self._last_offload_done: torch.cuda.Event | None = None  # compute-stream point after the last offload
        # The streamed group to prefetch when group i starts: the next streamed one in execution order,
        # wrapping round to the first for the next call (the UNet's next step) when ``wrap``.
        after = (self.streamed[0] if self.streamed else None) if wrap else None
        self.next_streamed = {i: next((j for j in self.streamed if j > i), after) for i in range(len(groups))}

    def run_part(self, name: str, module: nn.Module, *args: torch.Tensor) -> torch.Tensor:
        self._enter(name)
        out = self._compute(module, args)
        self._prefetch_after(name)
        self._leave(name)
        return out

    def _compute(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        return in_chunks(module, self.chunk, *args)

    def _on_device_bytes(self) -> int:
        return sum(group.nbytes for group in self.groups if group.on_device)

    def _enter(self, part: str) -> None:
        index = self.first_part.get(part)
        if index is not None:
            group = self.groups[index]
            if not group.on_device:
                self.residency.onload(group)
            group.wait()

    def _prefetch_after(self, part: str) -> None:
        """Once the kernels of a group's first part are queued, start copying the next streamed group."""
        index = self.first_part.get(part)
        if index is None or not self.plan.prefetch:
            return
        following = self.next_streamed[index]
        while following is not None and following != index and self.layout[following][0] in self.skipped:
            following = self.next_streamed[following]  # a group this call skips is not worth its copy
        if following is None or following == index:
            return
        nxt = self.groups[following]
        if nxt.on_device or self._on_device_bytes() + nxt.nbytes > self.plan.limit_bytes:
            return
        # The host queues kernels far ahead of the GPU, and a streamed group's device memory is reusable only
        # once the kernels reading it have run: without this wait every step would leave copies pending and
        # the allocator would grow past the plan's window. The GPU still has this group's kernels queued.
        if self._last_offload_done is not None:
            self._last_offload_done.synchronize()
            self._last_offload_done = None
        self.residency.onload(nxt, side_stream=True)

    def _leave(self, part: str) -> None:
        index = self.last_part.get(part)
        if index is not None and index not in self.plan.resident:
            self.residency.offload(self.groups[index])
            device = self.residency.device
            if device.type == "cuda":
                self._last_offload_done = torch.cuda.Event()
                self._last_offload_done.record(torch.cuda.current_stream(device))

    def release(self) -> None:
        """Offload the streamed groups (a prefetched one included); resident groups stay."""
        for index in self.streamed:
            if self.groups[index].on_device:
                self.residency.offload(self.groups[index])
        self._last_offload_done = None


class StreamedUNet(PartStreamer):
    """``unet(x, t, context) -> eps`` with the UNet's weights streamed group by group through
    ``UNetModel.forward``'s part hook."""

    def __init__(self, residency: GroupMover, unet: nn.Module, groups: list[ModuleGroup], layout: list[list[str]], plan: StreamPlan):
        super().__init__(residency, unet.parts(), groups, layout, plan, wrap=True)
        self.unet = unet

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, chunk: int | None = None,
                 control: list[torch.Tensor] | None = None, cache=None) -> torch.Tensor:
        """One UNet evaluation; ``chunk`` (the fork's ``--unet_bs``) runs each part on at most that many
        latents at a time, all chunks through a group before the next group comes: one pass of weights per
        call whatever the chunk, where calling the UNet once per chunk would stream it once per chunk. What
        a chunk bounds is the attention and feed-forward memory of each block. ``cache``: a
        :class:`ldm.memory.deep_cache.DeepCache`, whose cached steps move only the groups they run."""
        if not x.shape[0] == timesteps.shape[0] == context.shape[0]:
            raise ValueError(f"batch sizes differ: x {x.shape[0]}, timesteps {timesteps.shape[0]}, context {context.shape[0]}")
        self.chunk = chunk
        hook = self.run_part
        if cache is not None:
            hook, self.skipped = cache.call_hook(self.run_part, x)
        try:
            return self.unet(x, timesteps, context, hook=hook, control=control)
        finally:
            self.chunk, self.skipped = None, frozenset()


class StreamedVAE(PartStreamer):
    """The VAE for decoding with its decoder streamed level by level (one pass per image, no prefetch):
    ``decode``, ``dtype``, ``config`` and ``fp32_copy`` as :class:`ldm.models.autoencoder.AutoencoderKL`'s."""

    def __init__(self, residency: GroupMover, vae: nn.Module, groups: list[ModuleGroup], layout: list[list[str]]):
        plan = StreamPlan(frozenset(), False, max(group.nbytes for group in groups))
        super().__init__(residency, vae.decoder_parts(), groups, layout, plan, wrap=False)
        self.vae = vae
        self.config = vae.config

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z, hook=self.run_part)

    def fp32_copy(self, device: torch.device) -> nn.Module:
        return self.vae.fp32_copy(device)


def chunked_unet(unet, chunk: int | None):
    """The fork's ``--unet_bs``: call the UNet on at most ``chunk`` latents at a time (the generation loop's
    and the VRAM ledger's UNet calls)."""
    if not chunk:
        return unet
    if isinstance(unet, StreamedUNet) or getattr(unet, "chunks_each_part", False):  # inside one streamed pass
        return lambda x, t, context: unet(x, t, context, chunk)

    return lambda x, t, context: in_chunks(unet, chunk, x, t, context)


def in_chunks(call, chunk: int | None, *rows: torch.Tensor) -> torch.Tensor:
    """``call(*rows)`` on at most ``chunk`` rows of each tensor at a time, the results concatenated (the fork's
    ``--unet_bs``: for the whole UNet, or inside low mode's streamed pass for each part)."""
    if not chunk or rows[0].shape[0] <= chunk:
        return call(*rows)
    return torch.cat([call(*(r[i : i + chunk] for r in rows)) for i in range(0, rows[0].shape[0], chunk)])
