"""The run of ``optimized_txt2img.py``, ``optimized_img2img.py`` and ``optimized_inpaint.py``: the inputs checked,
then the generation stages of :mod:`ldm.pipeline`, batch after batch, into the output folder.

:func:`generate` reads like diffusers' ``__call__``::

    inputs = check_inputs(request)              # prompts, init image, size, output folder, config, checkpoint
    model = load_model(...)                     # the checkpoint, once; its memory mode (ldm.pipeline.model)
    encoder = encode_prompts(...)               # every distinct (sub-)prompt once (ldm.pipeline.encode)
    init = prepare_init(...)                    # img2img's / inpainting's input preparer (ldm.pipeline.prepare)
    for batch in plan_batches(...):             # per (iteration, prompt): the seeds (ldm.pipeline.batches)
        latents = sample_batch(...)             #   noise, then the guided UNet under the sampler (ldm.pipeline.sample)
        decode_and_write(...)                   #   one image at a time: decode, write, keep for the grid

Everything the user gave is checked before the (slow) model load. The VRAM ledger (:mod:`ldm.ledger`) runs the
same stage functions on the ``meta`` device; this module adds what only a real run has: the output folder, the
progress bars, the batch parts and decode tiles the ledger decides, and torchrun's share of the batches.

Memory: which model sits on the device when is :class:`ldm.memory.residency.Residency`'s business
(``--vram``/``--turbo``/``--vram_budget``); out of memory: :mod:`ldm.memory.out_of_memory`'s ladders run a
batch, or a decode, again lower.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from tqdm import tqdm

from ldm.checkpoints.diffusers_folders import is_diffusers_folder
from ldm.checkpoints.kinds import INPAINTING_IN_CHANNELS, checkpoint_unet_in_channels
from ldm.checkpoints.errors import CheckpointError
from ldm.conditioning.fork_syntax import parse_prompt
from ldm.conditioning.prompts import PromptEncoder, distinct
from ldm.conditioning.webui_syntax import parse_fragments, unsupported_features
from ldm.config import INPAINTING_CONFIG, ModelConfig, load_model_config
from ldm.errors import UsageError
from ldm.ledger.batch_parts import PartQuery, grid_host_bytes, images_per_part
from ldm.ledger.plan import low_mode_tiles
from ldm.ledger.shapes import RunShape
from ldm.loading.lora import lora_hashes_text
from ldm.memory.estimates import model_bytes
from ldm.memory.vae_decoding import should_tile
from ldm.models.attention import attention_backend
from ldm.models.safety_checker import find_safety_checker_files
from ldm.models.taesd import TinyAutoencoder
from ldm.passes.hires import final_size, hires_pass, hires_texts
from ldm.passes.only_masked import AreaInpaintingInputs
from ldm.pipeline.batches import Batch, batch_parts, plan_batches
from ldm.pipeline.decode import decode_and_write
from ldm.pipeline.encode import encode_prompts
from ldm.pipeline.images import load_init_image, output_size
from ldm.pipeline.inpaint_inputs import InpaintingInputs
from ldm.pipeline.input_checks import check_finite, check_prompt_weights, check_text, read_prompts_file
from ldm.pipeline.model import WEIGHTS_HELP, FirstCall, LoadedModel, attention_name, load_model
from ldm.pipeline.prepare import prepare_init
from ldm.pipeline.request import GenerationRequest
from ldm.pipeline.sample import StepCallback, sample_batch
from optimizedSD import distributed
from optimizedSD.arguments import resolve_config
from optimizedSD.lora_tags import RunLora, collect_loras
from optimizedSD.outputs import SampleWriter, Watermarker, prompt_folder_name
from optimizedSD.previews import PreviewWriter
from optimizedSD.run_outputs import RunOutputs, RunSummary

log = logging.getLogger(__name__)


# ---- 1. inputs, checked before the model load ----------------------------------------------------------------
@dataclass(frozen=True)
class RunInputs:
    """What the user gave, read and checked: prompts, init image, image size, output folder, model config."""

    prompts: list[str]
    init_image: Image.Image | None
    height: int
    width: int
    writer: SampleWriter
    config: ModelConfig
    inpainting: InpaintingInputs | None = None  # inpaint: the mask read and sized, and the init image's pixels
    loras: tuple[RunLora, ...] = ()  # --lora files, then the webui prompts' <lora:NAME:WEIGHT> tags
    control_images: tuple[Image.Image, ...] = ()  # --control_image, opened and checked, in order


def check_inputs(request: GenerationRequest) -> RunInputs:
    """Read and check everything the user gave, so that mistakes surface before the (slow) model load."""
    prompts = read_prompts_file(request.from_file) if request.from_file else [check_text(request.prompt, "--prompt")]
    check_text(request.negative_prompt, "--negative_prompt")
    check_finite(request.scale, "--scale")
    prompts, loras = collect_loras(request, prompts)  # webui syntax: the prompts without their <lora:...> tags
    check_prompts(request, prompts)
    init_image = load_init_image(request.init_img) if request.img2img else None
    height, width = output_size(request, init_image)
    inpainting = None
    if request.inpaint:
        mask = request.mask
        inpainting = AreaInpaintingInputs.prepare_area(init_image, mask, width, height)
    writer = SampleWriter(request.outdir, request.image_format, Watermarker() if request.watermark else None)
    writer.prepare(".")
    for prompt in distinct(prompts) if not request.skip_save else ():  # every prompt's folder now, not after sampling
        writer.prepare(prompt_folder_name(prompt))
    if request.config is not None:
        load_model_config(request.config)  # a bad --config fails before the checkpoint is looked at
    if not request.ckpt.exists():
        raise UsageError(f"checkpoint not found: {request.ckpt}; {WEIGHTS_HELP}")
    if not request.ckpt.is_file() and not is_diffusers_folder(request.ckpt):
        raise UsageError(f"checkpoint is neither a file nor a diffusers model folder (with model_index.json): "
                         f"{request.ckpt}; {WEIGHTS_HELP}")
    if request.vae is not None and not request.vae.exists():
        raise UsageError(f"--vae not found: {request.vae}")
    for path, _ in request.loras:
        if not path.is_file():
            raise UsageError(f"--lora {path}: no such file")
    if request.safety_checker is not None:
        find_safety_checker_files(request.safety_checker)  # a wrong folder fails now, not after the model load
    config = load_model_config(model_config_path(request))
    if request.clip_skip > config.text.num_hidden_layers:
        raise UsageError(f"--clip_skip must be at most {config.text.num_hidden_layers} (the text encoder's layers), "
                         f"got {request.clip_skip}")
    if request.steps > config.schedule.timesteps:
        raise UsageError(f"--ddim_steps must be at most {config.schedule.timesteps}, got {request.steps}")
    return RunInputs(prompts, init_image, height, width, writer, config, inpainting, loras, control_images(request))


def control_images(request: GenerationRequest) -> tuple[Image.Image, ...]:
    """Each ControlNet's file found and its image opened and checked, before the model load."""
    images = []
    for spec in request.control:
        if not spec.model.exists():
            raise UsageError(f"--control_model not found: {spec.model}")
        try:  # the init image's checks (size from the header first, regular file, ...), named as the flag
            images.append(load_init_image(spec.image))
        except UsageError as error:
            raise UsageError(f"--control_image: {str(error).replace('init image', 'image')}") from None
    return tuple(images)


