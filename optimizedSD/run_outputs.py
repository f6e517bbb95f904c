"""Where a run's finished images go: each written at once with its metadata (A1111's infotext), kept for the
grid; and the run's summary line."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.checkpoints.hashes import model_hash
from ldm.control.files import webui_model_hash
from ldm.control.metadata import control_fields
from ldm.ledger.batch_parts import grid_fits
from ldm.passes.hires import final_size
from ldm.pipeline.batches import Batch
from ldm.pipeline.inpaint_inputs import InpaintingInputs
from ldm.pipeline.request import GenerationRequest
from optimizedSD.atomic_files import write_new_file
from optimizedSD.flags.hires import hires_fields
from optimizedSD.flags.speed import speed_fields
from optimizedSD.lora_tags import RunLora, metadata_prompt
from optimizedSD.outputs import OutputError, SampleWriter, infotext, noise_fields, prompt_folder_name, to_uint8


@dataclass
class RunSummary:
    """What a run did (returned by :func:`generate`, printed by the scripts)."""

    written: list[Path] = field(default_factory=list)
    grid: Path | None = None
    images: int = 0
    seconds: float = 0.0
    load_seconds: float = 0.0  # checking the inputs, reading the checkpoint, building the models, pinning
    memory_mode: str = ""  # the mode the run started in (out of memory may step it down later)
    first_seed: int = 0
    peak_vram_bytes: int | None = None
    safety_mode: str | None = None  # --safety_checker_mode when the checker ran
    flagged: int = 0  # images the safety checker flagged
    ranks: int = 1  # torchrun processes that shared the run
    unfinished: dict[int, list[int]] = field(default_factory=dict)  # torchrun: rank -> units it did not finish

    def line(self) -> str:
        per_image = self.seconds / self.images if self.images else float("nan")
        rate = f"; {self.images / self.seconds:.2f} images/s over {self.ranks} ranks" if self.ranks > 1 and self.seconds else ""
        text = f"{self.images} images in {self.seconds:.1f} s ({per_image:.2f} s/image{rate})"
        if self.safety_mode is not None:
            text += f", {self.flagged} flagged by the safety checker" + (f" ({self.safety_mode})" if self.flagged else "")
        for rank, units in sorted(self.unfinished.items()):
            text += f", rank {rank} stopped with {len(units)} of its units not done"
        if self.written:
            folders = sorted({str(p.parent) for p in self.written})
            text += f", written to {folders[0]}" + (f" and {len(folders) - 1} more folders" if len(folders) > 1 else "")
        if self.grid is not None:
            text += f", grid {self.grid}"
        if self.peak_vram_bytes is not None:
            text += f", peak VRAM {self.peak_vram_bytes / 2**30:.2f} GiB"
        return text


def weights_hash(path: Path | None) -> str | None:
    """A1111's shorthash (sha256 of the whole file, 10 digits); a diffusers folder has none."""
    return model_hash(path) if path is not None and path.is_file() else None


