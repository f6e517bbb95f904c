"""``--from_png``: the settings of an image written by this tool or by AUTOMATIC1111's webui.

:func:`restore_settings` turns an :class:`~optimizedSD.infotext.Infotext` into the settings it can honour
and names the fields it cannot (the script prints them in one warning line). Flags given on the command
line override what is read here.

How the webui's fields are read (webui >= 1.9, ``infotext_utils.parse_generation_parameters``):

- ``RNG``: a missing one means GPU noise (the webui's default), ``--rng gpu`` here (CUDA's numbers on any
  device), as ``GPU`` and ``NV`` do; ``CPU`` is ``--rng cpu``; ``Eta``, ``ENSD``, ``Variation seed``,
  ``Variation seed strength`` and ``Seed resize from`` become their flags;
- a missing ``Schedule type`` means "Automatic", each sampler's default (Karras for DPM++ 2M, DPM2 and
  DPM2 a), as ``--schedule automatic`` here; a named one (``Uniform``, ``Karras``, ...) becomes ``--schedule``;
  an old label that names it (``DPM++ 2M Karras``) too. Before the webui's v1.9 (its ``Version`` field) a
  label named no schedule: plain ``DPM++ 2M`` walked the uniform grid;
- ``Version``: this tool writes ``optimizedSD ...``; an img2img infotext of another program (the webui,
  Forge) replays with the webui's step rule (``--img2img_steps webui``), this tool's with its own;
- ``Clip skip`` missing means 1; ``Denoising strength`` in a txt2img infotext belongs to the hires fix, which the
  ``Hires ...`` fields set (``--hires_*``);
- a prompt from the webui is in its syntax; this tool writes ``Prompt syntax: fork`` when its own syntax
  would read the prompt differently;
- ``<lora:NAME:WEIGHT>`` tags in the prompt (the webui's, or those this tool appends for each LoRA) become
  LoRAs looked up in ``--lora_dir`` by NAME, checked against ``Lora hashes``, and leave the prompt.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Mapping

from ldm.loading.lora import extract_lora_tags
from ldm.loading.errors import LoraError
from ldm.passes.upscalers import find_upscaler
from ldm.samplers.schedules import find_schedule
from optimizedSD.infotext import Infotext

_SCHEDULE_SUFFIXES = (" Karras", " Exponential")  # old labels that named the schedule ("DPM++ 2M Karras")
# Fields read for the record only: they change nothing in the image.
_INFORMATIONAL = frozenset({"Model", "Pad conds", "Size-1", "Size-2"})


class FromPngError(ValueError):
    """An image without readable parameters, or with a field that is not what it must be."""


@dataclass
class RestoredSettings:
    """What an infotext asks for, in this tool's terms, and the fields it cannot honour (``"Name: value"``)."""

    values: dict[str, object] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    def warning(self) -> str | None:
        """The one warning line the script prints, or None when everything is honoured."""
        if not self.ignored:
            return None
        return "--from_png: these parameters cannot be honoured and are ignored: " + "; ".join(self.ignored)


def _number(kind: Callable[[str], object], key: str, value: str) -> object:
    try:
        return kind(value)
    except ValueError:
        raise FromPngError(f"--from_png: {key}: {value!r} is not a number") from None


def _size(value: str) -> tuple[int, int]:
    width, sep, height = value.partition("x")
    if not sep or not width.strip().isdigit() or not height.strip().isdigit():
        raise FromPngError(f"--from_png: Size: {value!r} is not WIDTHxHEIGHT")
    return int(width), int(height)


