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

from ldm.memory import module_groups
from ldm.memory.module_groups import ModuleGroup, pin_together, tensors_of
from ldm.memory.streaming import StreamedUNet, StreamedVAE, decoder_group_layout, plan_streaming, unet_group_layout

log = logging.getLogger(__name__)

MODES = ("full", "medium", "low")
VRAM_CHOICES = ("auto",) + MODES
MODEL_NAMES = ("text_encoder", "unet", "vae")
# What ``Residency.use`` hands out: a model, or the VAE's half that a decode or an encode needs.
USE_NAMES = MODEL_NAMES + ("vae.encoder", "vae.decoder")



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
        self.attached: list[ModuleGroup] = []  # other networks' groups, moved by their owners (attach)
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
            self.pinned_bytes = pin_together(tensors_of(list(self.models.values())), module_groups.pinned_buffer,
                                             module_groups.PIN_SLAB_BYTES)  # looked up here: tests replace them
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

    def onload(self, group: ModuleGroup, side_stream: bool = False) -> None:
        group.onload(self.device, self.track_cpu_copies, self._copy_stream if side_stream else None)
        self.resident_bytes += group.nbytes
        self._report("onload", group)

    def offload(self, group: ModuleGroup) -> None:
        group.offload()
        self.resident_bytes -= group.nbytes
        self._report("offload", group)

    def _evict_except(self, name: str) -> None:
        for key, group in self.whole.items():
            if key not in self.needs[name] and group.on_device:
                self.offload(group)
        if name != "unet":
            self._streamed = None
        for group in self.unet_groups + self.decoder_groups:
            if group.on_device and not (name == "unet" and group in self.unet_groups):
                self.offload(group)

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
                self.onload(self.whole[key])
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
                self.offload(group)
        self._streamed = None
        if self.device.type == "cuda":  # no copy or kernel still reading or writing what was just dropped
            torch.cuda.current_stream(self.device).synchronize()
            self._copy_stream.synchronize()

    def groups(self) -> list[ModuleGroup]:
        """Every group whose weights this manager moves (whole models, the UNet's and the decoder's
        streamed groups)."""
        return list(self.whole.values()) + self.unet_groups + self.decoder_groups + self.attached

    def attach(self, name: str, model: nn.Module, groups: list[ModuleGroup]) -> None:
        """One more network whose ``groups`` (covering all its weights) its owner moves through :meth:`onload`
        and :meth:`offload` while the UNet runs (a ControlNet, :mod:`ldm.control`); :meth:`release`, the
        step-down after out of memory, pinning and :meth:`on_device` cover them like the models' own."""
        if name in self.models:
            raise ValueError(f"model name {name!r} is taken")
        _check_covered(model, groups, name)
        self.models[name] = model
        self.attached += groups
        if self.pinned_bytes:  # the mode already moves weights: the new homes go to pinned slabs too
            for group in groups:
                group.home = []
            self.pinned_bytes += pin_together(tensors_of([model]), module_groups.pinned_buffer,
                                              module_groups.PIN_SLAB_BYTES)
            for group in groups:
                group.refresh_home()

    def on_device(self) -> list[str]:
        """Names of the groups whose weights are on the device now."""
        return [group.name for group in self.groups() if group.on_device]
