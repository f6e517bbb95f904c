"""Which model is on the compute device when: the memory modes of the generator (``--vram``).

The three models (CLIP text encoder, UNet, VAE) live on the CPU (in page-locked, "pinned", slabs when
the device is CUDA and the mode moves weights during a run: medium and low) and are put on the device
only while they run. What moves is the tensor storage, never the modules: each :class:`ModuleGroup`
keeps the one CPU copy of its parameters and buffers and swaps ``tensor.data`` between it and a device
copy (the idea of diffusers' ``hooks/group_offloading.py`` ``ModuleGroup``, without its forward hooks:
nothing is patched or stored on a module, and every transfer is a call you can see in a traceback).

Modes, fastest first:

- ``full``: all three models stay on the device from their first use until :meth:`Residency.release`.
  Needs about 2.2 GB of weights in fp16 for SD v1 plus the working memory; no transfer after warm-up.
- ``medium``: one model on the device at a time (the optimizedSD fork's ``--turbo``). A model stays
  until another is asked for, so the UNet is copied once per batch and kept for all its steps.
  Peak = the largest model (the UNet, 1.7 GB in fp16) + working memory; costs a UNet copy per batch.
- ``low``: the text encoder and the VAE as in ``medium``; the UNet runs through :class:`StreamedUNet`,
  which walks the UNet's parts in execution order (time embedding, input blocks, middle block, output
  blocks, ``out``) at every step and copies each group of blocks in just before it runs. On CUDA the
  next group is copied on a side stream from pinned memory while the current one computes. With a
  budget (``budget_bytes``, the CLI's ``--vram_budget``), as many groups as fit stay on the device
  for good and only the rest are streamed. Peak = budget (or, without one, the two largest of the 25
  block groups: 0.35 GB of SD v1's 1.6 GB of fp16 UNet weights) + working memory; costs a copy of the
  streamed part of the UNet at every step.
- ``use("vae_encoder")`` (encoding an init image: img2img, inpainting): in medium and low mode only the VAE's
  encoder half (34 of SD v1's 84 M VAE parameters) goes to the device; in full mode the whole VAE.
- ``auto`` (:func:`resolve_mode`): picks one of the above from the free device memory, the image size
  and the batch; on a CPU it is ``full`` (nothing to save).

Every mode computes the same numbers: the same modules run the same kernels on the same device.

Out of memory: a caller that hits ``torch.cuda.OutOfMemoryError`` during a batch calls
:meth:`Residency.step_down` (or :func:`next_lower_mode` and :meth:`Residency.set_mode`), which empties
the device, and runs the batch again; ``step_down`` returns False when there is no lower mode left.

Transfers are reported to an optional ``on_transfer(TransferEvent)`` callback (event, group, bytes),
which the tests use to check the protocol without a GPU: with ``track_cpu_copies=True`` and a CPU
"device", every onload makes a real copy of the weights, so what is "on the device" can be observed.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import torch
from torch import nn

from ldm.out_of_memory import is_out_of_memory  # noqa: F401  (the one detector; re-exported for callers)

log = logging.getLogger(__name__)

MODES = ("full", "medium", "low")
VRAM_CHOICES = ("auto",) + MODES
MODEL_NAMES = ("text_encoder", "unet", "vae")
VAE_ENCODER = "vae_encoder"  # use(VAE_ENCODER): only the VAE's encoder half on the device (img2img, inpainting)
GRANULARITIES = ("blocks", "stages")

# SD v1 parameter counts (exact, tests/test_sd_v1_shapes.py), for estimates made before a model is loaded.
SD_V1_PARAMETERS = {"text_encoder": 123_060_480, "unet": 859_520_964, "vae": 83_653_863}


class TransferEvent(NamedTuple):
    """One transfer: ``event`` is "onload" or "offload", ``group`` e.g. "unet" or "unet.middle_block"."""

    event: str
    group: str
    nbytes: int


def next_lower_mode(mode: str) -> str | None:
    """The mode to retry a batch in after running out of device memory: full -> medium -> low -> None."""
    if mode not in MODES:
        raise ValueError(f"unknown vram mode {mode!r}; choose one of {', '.join(MODES)}")
    index = MODES.index(mode)
    return MODES[index + 1] if index + 1 < len(MODES) else None


def _tensors_of(modules: list[nn.Module]) -> list[torch.Tensor]:
    """The parameters and buffers of ``modules``, each once (a shared tensor is moved once)."""
    seen: set[int] = set()
    tensors = []
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                tensors.append(tensor)
    return tensors


class ModuleGroup:
    """Some modules whose parameters and buffers move together between their CPU home and a device.

    The CPU copy ("home") is the only one kept on the host; :meth:`onload` points every ``tensor.data``
    at a fresh device copy, :meth:`offload` points it back at the home copy and drops the device one.
    """

    def __init__(self, name: str, modules: list[nn.Module]):
        self.name = name
        self.tensors = _tensors_of(modules)
        for tensor in self.tensors:
            if tensor.device.type != "cpu":
                raise ValueError(f"{name}: models must be on the CPU when handed to Residency (found {tensor.device})")
        self.refresh_home()
        self.on_device = False
        self.ready: torch.cuda.Event | None = None  # set when the copy was issued on a side stream

    def refresh_home(self) -> None:
        """Take the tensors' current (CPU) storage as their home, e.g. after :func:`pin_together` moved it."""
        self.home = [tensor.data for tensor in self.tensors]
        self.nbytes = sum(home.numel() * home.element_size() for home in self.home)

    def onload(self, device: torch.device, copy: bool, stream: torch.cuda.Stream | None = None) -> None:
        """Point the tensors at device copies; on CUDA with ``stream``, copy there and record ``ready``.

        All or nothing: if a copy fails (out of memory halfway through), every tensor points back at its
        home copy before the error goes on, so no device copy is left behind unaccounted for.
        """
        try:
            self._copy_to(device, copy, stream)
        except BaseException:
            self.offload()
            raise
        self.on_device = True

    def _copy_to(self, device: torch.device, copy: bool, stream: torch.cuda.Stream | None) -> None:
        if device.type == "cuda" and stream is not None:
            with torch.cuda.stream(stream):
                for tensor, home in zip(self.tensors, self.home):
                    tensor.data = home.to(device, non_blocking=True)
                self.ready = torch.cuda.Event()
                self.ready.record(stream)
        elif device.type == "cpu":
            if copy:  # a stand-in device for tests: a real, separate copy
                for tensor, home in zip(self.tensors, self.home):
                    tensor.data = home.clone()
        else:
            for tensor, home in zip(self.tensors, self.home):
                tensor.data = home.to(device, non_blocking=home.is_pinned())

    def wait(self) -> None:
        """Make the current CUDA stream wait for a side-stream copy, and tell the allocator it uses it."""
        if self.ready is None or not self.tensors:
            return
        current = torch.cuda.current_stream(self.tensors[0].device)  # the group's device, not the current one
        current.wait_event(self.ready)
        for tensor in self.tensors:
            # The copy was allocated on the side stream: without this, freeing it at offload could let the
            # next prefetch reuse the memory while the compute stream still reads it.
            tensor.data.record_stream(current)
        self.ready = None

    def offload(self) -> None:
        for tensor, home in zip(self.tensors, self.home):
            tensor.data = home
        self.on_device = False
        self.ready = None