def restore_settings(
    info: Infotext,
    *,
    img2img: bool,
    sampler_labels: Mapping[str, str],
    timestep_samplers: frozenset[str] = frozenset({"ddim", "plms", "unipc"}),
    model_hash: str | None = None,
    embedding_hashes: Mapping[str, str] | None = None,
    size_multiple: int = 64,
    find_lora: Callable[[str], tuple[str, str] | None] = lambda name: None,
) -> RestoredSettings:
    """Settings keyed ``prompt``, ``negative_prompt``, ``prompt_syntax``, ``steps``, ``sampler``, ``scale``,
    ``seed``, ``width``, ``height``, ``clip_skip``, ``strength`` (img2img), ``eta`` (DDIM's), ``loras``
    (``[(path, weight)]``), ``schedule`` (the sigma samplers' ``--schedule``), ``img2img_steps``, ``rng``,
    ``eta_ancestral``, ``ensd``, ``subseed``, ``subseed_strength``, ``seed_resize_from``, ``deepcache``,
    ``deepcache_branch``.

    ``sampler_labels`` maps the webui's labels (``"Euler a"``) to this tool's names (``"euler_a"``);
    ``model_hash`` is the checkpoint's (webui "Model hash"); ``embedding_hashes`` maps the textual-inversion
    embeddings available to their short hashes (webui "TI hashes"); ``find_lora`` gives the file a LoRA
    name means and its short hash (webui "Lora hashes"), or None.
    """
    fields = dict(info.fields)
    out = RestoredSettings()
    out.values.update(prompt=_restore_loras(info.prompt, fields, out, find_lora), negative_prompt=info.negative_prompt,
                      prompt_syntax=fields.pop("Prompt syntax", "webui"))
    if out.values["prompt_syntax"] not in ("fork", "webui"):
        out.ignored.append(f"Prompt syntax: {out.values['prompt_syntax']}")
        out.values["prompt_syntax"] = "webui"
    webui_version = _restore_version(fields, out, img2img)
    _restore_sampler(fields, out, sampler_labels, timestep_samplers, webui_version)
    _restore_noise(fields, out)
    for key, name, kind in (("Steps", "steps", int), ("CFG scale", "scale", float), ("Seed", "seed", int),
                            ("Clip skip", "clip_skip", int), ("Eta DDIM", "eta", float)):
        if key in fields:
            out.values[name] = _number(kind, key, fields.pop(key))
    if "Size" in fields:
        width, height = _size(fields["Size"])
        if width % size_multiple == 0 and height % size_multiple == 0:
            out.values["width"], out.values["height"] = width, height
            del fields["Size"]  # else it stays, and is named: this tool makes multiples of size_multiple
    if img2img and "Denoising strength" in fields:
        out.values["strength"] = _number(float, "Denoising strength", fields.pop("Denoising strength"))
    if not img2img:
        _restore_hires(fields, out)
    _restore_inpaint_area(fields, out)
    _check_environment(fields, out, model_hash, embedding_hashes)
    out.ignored.extend(f"{key}: {value}" for key, value in fields.items() if key not in _INFORMATIONAL)
    return out


def _restore_loras(prompt: str, fields: dict[str, str], out: RestoredSettings,
                   find_lora: Callable[[str], tuple[str, str] | None]) -> str:
    """The prompt without its ``<lora:...>`` tags; the files they name go to ``out.values["loras"]``."""
    try:
        text, tags = extract_lora_tags(prompt)
    except LoraError as error:
        raise FromPngError(f"--from_png: {error}") from None
    written = {}
    for pair in fields.pop("Lora hashes", "").split(","):
        name, _, short = pair.strip().rpartition(": ")
        if name:
            written[name] = short
    loras = []
    for name, weight in tags:
        found = find_lora(name)
        if found is None:
            out.ignored.append(f"<lora:{name}> (not found)")
            continue
        loras.append((found[0], weight))
        if written.get(name, found[1]) != found[1]:
            out.ignored.append(f"Lora hashes: {name} (another file)")
    tagged = {name for name, _ in tags}
    out.ignored.extend(f"Lora hashes: {name} (no <lora:{name}> tag in the prompt)" for name in written if name not in tagged)
    if loras:
        out.values["loras"] = loras
    return text.strip() if tags else prompt


def _restore_sampler(fields: dict[str, str], out: RestoredSettings, labels: Mapping[str, str],
                     timestep_samplers: frozenset[str], webui_version: tuple[int, int] | None = None) -> None:
    label = fields.pop("Sampler", None)
    schedule = fields.pop("Schedule type", None)
    if label is None:
        return
    for suffix in _SCHEDULE_SUFFIXES:
        if label.endswith(suffix) and label[: -len(suffix)] in labels:
            label, schedule = label[: -len(suffix)], suffix.strip()
    name = labels.get(label)
    if name is None:
        out.ignored.append(f"Sampler: {label}")
        return
    out.values["sampler"] = name
    if name in timestep_samplers:  # the webui's DDIM, PLMS, UniPC walk their own timesteps whatever it says
        return
    if schedule is None and webui_version is not None and webui_version < (1, 9):
        schedule = "Uniform"  # before v1.9 the label named the schedule: no suffix was k-diffusion's own grid
    found = find_schedule(schedule or "Automatic")
    if found is None:
        out.ignored.append(f"Schedule type: {schedule}")
    else:
        out.values["schedule"] = found.name


_RNG_MODES = {"CPU": "cpu", "GPU": "gpu", "NV": "gpu"}  # NV: the webui's GPU numbers computed off the GPU
_NOISE_FIELDS = (("Eta", "eta_ancestral", float), ("ENSD", "ensd", int), ("Eta noise seed delta", "ensd", int),
                 ("Variation seed", "subseed", int), ("Variation seed strength", "subseed_strength", float),
                 ("DeepCache", "deepcache", int), ("DeepCache branch", "deepcache_branch", int))  # the last two: --deepcache


def _restore_version(fields: dict[str, str], out: RestoredSettings, img2img: bool) -> tuple[int, int] | None:
    """The webui version that wrote the infotext ((major, minor), None for this tool's own or an unknown one); an
    img2img infotext of another program replays with the webui's step rule."""
    version = fields.pop("Version", None)
    if version is None or version.startswith("optimizedSD"):
        return None  # this tool's (older ones wrote no Version)
    if img2img:
        out.values["img2img_steps"] = "webui"
    found = re.search(r"v(\d+)\.(\d+)", version) or re.match(r"(\d+)\.(\d+)", version)  # "v1.8.0", Forge's "f0.0.17v1.8.0rc"
    return (int(found.group(1)), int(found.group(2))) if found else None