def model_config_path(request: GenerationRequest) -> Path:
    """``--config``, or without it the config the file's UNet needs: v1-inpainting-inference.yaml for 9 input
    channels, else v1-inference.yaml. txt2img and img2img refuse an inpainting file (its UNet needs a mask)."""
    try:  # a diffusers folder is not looked into here (its loader reads unet/config.json)
        channels = None if is_diffusers_folder(request.ckpt) else checkpoint_unet_in_channels(request.ckpt)
    except CheckpointError as error:
        raise UsageError(f"{error} ({WEIGHTS_HELP})") from None
    if channels == INPAINTING_IN_CHANNELS and not request.inpaint:
        raise UsageError(f"{request.ckpt} is an inpainting checkpoint (its UNet takes a mask and a masked image): "
                         "use optimizedSD/optimized_inpaint.py --init-img IMAGE --mask MASK")
    if request.config is not None:
        return request.config
    return INPAINTING_CONFIG if channels == INPAINTING_IN_CHANNELS else resolve_config(None)


def check_prompts(request: GenerationRequest, prompts: list[str]) -> None:
    """Prompts that cannot be encoded in the chosen syntax fail now, not after loading (fork: weights summing
    to zero; webui: a weight that is no number); webui features read as plain text are named once."""
    checker = PromptEncoder(syntax=request.prompt_syntax)
    unsupported: set[str] = set()
    for text in (*distinct(prompts), request.negative_prompt):
        checker.check(text)  # fork: weights summing to zero; webui: a weight that is no number
        if request.prompt_syntax == "fork":
            check_prompt_weights([weight for _, weight in parse_prompt(text).parts], text)
        else:
            check_prompt_weights([f.weight for f in parse_fragments(text) if not f.breaks_chunk], text)
            unsupported.update(unsupported_features(text))
    if unsupported:
        log.warning("not implemented, read as plain text: %s", ", ".join(sorted(unsupported)))
    if request.embeddings_dir_given and not request.embeddings_dir.is_dir():
        raise UsageError(f"--embeddings_dir {request.embeddings_dir}: no such folder")


