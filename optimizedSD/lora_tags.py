"""The run's LoRA list: ``--lora FILE[:WEIGHT]`` and, with ``--prompt_syntax webui``, the webui's
``<lora:NAME:WEIGHT>`` prompt tags.

As in AUTOMATIC1111's webui (``modules/extra_networks.py``): every ``<kind:args>`` tag of a prompt is removed
from the text the text encoder reads; ``lora`` (and its alias ``lyco``) tags name a file in ``--lora_dir``
by its name without suffix. The negative prompt is read as written (the webui parses extra networks in
prompts only). LoRAs are merged once, into the loaded weights (:func:`ldm.loading.lora.apply_loras`), so all prompts
of a run must name the same ones; a prompts file whose prompts name different LoRAs is refused.

The images' metadata records each LoRA as the webui records one it adds itself (its "Add network to prompt"
option): the tag appended to the prompt, and the ``Lora hashes`` field. ``--from_png`` turns those tags back
into LoRAs (``optimizedSD.from_png``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ldm.loading.lora import extract_lora_tags, find_lora_file, other_extra_networks
from ldm.loading.errors import LoraError
from ldm.errors import UsageError
from ldm.pipeline.request import GenerationRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunLora:
    """One LoRA of the run: its file, its weight, and the name the metadata gives it (the tag's NAME, or the
    file's name without suffix for ``--lora``)."""

    path: Path
    weight: float
    name: str


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """The prompt without its extra-network tags and its ``<lora:NAME:WEIGHT>`` tags, a bad tag as one line."""
    try:
        return extract_lora_tags(prompt)
    except LoraError as error:
        raise UsageError(str(error)) from None


def collect_loras(request: GenerationRequest, prompts: list[str]) -> tuple[list[str], tuple[RunLora, ...]]:
    """``prompts`` as the text encoder reads them, and the run's LoRAs in merge order (``--lora`` first)."""
    loras = [RunLora(path, weight, path.stem) for path, weight in request.loras]
    if request.prompt_syntax != "webui":
        return prompts, tuple(loras)
    texts: list[str] = []
    first_with: dict[tuple[tuple[str, float], ...], str] = {}  # each distinct tag list, with a prompt that has it
    others = sorted({tag for prompt in prompts for tag in other_extra_networks(prompt)})
    if others:
        log.warning("not implemented, removed from the prompt (as the webui does with networks it lacks): %s",
                    ", ".join(others))
    for prompt in prompts:
        text, tags = split_lora_tags(prompt)
        texts.append(text.strip() if text != prompt else prompt)  # the text encoder drops the edges' spaces too
        first_with.setdefault(tuple(tags), prompt)
    if len(first_with) > 1:
        (tags_a, prompt_a), (tags_b, prompt_b) = list(first_with.items())[:2]
        raise UsageError(
            f"the prompts name different LoRAs ({_describe(tags_a)} in {prompt_a!r}, {_describe(tags_b)} in {prompt_b!r}): "
            "LoRAs are merged into the weights once per run, so run such prompts separately")
    for name, weight in next(iter(first_with), ()):
        try:
            loras.append(RunLora(find_lora_file(name, request.lora_dir), weight, name))
        except LoraError as error:
            raise UsageError(f"{error} (--lora_dir)") from None
    return texts, tuple(loras)


def _describe(tags: tuple[tuple[str, float], ...]) -> str:
    return " ".join(lora_tag(name, weight) for name, weight in tags) or "no <lora:...> tag"


def lora_tag(name: str, weight: float) -> str:
    """``<lora:NAME:WEIGHT>``, the weight as short as it reads back exactly."""
    short = f"{weight:g}"
    return f"<lora:{name}:{short if float(short) == weight else repr(weight)}>"


def metadata_prompt(prompt: str, loras: tuple[RunLora, ...]) -> str:
    """The prompt as the metadata records it: the text encoded, then one tag per LoRA, as the webui appends a
    LoRA it adds (so a prompt typed with its tags last reads back as it was typed)."""
    return " ".join([prompt, *(lora_tag(lora.name, lora.weight) for lora in loras)]) if loras else prompt