def _restore_noise(fields: dict[str, str], out: RestoredSettings) -> None:
    """``RNG`` (missing: the webui's GPU noise), the ancestral samplers' ``Eta``, ``ENSD`` and variation seeds."""
    rng = fields.pop("RNG", "GPU")
    if rng in _RNG_MODES:
        out.values["rng"] = _RNG_MODES[rng]
    else:
        out.ignored.append(f"RNG: {rng}")
    for key, name, kind in _NOISE_FIELDS:
        if key in fields:
            out.values[name] = _number(kind, key, fields.pop(key))
    resize = fields.pop("Seed resize from", None)
    if resize is not None and resize.strip() not in ("-1x-1", "0x0"):  # the webui writes -1x-1 for none
        width, height = _size(resize)
        out.values["seed_resize_from"] = f"{width}x{height}"
    if "Img2img steps" in fields and fields["Img2img steps"] in ("cut", "webui"):
        out.values["img2img_steps"] = fields.pop("Img2img steps")


def _check_environment(fields: dict[str, str], out: RestoredSettings, model_hash: str | None,
                       embedding_hashes: Mapping[str, str] | None) -> None:
    """Fields that must match how this tool runs: noise source, checkpoint, embeddings, emphasis."""
    written_hash = fields.pop("Model hash", None)
    if written_hash and model_hash and not model_hash.startswith(written_hash) and not written_hash.startswith(model_hash):
        out.ignored.append(f"Model hash: {written_hash} (the checkpoint given is {model_hash})")
    for key, default in (("Emphasis", "Original"),
                         ("Schedule max sigma", "0"), ("Schedule min sigma", "0"), ("Schedule rho", "0")):
        value = fields.pop(key, None)
        if value is not None and value != default and not _same_number(value, default):
            out.ignored.append(f"{key}: {value}")
    written = fields.pop("TI hashes", None)
    if written:
        available = embedding_hashes or {}
        for pair in written.split(","):
            name, _, short = pair.strip().rpartition(": ")
            if available.get(name) != short:
                out.ignored.append(f"TI hashes: {name or pair.strip()} ({'another file' if name in available else 'not found'})")


_HIRES_FIELDS = (("Hires upscale", "hires_scale", float), ("Hires steps", "hires_steps", int),
                 ("Hires sampler", "hires_sampler", str), ("Hires schedule type", "hires_schedule", str),
                 ("Hires prompt", "hires_prompt", str), ("Hires negative prompt", "hires_negative_prompt", str))


def _restore_hires(fields: dict[str, str], out: RestoredSettings) -> None:
    """txt2img's hires fix, on as the webui's paste turns it on: ``Denoising strength`` with ``Hires upscale``,
    ``Hires upscaler`` or ``Hires resize``. An upscaler this tool does not have (ESRGAN models) is named and the
    default latent one used."""
    if "Denoising strength" not in fields or not {"Hires upscale", "Hires upscaler", "Hires resize"} & set(fields):
        return
    out.values["hires_strength"] = _number(float, "Denoising strength", fields.pop("Denoising strength"))
    for key, name, kind in _HIRES_FIELDS:
        if key in fields:
            out.values[name] = _number(kind, key, fields.pop(key))
    if "Hires resize" in fields:
        width, height = _size(fields.pop("Hires resize"))
        out.values["hires_resize"] = f"{width}x{height}"
        out.values.pop("hires_scale", None)
    elif "hires_scale" not in out.values:
        out.values["hires_scale"] = 2.0  # the webui's default
    upscaler = fields.pop("Hires upscaler", "Latent")
    if find_upscaler(upscaler) is not None:
        out.values["hires_upscaler"] = upscaler
    else:
        out.ignored.append(f"Hires upscaler: {upscaler} (not available here: Latent used)")


_MASKED_CONTENT = {"original": "original", "fill": "fill", "latent noise": "latent_noise",
                   "latent nothing": "latent_nothing"}


def _restore_inpaint_area(fields: dict[str, str], out: RestoredSettings) -> None:
    """Inpainting's ``Inpaint area: Only masked``, ``Masked area padding`` and ``Masked content`` (the webui writes
    each only when not its default: whole picture, original)."""
    area = fields.pop("Inpaint area", None)
    if area is not None:
        out.values["inpaint_area"] = "only_masked" if area == "Only masked" else "whole"
    if "Masked area padding" in fields:
        out.values["only_masked_padding"] = _number(int, "Masked area padding", fields.pop("Masked area padding"))
    content = fields.pop("Masked content", None)
    if content is not None and content in _MASKED_CONTENT:
        out.values["masked_content"] = _MASKED_CONTENT[content]
    elif content is not None:
        out.ignored.append(f"Masked content: {content}")


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return False