# ---- 2. batches: sample, decode, write -------------------------------------------------------------------
class StepBar:
    """The progress bar over one batch's sampling steps (rank 0 only under torchrun), made at the first step and
    started again when a retry one memory mode lower starts the walk again."""

    def __init__(self, sampler: str, preview: PreviewWriter | None = None) -> None:
        self.sampler, self.bar = sampler, None
        self.preview = preview  # --preview_every

    def __call__(self, step: int, total: int, x: torch.Tensor) -> None:
        if self.preview is not None:
            self.preview(step, total, x)
        if self.bar is None:
            self.bar = tqdm(total=total or None, desc=f"Sampling ({self.sampler})", leave=False, unit="step",
                            disable=not distributed.is_main_process())
        elif step == 0:
            self.bar.reset(total=total or None)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def sample_with_bar(request: GenerationRequest, model: LoadedModel, encoder: PromptEncoder, init, batch: Batch,
                    latent_shape: tuple[int, ...], watcher: StepCallback | None = None) -> torch.Tensor:
    """:func:`~ldm.pipeline.sample.sample_batch` with a progress bar over its steps (and ``watcher`` after each)."""
    preview = None
    if request.preview_every:
        preview = PreviewWriter(request.outdir / "previews", request.preview_every, batch.seeds, model.sd.vae)
    bar = StepBar(request.sampler, preview)

    def progress(step: int, total: int, x: torch.Tensor) -> None:  # returns None: the sampler keeps its latent
        bar(step, total, x)
        if watcher is not None:
            watcher(step, total, x)

    try:
        return sample_batch(request, model, encoder, init, batch, latent_shape, progress)
    finally:
        bar.close()


def hires_with_bar(request: GenerationRequest, model: LoadedModel, encoder: PromptEncoder, batch: Batch,
                   latents: torch.Tensor, watcher: StepCallback | None = None, tiled: bool = False) -> torch.Tensor:
    """:func:`~ldm.passes.hires.hires_pass` with a progress bar over its steps (and ``watcher`` after each);
    ``tiled``: a pixel upscaler's encode runs in tiles."""
    bar = StepBar(f"hires fix, {request.hires.sampler or request.sampler}")

    def progress(step: int, total: int, x: torch.Tensor) -> None:
        bar(step, total, x)
        if watcher is not None:
            watcher(step, total, x)

    try:
        return hires_pass(request, model, encoder, batch, latents, progress, tiled=tiled)
    finally:
        bar.close()


