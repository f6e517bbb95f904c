"""DeepCache: the UNet's deep features kept from one step and reused in the next ones (Ma, Fang & Wang 2024,
"DeepCache: Accelerating Diffusion Models for Free"; uniform skipping, as the authors' ``DeepCacheSDHelper``).

On a step whose index is a multiple of ``interval`` the whole UNet runs and the output of the deep branch is
kept; on the others only the shallow branch runs: the time embedding, ``input_blocks.0`` to ``input_blocks.B``,
``output_blocks.(11-B)`` to ``output_blocks.11`` and ``out`` (``B`` the branch, 0 to 11 for SD v1; the helper's
``cache_branch_id``: diffusers' down block ``B // 3``, layer ``B % 3``), the first of those output blocks fed
the kept feature and the fresh skip of ``input_blocks.B``. A "step" is a sampler step (one callback): a sampler
that calls the UNet twice in a step (Heun, DPM2, DPM++ 2S a, restart) runs both calls whole, or both shallow,
each shallow call reusing what the same call of the last whole step kept.

It is a part hook around the one that runs the parts (:data:`ldm.models.unet.PartHook`), so the UNet's forward
is unchanged, and in low mode the streamer (:class:`ldm.memory.streaming.StreamedUNet`) moves only the groups
of the parts that run. Only the entry feature is kept as data; the other skipped parts hand back zero-stride
stand-ins of the right shape, which nothing reads.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from ldm.errors import UsageError
from ldm.models.unet import PartHook, call_part
from ldm.memory.streaming import StreamedUNet


def shallow_parts(part_names: list[str], branch: int) -> frozenset[str]:
    """The parts a cached step runs, for a UNet whose :meth:`parts` are ``part_names``."""
    inputs = [n for n in part_names if n.startswith("input_blocks.")]
    outputs = [n for n in part_names if n.startswith("output_blocks.")]
    if not 0 <= branch < len(inputs) or len(inputs) != len(outputs):
        raise UsageError(f"--deepcache_branch must be between 0 and {len(inputs) - 1} for this UNet, got {branch}")
    deep = set(inputs[branch + 1:]) | {"middle_block"} | set(outputs[: len(outputs) - 1 - branch])
    return frozenset(n for n in part_names if n not in deep)


class DeepCache:
    """The cache of one sampling run: ``call_hook(inner, x)`` for each UNet call, ``next_step()`` after each step."""

    def __init__(self, part_names: list[str], interval: int, branch: int = 0):
        if interval < 1:
            raise ValueError(f"the DeepCache interval must be at least 1, got {interval}")
        self.interval = interval
        self.shallow = shallow_parts(part_names, branch)
        self.deep = frozenset(part_names) - self.shallow
        outputs = [n for n in part_names if n.startswith("output_blocks.")]
        self.entry = outputs[len(outputs) - 2 - branch] if branch < len(outputs) - 1 else "middle_block"
        self.step = 0
        self.calls = 0
        self.slots: list[tuple[torch.Size, dict[str, Tensor]]] = []  # per call of a step: input shape, outputs

    def next_step(self) -> None:
        self.step += 1
        self.calls = 0

    def call_hook(self, inner: PartHook, x: Tensor) -> tuple[PartHook, frozenset[str]]:
        """The hook for this call and the parts it skips (none on a whole step, or when nothing of this
        call's shape was kept)."""
        slot, self.calls = self.calls, self.calls + 1
        kept = self.slots[slot] if slot < len(self.slots) else None
        if self.step % self.interval == 0 or kept is None or kept[0] != x.shape:
            return self._keeping(inner, x, slot), frozenset()
        outputs = kept[1]

        def reuse(name: str, module: nn.Module, *args: Tensor) -> Tensor:
            return outputs[name] if name in self.deep else inner(name, module, *args)

        return reuse, self.deep

    def _keeping(self, inner: PartHook, x: Tensor, slot: int) -> PartHook:
        outputs: dict[str, Tensor] = {}
        if slot < len(self.slots):
            self.slots[slot] = (x.shape, outputs)
        else:
            self.slots.append((x.shape, outputs))

        def keep(name: str, module: nn.Module, *args: Tensor) -> Tensor:
            out = inner(name, module, *args)
            if name == self.entry:
                outputs[name] = out
            elif name in self.deep:  # a stand-in: its consumers are skipped too
                outputs[name] = out.new_zeros(()).expand(out.shape)
            return out

        return keep


def unet_deep_cache(unet, interval: int, branch: int = 0) -> DeepCache:
    """A fresh cache for one sampling run of ``unet`` (the model, or low mode's :class:`StreamedUNet`)."""
    model = unet.unet if isinstance(unet, StreamedUNet) else unet
    return DeepCache([name for name, _ in model.parts()], interval, branch)


def counting_steps(cache: DeepCache, callback: Callable | None) -> Callable:
    """The sampler's ``callback(step, total, x)`` that first tells ``cache`` a step is over."""

    def after_step(step: int, total: int, x: Tensor):
        cache.next_step()
        return None if callback is None else callback(step, total, x)

    return after_step


def deep_cached(unet: Callable, cache: DeepCache) -> Callable:
    """``unet(x, t, context[, chunk])`` running each call through ``cache``: the model with the cache's hook
    around :func:`call_part`, or low mode's :class:`StreamedUNet` with it around its streaming hook."""
    if isinstance(unet, StreamedUNet):
        def streamed(x: Tensor, t: Tensor, context: Tensor, chunk: int | None = None, control=None) -> Tensor:
            return unet(x, t, context, chunk, control=control, cache=cache)

        streamed.chunks_each_part = True  # --unet_bs inside the one streamed pass (chunked_unet)
        return streamed

    def call(x: Tensor, t: Tensor, context: Tensor, control=None) -> Tensor:
        hook, _ = cache.call_hook(call_part, x)  # control: a ControlNet's residuals, passed on (ldm/control)
        return unet(x, t, context, hook=hook, control=control)

    return call
