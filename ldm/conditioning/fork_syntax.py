"""The optimizedSD fork's weighted prompts: sub-prompts and their weights.

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

import math
import re
from dataclasses import dataclass

from ldm.conditioning.errors import PromptError

# A weight: an optionally signed decimal number with an optional exponent ("inf"/"nan" are not weights).
_WEIGHT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")




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