def part_size(request: GenerationRequest, inputs: RunInputs, model: LoadedModel, outputs: RunOutputs, tiled: bool) -> int:
    """How many of a batch's images sample together (:mod:`ldm.ledger.batch_parts`): all unless the memory
    available to the run (host memory on a CPU) holds fewer; not even one is a one-line error before sampling."""
    weights = sum(model_bytes(model.sd).values())
    query = PartQuery(inputs.config, model.residency.mode, inputs.height, inputs.width, request.dtype, request.sampler,
                      attention_name(request.attention, request.device), request.unet_bs, request.device, tiled,
                      request.quantize, request.tome, weights, isinstance(model.sd.vae, TinyAutoencoder))
    grid = grid_host_bytes(outputs.images, inputs.height, inputs.width) if outputs.keep_grid else 0
    return images_per_part(query, request.n_samples, extra_host_bytes=grid)


def decode_in_tiles(request: GenerationRequest, inputs: RunInputs, mode: str, taesd: bool = False) -> bool:
    """Tile the decode with ``--vae_tiling``, above 1024 px, and in low mode where the VRAM ledger says a
    whole-image decode would set the run's peak above the UNet's (768 px and up for SD v1 in fp16; tiles
    change the picture slightly, so only where the memory needs them). ``taesd``: the run's VAE is a TAESD."""
    if should_tile(inputs.height, inputs.width, request.vae_tiling):
        return True
    if mode != "low" or request.device.type != "cuda":
        return False
    attention = attention_name(request.attention, request.device)
    shape = RunShape(inputs.height, inputs.width, request.n_samples, request.sampler, request.steps, request.scale,
                     attention, False, request.unet_bs, request.img2img)
    return low_mode_tiles(str(request.config or resolve_config(None)), shape, request.dtype, request.quantize,
                          request.tome, taesd)



# ---- the run ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunHooks:
    """What a caller that outlives one run (the HTTP server, :mod:`optimizedSD.server`) changes in :func:`generate`:
    ``model`` gives the model it keeps loaded (not released after the run), ``progress`` sees every sampling step
    (it may raise to stop the batch), and ``around_batch(run)`` runs each batch (or skips it)."""

    model: Callable[[GenerationRequest, RunInputs], LoadedModel]
    progress: StepCallback | None = None
    around_batch: Callable[[Callable[[], None]], None] = lambda run: run()


def generate(request: GenerationRequest, hooks: RunHooks | None = None) -> RunSummary:
    """Run the scripts' job for a parsed and checked request (see :func:`optimizedSD.arguments.parse_args`)."""
    started = time.perf_counter()
    job, request = distributed.join(request)  # torchrun: this rank's device and rank 0's seed; else (None, request)
    inputs = check_inputs(request)
    if job is None or job.is_main:
        print(f"Seed: {request.seed}" + (" (fixed code: every batch starts from the first batch's noise)" if request.fixed_code else ""))
    if hooks is not None:
        model = hooks.model(request, inputs)
    else:
        model = load_model(request, inputs.config, [(lora.path, lora.weight) for lora in inputs.loras],
                           *final_size(request, inputs.height, inputs.width), inputs.control_images,
                           progress=print, first=FirstCall(inputs.prompts[0], inputs.height, inputs.width))
    summary = RunSummary(first_seed=request.seed, load_seconds=time.perf_counter() - started,
                         memory_mode=model.residency.mode, ranks=job.world_size if job else 1,
                         safety_mode=request.safety_checker_mode if model.safety is not None else None)
    device = request.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # The backend for this run only (the out-of-memory ladders may switch to slices inside it).
    with attention_backend(attention_name(request.attention, device)):
        try:
            run_batches(request, inputs, model, summary, job, hooks)
        finally:
            if hooks is None:  # the server keeps its model where its memory mode puts it
                model.residency.release()
            if job is not None:
                job.stop()
    summary.seconds = time.perf_counter() - started
    if device.type == "cuda":
        summary.peak_vram_bytes = torch.cuda.max_memory_allocated(device)
    return summary