class RunOutputs:
    """Where finished images go: each written at once with its metadata, and kept for the grid."""

    def __init__(self, request: GenerationRequest, writer: SampleWriter, prompts: int, width: int, height: int,
                 summary: RunSummary, loras: tuple[RunLora, ...] = (), lora_hashes: str | None = None,
                 inpainting: InpaintingInputs | None = None) -> None:
        self.request, self.writer, self.summary = request, writer, summary
        self.lora_hashes, self.loras = lora_hashes, loras
        self.size = (width, height)
        self.model_hash = None if request.skip_save and request.skip_grid else weights_hash(request.ckpt)
        self.vae_hash = None if request.skip_save and request.skip_grid else weights_hash(request.vae)
        self.grid_images: list[tuple[int, np.ndarray]] = []  # (image index, pixels)
        self.grid_text: str | None = None  # the grid carries its first image's parameters
        self.encoder = None  # a PromptEncoder  # set once the prompts are encoded (their metadata fields)
        self.file_numbers: list[int] | None = None  # torchrun: each image's number in a single process's naming
        self.inpainting = inpainting
        self.images = request.n_iter * prompts * request.n_samples
        self.control_maps: list[np.ndarray] = []  # --save_control_map: each ControlNet's preprocessed map
        hashes = [None if request.skip_save and request.skip_grid else webui_model_hash(spec.model) for spec in request.control]
        self.control_fields = control_fields(request.control, hashes)  # the webui extension's "ControlNet <i>"
        # A grid over the cap is not made (one warning line): its images would all stay in host memory.
        self.keep_grid = not request.skip_grid and grid_fits(self.images, *final_size(request, height, width))

    def infotext_fields(self, prompt: str, negative: str) -> dict[str, str]:
        """The prompts' own metadata fields (webui syntax), then inpainting's (``Mask blur``), ``Img2img steps``."""
        fields = dict(self.encoder.infotext_fields(prompt, negative)) if self.encoder is not None else {}
        if self.inpainting is not None:
            fields.update(self.inpainting.metadata())
        if self.request.img2img_steps != "cut":
            fields["Img2img steps"] = self.request.img2img_steps
        fields.update(self.control_fields)
        fields.update(hires_fields(self.request))
        return fields

    def pixels(self, decoded: torch.Tensor) -> np.ndarray:
        """A decoded image (``[1, 3, H, W]`` in [-1, 1] on the device) in 8 bits, with inpainting's kept pixels
        laid back (unless ``--no_overlay``)."""
        image = to_uint8(decoded)[0]
        return self.inpainting.finish(image) if self.inpainting is not None else image

    def add(self, batch: Batch, k: int, decoded: torch.Tensor, safety: str | None = None) -> None:
        """Image ``k`` of ``batch`` as decoded: to 8 bits (:meth:`pixels`), written, kept for the grid."""
        self.add_pixels(batch, k, self.pixels(decoded), safety)

    def add_pixels(self, batch: Batch, k: int, image: np.ndarray, safety: str | None = None) -> None:
        """Image ``k`` of ``batch`` in 8 bits; ``safety``: the safety checker's mark for its metadata."""
        request, seed, index = self.request, batch.seeds[k], batch.first_image + k
        text = self._infotext(batch.prompt, seed, safety, batch.subseeds[k] if batch.subseeds else None)
        if not request.skip_save:
            number = None if self.file_numbers is None else self.file_numbers[index]
            self.summary.written.append(self.writer.write_sample(prompt_folder_name(batch.prompt), seed, image, text, number))
            write_control_maps(self.summary.written[-1], self.control_maps)
        self.summary.images += 1  # after the write: a rank stopped while writing counts only what is on disk
        self.summary.flagged += safety is not None
        if self.keep_grid:
            self.grid_images.append((index, image))
            self.grid_text = self.grid_text or text

    def _infotext(self, prompt: str, seed: int, safety: str | None, subseed: int | None = None) -> str:
        request = self.request
        negative = request.negative_prompt if request.guided else ""
        return infotext(
            metadata_prompt(prompt, self.loras), negative, steps=request.steps, sampler=request.sampler,
            schedule=request.schedule,
            scale=request.scale, seed=seed, width=self.size[0], height=self.size[1], model_hash=self.model_hash,
            model_name=request.ckpt.stem, vae_hash=self.vae_hash, vae_name=request.vae.name if request.vae else None,
            strength=request.strength, eta=request.eta, lora_hashes=self.lora_hashes, token_merging_ratio=request.tome,
            extra=self.infotext_fields(prompt, negative),
            safety_checker=safety, noise={**noise_fields(request, subseed), **speed_fields(request)}, rng=request.rng,
        )

    def finish(self, images: list[np.ndarray] | None = None) -> None:
        """The grid of the run's images, in their order (torchrun: rank 0 passes every rank's)."""
        images = [image for _, image in self.grid_images] if images is None else images
        if images:
            self.summary.grid = self.writer.write_grid(images, self.request.n_rows, self.grid_text)


def write_control_maps(sample: Path, maps: list[np.ndarray]) -> None:
    """``--save_control_map``: each map beside ``sample`` as ``<sample>-control<n>.png`` (never over a file)."""
    for index, control in enumerate(maps):
        path = sample.with_name(f"{sample.stem}-control{index}.png")
        try:
            write_new_file(path, lambda handle: Image.fromarray(control).save(handle, format="PNG"))
        except OSError as error:  # FileExistsError included: nothing is overwritten
            raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
