"""Prompts: reading them, weighting them, and turning them into conditioning tensors.

Weighted prompts follow the optimizedSD fork (basujindal/stable-diffusion, ``split_weighted_subprompts``,
itself from lstein's ``simplet2i.py``): ``tabby cat:0.25 white duck:0.75 hybrid`` is the sub-prompts
``tabby cat`` (0.25), ``white duck`` (0.75) and ``hybrid`` (1). A colon ends a sub-prompt; the number
right after it, up to the next space, is its weight; text after the last colon-number weighs 1. The
conditioning is ``sum(w_i * E(p_i)) / sum(w_i)`` with ``E`` the CLIP text encoder.

Two deliberate differences from the fork, both where the fork misbehaves:
- A colon followed by something that is not a number (``cat:abc``, ``10:30am``) is plain text; the fork
  printed a warning and silently dropped the word after the colon.
- A single weighted sub-prompt (``cat:0.5``) encodes ``cat``; the fork encoded the raw text ``cat:0.5``.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from ldm.errors import UserError

log = logging.getLogger(__name__)
ENCODE_CHUNK = 32  # sub-prompts per text-encoder call

# A weight: an optionally signed decimal number with an optional exponent ("inf"/"nan" are not weights).
_WEIGHT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


class PromptError(UserError, ValueError):
    """A prompt or prompts file the generator cannot use (reported to the user in one line)."""


@dataclass(frozen=True)
class WeightedPrompt:
    """A prompt split into sub-prompts and their (unnormalised) weights."""

    parts: tuple[tuple[str, float], ...]

    @property
    def total_weight(self) -> float:
        return sum(weight for _, weight in self.parts)

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(text for text, _ in self.parts)


def split_weighted_subprompts(text: str) -> list[tuple[str, float]]:
    """Split ``text`` into ``(sub_prompt, weight)`` pairs (the optimizedSD fork's syntax; see the module doc).

    >>> split_weighted_subprompts("tabby cat:0.25 white duck:0.75 hybrid")
    [('tabby cat', 0.25), ('white duck', 0.75), ('hybrid', 1.0)]
    >>> split_weighted_subprompts("cat:abc")
    [('cat:abc', 1.0)]
    """
    parts: list[tuple[str, float]] = []
    pending = ""  # text of the current sub-prompt, possibly holding colons that were not weights
    rest = text
    while ":" in rest:
        idx = rest.index(":")
        before, after = rest[:idx], rest[idx + 1 :]
        space = after.find(" ")
        token = after if space == -1 else after[:space]
        remainder = "" if space == -1 else after[space + 1 :]
        if token == "":
            # "cat: dog" or "cat:" - the fork's weight-1 separator
            parts.append(((pending + before).strip(), 1.0))
            pending, rest = "", remainder
        elif _WEIGHT.fullmatch(token):
            parts.append(((pending + before).strip(), float(token)))
            pending, rest = "", remainder
        else:
            # not a number: the colon is part of the text; keep scanning after it
            pending += before + ":"
            rest = after
    tail = (pending + rest).strip()
    if tail or not parts:
        parts.append((tail, 1.0))
    return parts


def parse_prompt(text: str) -> WeightedPrompt:
    """Parse a (possibly weighted) prompt; weights summing to zero are an error (the fork divided by zero)."""
    prompt = WeightedPrompt(tuple(split_weighted_subprompts(text)))
    total = prompt.total_weight
    if not math.isfinite(total) or abs(total) < 1e-12:
        raise PromptError(f"the weights of prompt {text!r} sum to {total:g}; they must sum to a finite, non-zero number")
    return prompt


def read_prompts_file(path: str | os.PathLike) -> list[str]:
    """One prompt a line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptError(f"prompts file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PromptError(f"cannot read prompts file {path}: {error}") from None
    prompts = [line.strip() for line in raw.splitlines()]
    prompts = [line for line in prompts if line and not line.startswith("#")]
    if not prompts:
        raise PromptError(f"prompts file {path} holds no prompts (blank lines and # comments are skipped)")
    return prompts


def checkpoint_fingerprint(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """A cheap identity for a checkpoint file: sha256 of its size, first MB and last MB.

    Good enough to key cached text encodings (a different checkpoint of the same size differs in its first
    or last megabyte in practice), and costs two reads instead of hashing gigabytes.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        digest.update(str(size).encode())
        digest.update(handle.read(chunk))
        if size > chunk:
            handle.seek(max(chunk, size - chunk))
            digest.update(handle.read(chunk))
    return digest.hexdigest()


class EmbeddingCache:
    """Text encodings kept on disk between runs (the idea of the prompt caches of SD front ends).

    One safetensors file per (checkpoint, dtype, text): ``<dir>/<sha256>.safetensors`` holding ``[77, D]``.
    A file that cannot be read is ignored and rewritten.
    """

    def __init__(self, directory: str | os.PathLike, checkpoint_key: str, dtype: torch.dtype) -> None:
        self.directory = Path(directory)
        self.checkpoint_key = checkpoint_key
        self.dtype_name = str(dtype).removeprefix("torch.")
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, text: str) -> Path:
        key = hashlib.sha256("\0".join((self.checkpoint_key, self.dtype_name, text)).encode("utf-8")).hexdigest()
        return self.directory / f"{key}.safetensors"

    def get(self, text: str) -> torch.Tensor | None:
        from safetensors.torch import load_file

        path = self._path(text)
        if not path.is_file():
            return None
        try:
            return load_file(str(path))["encoding"]
        except Exception as error:  # a torn or foreign file: recompute rather than fail the run
            log.warning("ignoring unreadable cached encoding %s: %s", path, error)
            return None

    def put(self, text: str, encoding: torch.Tensor) -> None:
        from safetensors.torch import save_file

        path = self._path(text)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        try:
            save_file({"encoding": encoding.detach().to("cpu").contiguous()}, str(tmp))
            os.replace(tmp, path)  # atomic: a concurrent reader never sees half a file
        except OSError as error:  # the cache is an optimisation: a full disk must not stop the run
            tmp.unlink(missing_ok=True)
            log.warning("embedding cache: cannot write %s (%s)", path, error)


class PromptEncoder:
    """Turns prompts into conditioning, running the text encoder once per distinct sub-prompt text.

    ``encode_texts`` is a callable ``list[str] -> Tensor[B, 77, D]`` (the text encoder); encodings are
    memoised in memory for the run and, with ``cache``, on disk across runs.
    """

    def __init__(self, cache: EmbeddingCache | None = None) -> None:
        self.cache = cache
        self._memory: dict[str, torch.Tensor] = {}
        self.encoder_calls = 0  # texts actually run through the text encoder (tests check the memoisation)

    def missing(self, prompts: Iterable[str]) -> list[str]:
        """Sub-prompt texts of ``prompts`` not known yet (in memory or, if given, the disk cache)."""
        needed: list[str] = []
        for prompt in prompts:
            for text in parse_prompt(prompt).texts:
                if text in self._memory or text in needed:
                    continue
                cached = self.cache.get(text) if self.cache is not None else None
                if cached is not None:
                    self._memory[text] = cached
                else:
                    needed.append(text)
        return needed

    def encode_missing(self, prompts: Iterable[str], encode_texts: Callable[[list[str]], torch.Tensor]) -> None:
        """Run the text encoder on every sub-prompt text of ``prompts`` not known yet."""
        needed = self.missing(prompts)
        if not needed:
            return
        with torch.no_grad():  # in chunks: a long prompts file must not become one huge CLIP batch
            encodings = torch.cat([encode_texts(needed[i : i + ENCODE_CHUNK]) for i in range(0, len(needed), ENCODE_CHUNK)])
        self.encoder_calls += len(needed)
        for text, encoding in zip(needed, encodings):
            # Kept on the host; a simulated run (the VRAM ledger, on meta) has no host copy to make.
            encoding = encoding.detach() if encoding.is_meta else encoding.detach().to("cpu")
            self._memory[text] = encoding
            if self.cache is not None:
                self.cache.put(text, encoding)

    def conditioning(self, prompt: str) -> torch.Tensor:
        """``[77, D]`` conditioning of one (weighted) prompt: the weighted mean of its sub-prompt encodings."""
        weighted = parse_prompt(prompt)
        if len(weighted.parts) == 1:
            return self._memory[weighted.parts[0][0]]
        total = weighted.total_weight
        result = torch.zeros_like(self._memory[weighted.parts[0][0]], dtype=torch.float32)
        for text, weight in weighted.parts:
            result += self._memory[text].float() * (weight / total)
        return result.to(self._memory[weighted.parts[0][0]].dtype)

    def batch(self, prompt: str, batch_size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``[batch_size, 77, D]`` conditioning for one prompt on ``device``."""
        cond = self.conditioning(prompt).to(device=device, dtype=dtype)
        return cond.unsqueeze(0).expand(batch_size, *cond.shape).contiguous()


def distinct(prompts: Sequence[str]) -> list[str]:
    """``prompts`` without repeats, first occurrence order kept."""
    return list(dict.fromkeys(prompts))