def run_batches(request: GenerationRequest, inputs: RunInputs, model: LoadedModel, summary: RunSummary,
                job: distributed.Distributed | None, hooks: RunHooks | None = None) -> None:
    """Prompts, the input preparer, then every batch (under torchrun, this rank's share) and the grid."""
    outputs = RunOutputs(request, inputs.writer, len(inputs.prompts), inputs.width, inputs.height, summary, inputs.loras,
                         lora_hashes_text(model.loras, [lora.name for lora in inputs.loras]), inputs.inpainting)
    if request.save_control_map:
        outputs.control_maps = [unit.map for unit in model.control]
    encoder = outputs.encoder = encode_prompts(request, [*inputs.prompts, *hires_texts(request)], model)
    final = replace(inputs, **dict(zip(("height", "width"), final_size(request, inputs.height, inputs.width))))
    # The pictures written: the hires fix's size.
    tiled = decode_in_tiles(request, final, model.residency.mode, isinstance(model.sd.vae, TinyAutoencoder))
    # Encodes at that size (img2img's init image, a hires pixel upscaler's) tile where its decode does.
    init = prepare_init(request, model, inputs.init_image, inputs.width, inputs.height, inputs.inpainting, tiled)
    cfg = inputs.config
    latent_shape = (cfg.latent_channels, inputs.height // cfg.downsampling_factor, inputs.width // cfg.downsampling_factor)
    batches = list(plan_batches(request, inputs.prompts))
    size = part_size(request, final, model, outputs, tiled)
    watcher = hooks.progress if hooks is not None else None

    def run_parts(batch: Batch) -> None:
        for part in batch_parts(batch, size):  # one part unless the batch is larger than the memory holds
            latents = sample_with_bar(request, model, encoder, init, part, latent_shape, watcher)
            if request.hires is not None:
                latents = hires_with_bar(request, model, encoder, part, latents, watcher, tiled)
            decode_and_write(model, part, latents, tiled, outputs)

    def run_batch(batch: Batch) -> None:
        if hooks is None:
            run_parts(batch)
        else:
            hooks.around_batch(lambda: run_parts(batch))

    if job is not None:
        run_rank_share(job, request, inputs, batches, run_batch, outputs)
        return
    for batch in tqdm(batches, desc="Batches", disable=len(batches) == 1):
        run_batch(batch)
    outputs.finish()


def run_rank_share(job: distributed.Distributed, request: GenerationRequest, inputs: RunInputs, batches: list[Batch],
                   run_batch: Callable[[Batch], None], outputs: RunOutputs) -> None:
    """torchrun: this rank's batches (see :mod:`optimizedSD.distributed`), then rank 0 gathers every rank's
    results for the grid and the summary. A rank that stops early prints its one error line, still joins the
    gather (so the others finish), then raises :class:`~optimizedSD.distributed.RankStopped`."""
    folders = [prompt_folder_name(prompt) for prompt in inputs.prompts]
    # Rank 0 reads the folders' next free numbers before anyone writes; every rank names its files from them.
    starts = job.broadcast({f: inputs.writer.next_number(f) for f in set(folders)} if job.is_main else None)
    outputs.file_numbers = distributed.planned_file_numbers(folders, request.n_iter, request.n_samples, starts)
    units = distributed.work_units(len(inputs.prompts), request.n_iter, request.n_samples)
    mine = distributed.units_for_rank(units, job.rank, job.world_size)
    bar = tqdm(total=len(mine), desc=f"Batches (rank 0 of {job.world_size})", disable=not job.is_main)
    unfinished, error = distributed.run_share(mine, lambda unit: (run_batch(batches[unit.index]), bar.update(1)))
    bar.close()
    line = None
    if error is not None:
        line = distributed.report_stop(f"optimized_{request.mode}.py", job, error, unfinished, request.seed, request.fixed_code)
    summary = outputs.summary
    results = job.gather(distributed.RankResult(
        job.rank, images=summary.images, flagged=summary.flagged, written=[str(p) for p in summary.written],
        grid_images=outputs.grid_images, unfinished=[unit.index for unit in unfinished],
    ))
    if job.is_main:
        merged = distributed.merge_results(results)
        summary.images, summary.flagged, summary.unfinished = merged.images, merged.flagged, merged.unfinished
        summary.written = [Path(p) for p in merged.written]
        outputs.finish(merged.grid_images)
    if line is not None:
        raise distributed.RankStopped(line)