def _pinned_buffer(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


PIN_SLAB_BYTES = 256 << 20


def pin_together(
    tensors: list[torch.Tensor], allocate: Callable[[int], torch.Tensor] = _pinned_buffer, slab_bytes: int = PIN_SLAB_BYTES
) -> int:
    """Move the tensors' CPU storage into page-locked slabs; returns the bytes allocated.

    Pinned memory is what lets a host-to-device copy run on a side stream. PyTorch's pinned host allocator
    rounds every allocation up to a power of two (pinning each of SD v1's ~1,100 weights alone cost about a
    third more host memory), so the tensors are packed, largest first, into slabs of ``slab_bytes`` (a
    power of two). Each tensor's old storage is freed as it moves, if nothing else holds it: the host
    peak is the weights plus about one slab, not twice the weights. Tensors already pinned stay.
    """
    todo = sorted((t for t in tensors if not t.data.is_pinned()), key=lambda t: -t.numel() * t.element_size())
    slabs: list[list] = []  # [buffer, bytes used]
    allocated = 0
    for tensor in todo:
        nbytes = tensor.numel() * tensor.element_size()
        size = -(-nbytes // 64) * 64  # 64-byte aligned starts, so any dtype can view the bytes
        slab = next((slab for slab in slabs if slab[1] + size <= slab[0].numel()), None)
        if slab is None:
            capacity = max(slab_bytes, 1 << max(size - 1, 0).bit_length())
            slab = [allocate(capacity), 0]
            slabs.append(slab)
            allocated += capacity
        home = slab[0][slab[1] : slab[1] + nbytes].view(tensor.dtype).view(tensor.shape)
        home.copy_(tensor.data)
        tensor.data = home
        slab[1] += size
    return allocated


def unet_parts(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The UNet's parts in the order ``UNetModel.forward`` runs them (CompVis attribute paths)."""
    parts: list[tuple[str, nn.Module]] = [("time_embed", unet.time_embed)]
    parts += [(f"input_blocks.{i}", block) for i, block in enumerate(unet.input_blocks)]
    parts.append(("middle_block", unet.middle_block))
    parts += [(f"output_blocks.{i}", block) for i, block in enumerate(unet.output_blocks)]
    parts.append(("out", unet.out))
    return parts


def unet_group_layout(unet: nn.Module, granularity: str = "blocks") -> list[list[str]]:
    """Part names per streamed group, in execution order.

    ``stages``: three groups (time embedding + input blocks, middle block, output blocks + ``out``).
    ``blocks``: one group per block; the small time embedding rides with ``input_blocks.0`` and ``out``
    with the last output block (25 groups for SD v1).
    """
    names = [name for name, _ in unet_parts(unet)]
    if granularity == "stages":
        return [
            [n for n in names if n == "time_embed" or n.startswith("input_blocks.")],
            ["middle_block"],
            [n for n in names if n.startswith("output_blocks.") or n == "out"],
        ]
    if granularity == "blocks":
        groups = [[n] for n in names[1:-1]]
        groups[0].insert(0, "time_embed")
        groups[-1].append("out")
        return groups
    raise ValueError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}")


@dataclass(frozen=True)
class StreamPlan:
    """Which UNet groups stay on the device (``resident``), whether the next group is prefetched, and the
    most UNet weight bytes on the device at once (resident groups + the streaming window)."""

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


class StreamedUNet:
    """``unet(x, t, context) -> eps`` with the UNet's weights streamed to the device group by group.

    Replicates ``UNetModel.forward``'s dataflow over its parts (time embedding, input blocks with their
    skips, middle block, output blocks concatenating the skips, ``out``). Entering a group: onload it
    unless a prefetch already did (then wait for that copy). Once its first part's kernels are queued:
    start copying the next streamed group (wrapping to the next step) if it fits the plan's memory limit,
    after waiting for the GPU to finish the previously offloaded group. Leaving a group's last part:
    offload it unless the plan keeps it resident.
    """

    def __init__(self, residency: Residency, unet: nn.Module, groups: list[ModuleGroup], layout: list[list[str]], plan: StreamPlan):
        self.residency = residency
        self.unet = unet
        self.groups = groups
        self.plan = plan
        self.modules = dict(unet_parts(unet))
        self.first_part = {names[0]: index for index, names in enumerate(layout)}
        self.last_part = {names[-1]: index for index, names in enumerate(layout)}
        self.streamed = [i for i in range(len(groups)) if i not in plan.resident]
        self._last_offload_done: torch.cuda.Event | None = None  # compute-stream point after the last offload
        # The streamed group to prefetch when group i starts: the next streamed one in execution order.
        self.next_streamed = {
            i: next((j for j in self.streamed if j > i), self.streamed[0] if self.streamed else None)
            for i in range(len(groups))
        }

    def _on_device_bytes(self) -> int:
        return sum(group.nbytes for group in self.groups if group.on_device)

    def _enter(self, part: str) -> nn.Module:
        index = self.first_part.get(part)
        if index is not None:
            group = self.groups[index]
            if not group.on_device:
                self.residency._onload(group)
            group.wait()
        return self.modules[part]

    def _prefetch_after(self, part: str) -> None:
        """Once the kernels of a group's first part are queued, start copying the next streamed group."""
        index = self.first_part.get(part)
        if index is None or not self.plan.prefetch:
            return
        following = self.next_streamed[index]
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
        self.residency._onload(nxt, side_stream=True)

    def _leave(self, part: str) -> None:
        index = self.last_part.get(part)
        if index is not None and index not in self.plan.resident:
            self.residency._offload(self.groups[index])
            device = self.residency.device
            if device.type == "cuda":
                self._last_offload_done = torch.cuda.Event()
                self._last_offload_done.record(torch.cuda.current_stream(device))

    def _run(self, part: str, fn: Callable[[nn.Module], list[torch.Tensor]]) -> list[torch.Tensor]:
        module = self._enter(part)
        result = fn(module)
        self._prefetch_after(part)
        self._leave(part)
        return result

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """One UNet evaluation; ``chunk`` (the fork's ``--unet_bs``) runs each part on at most that many
        latents at a time, all chunks through a group before the next group comes: one pass of weights per
        call whatever the chunk, where calling the UNet once per chunk would stream it once per chunk. The
        chunks' skip connections are all alive at once (about 17 MB per 512 px latent in fp16); what a
        chunk bounds is the attention and feed-forward memory of each block."""
        from ldm.unet import timestep_embedding

        unet = self.unet
        dtype = unet.out[2].weight.dtype
        if not x.shape[0] == timesteps.shape[0] == context.shape[0]:
            raise ValueError(f"batch sizes differ: x {x.shape[0]}, timesteps {timesteps.shape[0]}, context {context.shape[0]}")
        size = chunk or x.shape[0]
        pieces = [slice(i, i + size) for i in range(0, x.shape[0], size)]
        t_emb = [timestep_embedding(timesteps[p], unet.model_channels).to(dtype) for p in pieces]
        emb = self._run("time_embed", lambda m: [m(e) for e in t_emb])
        h = [x[p].to(dtype) for p in pieces]
        ctx = [context[p].to(dtype) for p in pieces]
        skips = []
        for i in range(len(unet.input_blocks)):
            h = self._run(f"input_blocks.{i}", lambda m: [m(*args) for args in zip(h, emb, ctx)])
            skips.append(h)
        h = self._run("middle_block", lambda m: [m(*args) for args in zip(h, emb, ctx)])
        for i in range(len(unet.output_blocks)):
            skip = skips.pop()
            h = self._run(
                f"output_blocks.{i}",
                lambda m: [m(torch.cat([hc, sc], dim=1), ec, cc) for hc, sc, ec, cc in zip(h, skip, emb, ctx)],
            )
        return torch.cat(self._run("out", lambda m: [m(hc) for hc in h])).to(x.dtype)

    def release(self) -> None:
        """Offload the streamed groups (a prefetched one included); resident groups stay."""
        for index in self.streamed:
            if self.groups[index].on_device:
                self.residency._offload(self.groups[index])
        self._last_offload_done = None


class Residency:
    """Keeps ``sd``'s three models on the CPU and puts each on ``device`` only while it runs.

    ``with residency.use(name) as model:`` yields the module on the device (for "unet" in low mode, a
    :class:`StreamedUNet`); :meth:`release` leaves nothing on the device. ``budget_bytes`` (low mode)
    is the UNet weight memory allowed on the device at once. ``track_cpu_copies`` makes onloads to a
    CPU device real copies (a stand-in device for tests); otherwise a CPU device moves nothing. ``pin``
    (default: on CUDA) puts the CPU copies in pinned memory once the mode is medium or low.
    """

    def __init__(
        self,
        sd,
        device: torch.device | str,
        mode: str = "full",
        budget_bytes: int | None = None,
        *,
        granularity: str = "blocks",
        on_transfer: Callable[[TransferEvent], None] | None = None,
        track_cpu_copies: bool = False,
        pin: bool | None = None,
    ):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.models: dict[str, nn.Module] = {"text_encoder": sd.text_encoder, "unet": sd.unet, "vae": sd.vae}
        self.on_transfer = on_transfer
        self.track_cpu_copies = track_cpu_copies
        # Pinned homes pay off only where weights move during a run (medium, low): pinned lazily.
        self.pin = self.device.type == "cuda" if pin is None else pin
        self.pinned_bytes = 0
        self.whole = {name: ModuleGroup(name, [model]) for name, model in self.models.items()}
        # Encoding an image needs no decoder weights: outside full mode the encoder half moves on its own.
        self.whole[VAE_ENCODER] = ModuleGroup(VAE_ENCODER, [sd.vae.encoder, sd.vae.quant_conv])
        self.layout = unet_group_layout(sd.unet, granularity)
        parts = dict(unet_parts(sd.unet))
        self.unet_groups = [
            ModuleGroup("unet." + "+".join(names), [parts[n] for n in names]) for names in self.layout
        ]
        covered = {id(t) for group in self.unet_groups for t in group.tensors}
        stray = [n for n, t in list(sd.unet.named_parameters()) + list(sd.unet.named_buffers()) if id(t) not in covered]
        if stray:
            raise ValueError(f"UNet tensors outside the streamed parts: {', '.join(stray[:5])}")
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._streamed: StreamedUNet | None = None
        self.resident_bytes = 0
        self.peak_resident_bytes = 0
        self.mode = ""
        self.budget_bytes: int | None = None
        self.set_mode(mode, budget_bytes)

    # -- modes ------------------------------------------------------------------------------------------
    def set_mode(self, mode: str, budget_bytes: int | None = None) -> None:
        """Switch mode (after emptying the device); ``budget_bytes`` applies to low mode."""
        if mode not in MODES:
            raise ValueError(f"unknown vram mode {mode!r}; choose one of {', '.join(MODES)} (resolve 'auto' first)")
        if budget_bytes is not None and budget_bytes <= 0:
            raise ValueError("vram budget must be positive")
        self.release()
        if mode != "full" and self.pin and not self.pinned_bytes:
            self._pin_homes()
        self.plan = plan_streaming([g.nbytes for g in self.unet_groups], budget_bytes) if mode == "low" else None
        self.mode, self.budget_bytes = mode, budget_bytes
        if self.plan is not None:
            log.info(
                "low vram: %d of %d UNet groups resident, prefetch %s, at most %.2f GB of UNet weights on the device",
                len(self.plan.resident), len(self.unet_groups), "on" if self.plan.prefetch else "off",
                self.plan.limit_bytes / 2**30,
            )

    def step_down(self) -> bool:
        """After an out-of-memory error: empty the device and go one mode lower. False if none is left.

        Low mode with a budget first drops the budget (streams everything) before giving up.
        """
        lower = next_lower_mode(self.mode)
        if lower is None and self.budget_bytes is None:
            return False
        self.set_mode(lower or "low", None)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("out of device memory: retrying in %s mode", self.mode)
        return True

    def _pin_homes(self) -> None:
        """All three models' CPU copies into pinned slabs (everything is offloaded when this runs). Where
        the host cannot pin that much, the copies stay pageable: slower, synchronous copies, same results."""
        groups = list(self.whole.values()) + self.unet_groups
        for group in groups:
            group.home = []  # hold no reference to the old storage, so it is freed as each tensor moves
        try:
            self.pinned_bytes = pin_together(_tensors_of(list(self.models.values())), _pinned_buffer, PIN_SLAB_BYTES)
            log.info("pinned %.2f GiB of host memory for the weights' CPU copies", self.pinned_bytes / 2**30)
        except RuntimeError as error:
            self.pin = False
            log.warning("could not pin host memory for the weights (%s); copying from pageable memory",
                        str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
        finally:
            for group in groups:
                group.refresh_home()

    # -- transfers --------------------------------------------------------------------------------------
    def _report(self, event: str, group: ModuleGroup) -> None:
        if self.on_transfer is not None:
            self.on_transfer(TransferEvent(event, group.name, group.nbytes))

    def _onload(self, group: ModuleGroup, side_stream: bool = False) -> None:
        group.onload(self.device, self.track_cpu_copies, self._copy_stream if side_stream else None)
        self.resident_bytes += group.nbytes
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        self._report("onload", group)

    def _offload(self, group: ModuleGroup) -> None:
        group.offload()
        self.resident_bytes -= group.nbytes
        self._report("offload", group)

    def _evict_except(self, keep: str) -> None:
        for name, group in self.whole.items():
            if name != keep and group.on_device:
                self._offload(group)
        if keep != "unet":
            self._release_unet_groups()

    def _release_unet_groups(self) -> None:
        self._streamed = None
        for group in self.unet_groups:
            if group.on_device:
                self._offload(group)

    # -- public -----------------------------------------------------------------------------------------
    @contextmanager
    def use(self, name: str) -> Iterator[nn.Module | StreamedUNet]:
        """The model ``name`` ready to run on the device for the ``with`` block. ``"vae_encoder"`` yields the
        VAE with only its encoder on the device (call only ``encode``); in full mode, the whole VAE."""
        if name not in self.models and name != VAE_ENCODER:
            raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES + (VAE_ENCODER,))}")
        if name == VAE_ENCODER and self.mode == "full":
            name = "vae"  # full mode keeps the whole VAE anyway; its groups must not overlap on the device
        if self.mode != "full":
            self._evict_except(name)
        if name == "unet" and self.mode == "low":
            if self._streamed is None:
                self._streamed = StreamedUNet(self, self.models["unet"], self.unet_groups, self.layout, self.plan)
            try:
                yield self._streamed
            finally:
                self._streamed.release()
            return
        group = self.whole[name]
        if not group.on_device:
            self._onload(group)
        yield self.models["vae" if name == VAE_ENCODER else name]

    def release(self) -> None:
        """Offload everything: no weight of any model is left on the device."""
        for group in self.whole.values():
            if group.on_device:
                self._offload(group)
        self._release_unet_groups()
        if self.device.type == "cuda":  # no copy or kernel still reading or writing what was just dropped
            torch.cuda.current_stream(self.device).synchronize()
            self._copy_stream.synchronize()

    def on_device(self) -> list[str]:
        """Names of the groups whose weights are on the device now."""
        groups = list(self.whole.values()) + self.unet_groups
        return [group.name for group in groups if group.on_device]


# -- choosing a mode ----------------------------------------------------------------------------------------
def model_bytes(sd=None, dtype: torch.dtype = torch.float16) -> dict[str, int]:
    """Weight bytes per model: measured from ``sd`` when given, else SD v1's parameter counts in ``dtype``."""
    if sd is not None:
        models = {"text_encoder": sd.text_encoder, "unet": sd.unet, "vae": sd.vae}
        return {name: sum(t.numel() * t.element_size() for t in _tensors_of([m])) for name, m in models.items()}
    size = torch.empty((), dtype=dtype).element_size()
    return {name: count * size for name, count in SD_V1_PARAMETERS.items()}


def working_bytes(height: int, width: int, batch: int, dtype: torch.dtype = torch.float16, tiled: bool = False) -> dict[str, int]:
    """Rough activation memory of one UNet call (classifier-free guidance doubles the batch) and one VAE
    decode, for SD v1's widths. Rules of thumb, not measurements: the OOM fallback covers misses.

    UNet: about 48 live tensors of 320 channels at the latent size (skips, GroupNorm's fp32 copies,
    the feed-forward's 8x width), plus one 64 MiB attention slice. VAE: one image at a time (the
    generator decodes and encodes images singly, whatever the batch), about 8 tensors of 256 channels at
    the image size: the decoder's last level has 128, but its convolutions hold input and output at once.
    ``tiled``: the VAE decodes 512 px tiles, so a tile's size counts, not the image's.
    """
    size = torch.empty((), dtype=dtype).element_size()
    latent = (height // 8) * (width // 8)
    unet = 2 * batch * latent * 320 * size * 48 + (64 << 20)
    if tiled:
        from ldm.vae_decoding import DEFAULT_TILE

        height, width = min(height, DEFAULT_TILE * 8), min(width, DEFAULT_TILE * 8)
    vae = height * width * 256 * size * 8
    return {"unet": unet, "vae": vae, "text_encoder": 2 * batch * 77 * 768 * size * 16}


RESERVE_BYTES = 512 << 20  # CUDA context's share, kernels' workspaces, allocator fragmentation
SAFETY = 1.2


def resolve_mode(
    mode: str,
    device: torch.device | str,
    height: int,
    width: int,
    batch: int,
    *,
    sd=None,
    dtype: torch.dtype = torch.float16,
    free_bytes: int | None = None,
    tiled: bool = False,
) -> str:
    """``mode`` itself, or for "auto" the fastest mode whose estimated peak fits the free device memory.

    full needs all weights + the largest working memory; medium the largest (model + its working
    memory); anything less streams the UNet (low). Non-CUDA devices get "full". ``tiled``: the VAE will
    decode in tiles (``--vae_tiling``, or automatically for large images).
    """
    if mode != "auto":
        if mode not in MODES:
            raise ValueError(f"unknown vram mode {mode!r}; choose one of {', '.join(VRAM_CHOICES)}")
        return mode
    device = torch.device(device)
    if device.type != "cuda":
        return "full"
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    weights = model_bytes(sd, dtype)
    work = working_bytes(height, width, batch, dtype, tiled)
    full = sum(weights.values()) + max(work.values())
    medium = max(weights[name] + work[name] for name in MODEL_NAMES)
    for name, need in (("full", full), ("medium", medium)):
        if need * SAFETY + RESERVE_BYTES <= free_bytes:
            chosen = name
            break
    else:
        chosen = "low"
    log.info("vram auto: %.2f GB free -> %s mode", free_bytes / 2**30, chosen)
    return chosen


def auto_budget_bytes(
    device: torch.device | str, height: int, width: int, batch: int, *, sd=None, dtype: torch.dtype = torch.float16,
    free_bytes: int | None = None,
) -> int | None:
    """For low mode: the UNet weight bytes that may stay on the device besides the UNet's working memory,
    or None (stream everything) where that leaves nothing. The VAE does not count: low mode empties the
    UNet's groups off the device before the VAE comes on."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    work = working_bytes(height, width, batch, dtype)
    spare = int((free_bytes - RESERVE_BYTES) / SAFETY) - work["unet"]
    # Below the streaming window a budget would only turn prefetching off: streaming everything is faster.
    return spare if spare > streaming_window_bytes(sd, dtype) else None


def streaming_window_bytes(sd=None, dtype: torch.dtype = torch.float16) -> int:
    """The two largest UNet block groups: what low mode without a budget keeps on the device at once.
    Measured from ``sd`` when given, else SD v1's (22% of its UNet weights)."""
    if sd is None:
        return int(model_bytes(None, dtype)["unet"] * 0.22)
    parts = dict(unet_parts(sd.unet))
    sizes = sorted(
        (sum(t.numel() * t.element_size() for t in _tensors_of([parts[n] for n in names]))
         for names in unet_group_layout(sd.unet)),
        reverse=True,
    )
    return sum(sizes[:2])
