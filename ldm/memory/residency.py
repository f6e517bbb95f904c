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
- ``medium``: one model on the device at a time (the optimizedSD fork's ``--turbo``); of the VAE only the
  half in use (decoder and ``post_quant_conv`` to decode, encoder and ``quant_conv`` to encode). A model stays
  until another is asked for, so the UNet is copied once per batch and kept for all its steps.
  Peak = the largest model (the UNet, 1.7 GB in fp16) + working memory; costs a UNet copy per batch.
- ``low``: the text encoder as in ``medium``; the UNet runs through :class:`StreamedUNet`, which runs
  ``UNetModel.forward`` itself with a part hook (:mod:`ldm.memory.streaming`) that copies each group of blocks
  in just before it runs, at every step. On CUDA the next group is copied on a side stream from pinned
  memory while the current one computes. With a budget (``budget_bytes``, the CLI's ``--vram_budget``),
  as many groups as fit stay on the device for good and only the rest are streamed. Peak = budget (or,
  without one, the two largest of the 25 block groups: 0.35 GB of SD v1's 1.6 GB of fp16 UNet weights)
  + working memory; costs a copy of the streamed part of the UNet at every step. A decode
  (``use("vae.decoder")``) streams the VAE's decoder level by level (:class:`StreamedVAE`): at the
  full-resolution level, where the decode's activations peak, 2.4 MB of its 99 MB of weights are there.
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
from typing import Callable, Iterator, NamedTuple

import torch
from torch import nn

from ldm.memory.out_of_memory import is_out_of_memory  # noqa: F401  (the one detector; re-exported for callers)
from ldm.memory.streaming import StreamedUNet, StreamedVAE, StreamPlan, decoder_group_layout, plan_streaming, unet_group_layout

__all__ = ["MODES", "ModuleGroup", "Residency", "StreamPlan", "StreamedUNet", "StreamedVAE", "TransferEvent",
           "VRAM_CHOICES", "auto_budget_bytes", "is_out_of_memory", "model_bytes", "next_lower_mode",
           "pin_together", "plan_streaming", "resolve_mode", "streaming_window_bytes", "unet_group_layout",
           "unet_parts", "working_bytes"]

log = logging.getLogger(__name__)

MODES = ("full", "medium", "low")
VRAM_CHOICES = ("auto",) + MODES
MODEL_NAMES = ("text_encoder", "unet", "vae")
# What ``Residency.use`` hands out: a model, or the VAE's half that a decode or an encode needs.
USE_NAMES = MODEL_NAMES + ("vae.encoder", "vae.decoder")

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

    def __init__(self, name: str, modules: list[nn.Module], home: str = "cpu"):
        self.name = name
        self.tensors = _tensors_of(modules)
        for tensor in self.tensors:
            if tensor.device.type != home:
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
        elif device.type in ("cpu", "meta"):
            if copy:  # a stand-in device (CPU for tests, meta for the VRAM ledger): a real, separate copy
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
    return unet.parts()


# The whole-model groups each name of ``Residency.use`` needs on the device.
_NEEDS = {
    "text_encoder": ("text_encoder",), "unet": ("unet",), "vae": ("vae.encoder", "vae.decoder"),
    "vae.encoder": ("vae.encoder",), "vae.decoder": ("vae.decoder",),
}


def _check_covered(model: nn.Module, groups: list[ModuleGroup], what: str) -> None:
    covered = {id(t) for group in groups for t in group.tensors}
    stray = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if id(t) not in covered]
    if stray:
        raise ValueError(f"{what} tensors outside the streamed parts: {', '.join(stray[:5])}")


class Residency:
    """Keeps ``sd``'s three models (and any ``extra_models``, e.g. the safety checker) on the CPU and puts
    each on ``device`` only while it runs.

    ``with residency.use(name) as model:`` yields the module on the device; ``name`` is a model, or
    ``"vae.decoder"`` / ``"vae.encoder"`` for the half of the VAE a decode / an encode needs (the VAE
    module, with only that half on the device). In low mode "unet" yields a :class:`StreamedUNet` and
    "vae.decoder" a :class:`StreamedVAE`. :meth:`release` leaves nothing on the device. ``budget_bytes``
    (low mode) is the UNet weight memory allowed on the device at once. ``track_cpu_copies`` makes
    onloads to a CPU or meta device real copies (a stand-in device for tests and the VRAM ledger);
    otherwise a CPU device moves nothing. ``pin`` (default: on CUDA) puts the CPU copies in pinned
    memory once the mode is medium or low.
    """

    def __init__(
        self,
        sd,
        device: torch.device | str,
        mode: str = "full",
        budget_bytes: int | None = None,
        *,
        on_transfer: Callable[[TransferEvent], None] | None = None,
        track_cpu_copies: bool = False,
        pin: bool | None = None,
        extra_models: dict[str, nn.Module] | None = None,
    ):
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.models: dict[str, nn.Module] = {"text_encoder": sd.text_encoder, "unet": sd.unet, "vae": sd.vae}
        for name, model in (extra_models or {}).items():  # e.g. the safety checker: moved as a whole, like the VAE
            if name in self.models:
                raise ValueError(f"model name {name!r} is taken")
            self.models[name] = model
        self.on_transfer = on_transfer
        self.track_cpu_copies = track_cpu_copies
        # Pinned homes pay off only where weights move during a run (medium, low): pinned lazily.
        self.pin = self.device.type == "cuda" if pin is None else pin
        self.pinned_bytes = 0
        # Weights live on the CPU; a simulated run (the VRAM ledger, compute device meta) keeps them on meta.
        home = "meta" if self.device.type == "meta" else "cpu"
        vae = sd.vae
        self.whole = {
            "text_encoder": ModuleGroup("text_encoder", [sd.text_encoder], home),
            "unet": ModuleGroup("unet", [sd.unet], home),
            "vae.encoder": ModuleGroup("vae.encoder", [vae.encoder, vae.quant_conv], home),
            "vae.decoder": ModuleGroup("vae.decoder", [vae.decoder, vae.post_quant_conv], home),
            **{name: ModuleGroup(name, [model], home) for name, model in (extra_models or {}).items()},
        }
        # The whole-model groups each name of ``use`` needs: the three models' and the extra models' own.
        self.needs = {**_NEEDS, **{name: (name,) for name in extra_models or {}}}
        _check_covered(vae, [self.whole["vae.encoder"], self.whole["vae.decoder"]], "VAE")
        self.layout = unet_group_layout(sd.unet)
        self.unet_groups = self._streamed_groups("unet.", dict(unet_parts(sd.unet)), self.layout, home)
        _check_covered(sd.unet, self.unet_groups, "UNet")
        self.decoder_layout = decoder_group_layout(vae)
        self.decoder_groups = self._streamed_groups("vae.", dict(vae.decoder_parts()), self.decoder_layout, home)
        _check_covered(vae, self.decoder_groups + [self.whole["vae.encoder"]], "VAE")
        self._copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._streamed: StreamedUNet | None = None
        self.resident_bytes = 0
        self.mode = ""
        self.budget_bytes: int | None = None
        self.set_mode(mode, budget_bytes)

    @staticmethod
    def _streamed_groups(prefix: str, parts: dict[str, nn.Module], layout: list[list[str]], home: str) -> list[ModuleGroup]:
        return [ModuleGroup(prefix + "+".join(names), [parts[n] for n in names], home) for names in layout]

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
        groups = self.groups()
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
        self._report("onload", group)

    def _offload(self, group: ModuleGroup) -> None:
        group.offload()
        self.resident_bytes -= group.nbytes
        self._report("offload", group)

    def _evict_except(self, name: str) -> None:
        for key, group in self.whole.items():
            if key not in self.needs[name] and group.on_device:
                self._offload(group)
        if name != "unet":
            self._streamed = None
        for group in self.unet_groups + self.decoder_groups:
            if group.on_device and not (name == "unet" and group in self.unet_groups):
                self._offload(group)

    # -- public -----------------------------------------------------------------------------------------
    @contextmanager
    def use(self, name: str) -> Iterator[nn.Module | StreamedUNet | StreamedVAE]:
        """The model ``name`` (or the VAE half it names) ready to run on the device for the ``with`` block."""
        if name not in self.needs:
            raise ValueError(f"unknown model {name!r}; choose one of {', '.join(self.needs)}")
        if self.mode != "full":
            self._evict_except(name)
        streamed = self._streamer(name) if self.mode == "low" else None
        if streamed is not None:
            try:
                yield streamed
            finally:
                streamed.release()
            return
        for key in self.needs[name]:
            if not self.whole[key].on_device:
                self._onload(self.whole[key])
        yield self.models[name.split(".")[0]]

    def _streamer(self, name: str) -> StreamedUNet | StreamedVAE | None:
        """Low mode: what streams ``name`` (the UNet, or the VAE's decoder for a decode); None for the rest."""
        if name == "unet":
            if self._streamed is None:
                self._streamed = StreamedUNet(self, self.models["unet"], self.unet_groups, self.layout, self.plan)
            return self._streamed
        if name == "vae.decoder":
            return StreamedVAE(self, self.models["vae"], self.decoder_groups, self.decoder_layout)
        return None

    def release(self) -> None:
        """Offload everything: no weight of any model is left on the device."""
        for group in self.groups():
            if group.on_device:
                self._offload(group)
        self._streamed = None
        if self.device.type == "cuda":  # no copy or kernel still reading or writing what was just dropped
            torch.cuda.current_stream(self.device).synchronize()
            self._copy_stream.synchronize()

    def groups(self) -> list[ModuleGroup]:
        """Every group whose weights this manager moves (whole models, the UNet's and the decoder's
        streamed groups)."""
        return list(self.whole.values()) + self.unet_groups + self.decoder_groups

    def on_device(self) -> list[str]:
        """Names of the groups whose weights are on the device now."""
        return [group.name for group in self.groups() if group.on_device]


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
        from ldm.memory.vae_decoding import DEFAULT_TILE

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
    extra_bytes: int = 0,
) -> str:
    """``mode`` itself, or for "auto" the fastest mode whose estimated peak fits the free device memory.

    full needs all weights + the largest working memory; medium the largest (model + its working
    memory); anything less streams the UNet (low). Non-CUDA devices get "full". ``tiled``: the VAE will
    decode in tiles (``--vae_tiling``, or automatically for large images). ``extra_bytes``: the weights of
    the ``extra_models`` (the safety checker), on the device with the rest in full mode, alone in medium.
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
    full = sum(weights.values()) + extra_bytes + max(work.values())
    medium = max(max(weights[name] + work[name] for name in MODEL_NAMES), extra_bytes)
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
