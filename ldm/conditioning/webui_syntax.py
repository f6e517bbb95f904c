"""The prompt syntax of AUTOMATIC1111's stable-diffusion-webui (``--prompt_syntax webui``).

Emphasis, as the webui's ``modules/prompt_parser.py::parse_prompt_attention`` reads it:

- ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1;
- ``(text:1.3)`` multiplies it by 1.3 (spaces allowed around the number: ``(text : 1.3 )``);
- brackets nest and their factors multiply: ``((text))`` is 1.21;
- ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are the literal characters;
- a bracket never closed applies its factor to everything after it (``(unbalanced`` is 1.1); a closing
  bracket that closes nothing, and a colon outside ``(...:number)``, are plain text;
- ``BREAK`` (the word, in capitals) ends the current 75-token chunk and starts the next one. Inside
  brackets the webui multiplies BREAK's marker weight too, after which it is no longer a marker but the
  word "BREAK" with weight -1.1: reproduced here, so that the same text gives the same conditioning.

The weights multiply the text encoder's hidden states of the tokens, then each chunk's mean is restored
(:meth:`ldm.conditioning.text_encoder.CLIPTextEncoder.encode_chunks`). The webui's prompt editing
(``[from:to:when]``, ``[a|b]``) and composable diffusion (``AND``) are not implemented: such text is read
as the emphasis parser reads it, and :func:`unsupported_features` names them for a warning.
"""

from __future__ import annotations

import re

from ldm.conditioning.token_chunks import Fragment

ROUND_FACTOR = 1.1
SQUARE_FACTOR = 1 / 1.1
_BREAK_MARKER = ("BREAK", -1.0)  # the webui's in-band marker for BREAK

# One alternative per kind of piece, tried in this order at each position.
_PIECE = re.compile(
    r"""
      (?P<escape>\\[()\[\]\\]?)                  # \( \) \[ \] \\ ; a lone backslash vanishes
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)          # the end of (text:1.3)
    | (?P<close>[)\]])
    | (?P<text>[^\\()\[\]:]+)
    | (?P<colon>:)
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


class WebuiSyntaxError(ValueError):
    """A weight the webui's parser matches but that is no number (``(cat:1.2.3)``)."""


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """``text`` as ``[(piece, weight), ...]`` in the webui's own representation (``("BREAK", -1.0)`` marks a BREAK).

    Runs of equal weight are merged, and an empty prompt is ``[("", 1.0)]``, as in the webui:

    >>> parse_prompt_attention("an (important) word")
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    >>> parse_prompt_attention(r"\\(literal\\]")
    [('(literal]', 1.0)]
    """
    pieces: list[list] = []  # [text, weight], mutable while brackets close
    open_round: list[int] = []  # index into pieces where each unclosed bracket starts
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _PIECE.finditer(text):
        token = match.group(0)
        if match.group("escape") is not None:
            pieces.append([token[1:], 1.0])
        elif match.group("open") is not None:
            (open_round if token == "(" else open_square).append(len(pieces))
        elif match.group("weight") is not None and open_round:
            scale_from(open_round.pop(), _number(match.group("weight"), text))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_FACTOR)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_FACTOR)
        else:  # plain text, including brackets and colons that close or weigh nothing
            for index, part in enumerate(_BREAK.split(token)):
                if index:
                    pieces.append(list(_BREAK_MARKER))
                pieces.append([part, 1.0])
    for start in open_round:  # brackets never closed weigh from where they opened to the end
        scale_from(start, ROUND_FACTOR)
    for start in open_square:
        scale_from(start, SQUARE_FACTOR)
    return _merge_equal_weights(pieces)


def _number(digits: str, prompt: str) -> float:
    try:
        return float(digits)
    except ValueError:
        raise WebuiSyntaxError(f"{digits!r} in prompt {prompt!r} is not a number (webui syntax: (text:1.3))") from None


def _merge_equal_weights(pieces: list[list]) -> list[tuple[str, float]]:
    merged: list[list] = []
    for text, weight in pieces:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(text, weight) for text, weight in merged] or [("", 1.0)]


def parse_fragments(text: str) -> list[Fragment]:
    """``text`` as the fragments the chunked text encoder takes (a BREAK becomes a chunk break)."""
    return [
        Fragment("", 1.0, breaks_chunk=True) if (piece, weight) == _BREAK_MARKER else Fragment(piece, weight)
        for piece, weight in parse_prompt_attention(text)
    ]


# Webui features outside emphasis, recognised only to say that they are read as plain text.
_UNSUPPORTED = (
    (re.compile(r"\[[^\[\]]*:[^\[\]]*:\s*[\d.]+\s*\]|\[[^\[\]:]*:\s*[\d.]+\s*\]"), "prompt editing [from:to:when]"),
    (re.compile(r"\[[^\[\]]*\|[^\[\]]*\]"), "alternation [a|b]"),
    (re.compile(r"\bAND\b"), "composable diffusion (AND)"),
)


def unsupported_features(text: str) -> list[str]:
    """Names of webui prompt features in ``text`` that this tool reads as plain text."""
    return [name for pattern, name in _UNSUPPORTED if pattern.search(text)]
