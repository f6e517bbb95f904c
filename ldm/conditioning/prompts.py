"""Prompts turned into conditioning tensors, in either syntax, each distinct text through the text encoder once.

``fork`` (the default) reads the optimizedSD fork's weighted sub-prompts (:mod:`ldm.conditioning.fork_syntax`);
``--prompt_syntax webui`` reads prompts as AUTOMATIC1111's webui does instead (:mod:`ldm.conditioning.webui_syntax`:
``(word:1.3)`` weighs tokens, not sub-prompts). In both syntaxes a text longer than 75 tokens is encoded
in 75-token chunks and concatenated (:mod:`ldm.conditioning.token_chunks`), where the fork cut it at 77 tokens.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Iterable, Protocol, Sequence

import torch

from ldm.conditioning.embedding_cache import EmbeddingCache
from ldm.conditioning.fork_syntax import parse_prompt
from ldm.conditioning.errors import PromptError
from ldm.conditioning.embeddings import EmbeddingLibrary, TextualInversion
from ldm.conditioning.token_chunks import CHUNK_TOKENS, Fragment, TokenChunk
from ldm.conditioning.webui_syntax import WebuiSyntaxError, parse_fragments

log = logging.getLogger(__name__)
ENCODE_CHUNK = 32  # 77-token chunks per text-encoder call
SYNTAXES = ("fork", "webui")
EMPTY_PROMPT = ""  # its encoding pads shorter contexts
CHUNKING_VERSION = "chunks-v1"  # part of the cache key: encodings made before chunking were cut at 77 tokens

# Characters (or the word BREAK) that the webui's syntax reads otherwise than the fork's.
_FORK_DIFFERS = re.compile(r"[()\[\]:\\]|\bBREAK\b")


def _on_host(encoding: torch.Tensor) -> torch.Tensor:
    """Encodings are kept on the host; a simulated run (the VRAM ledger, on meta) has no host copy to make."""
    return encoding.detach() if encoding.is_meta else encoding.detach().to("cpu")


class PromptEncoder:
    """Turns prompts into conditioning, running the text encoder once per distinct text it needs.

    ``syntax``: ``fork`` (the default; the weighted sub-prompts above, each encoded on its own) or
    ``webui`` (:mod:`ldm.conditioning.webui_syntax`: per-token emphasis, BREAK). In both, a text longer than
    75 tokens is encoded in 75-token chunks (:mod:`ldm.conditioning.token_chunks`) into a ``[77 * chunks, D]``
    context. ``clip_skip`` and ``embeddings`` (textual inversion) go to the text encoder. Encodings are
    memoised in memory for the run and, with ``cache``, on disk across runs, under a key that holds
    everything that changes them (syntax, clip skip, the embeddings, the chunking, and ``weights_key``:
    whatever changed the text encoder's weights after loading, such as LoRA files and their weights).
    ``chunker`` (the text encoder, only its tokenizer is used) says what shape a text's encoding has, so that a
    cached entry of another shape is computed again, not used; without it only the entry's rank is checked.

    Contexts of different lengths (a long prompt, a short negative prompt; sub-prompts of a weighted
    fork prompt) are padded to the longest with chunks of the empty prompt's encoding, as the webui's
    "Pad prompt/negative prompt" option does (its infotext: ``Pad conds: True``).
    """

    def __init__(
        self,
        cache: EmbeddingCache | None = None,
        *,
        syntax: str = "fork",
        clip_skip: int = 1,
        embeddings: EmbeddingLibrary | None = None,
        weights_key: str = "",
        chunker: ChunkEncoder | None = None,
    ) -> None:
        if syntax not in SYNTAXES:
            raise ValueError(f"prompt syntax must be one of {SYNTAXES}, got {syntax!r}")
        self.cache = cache
        self.syntax = syntax
        self.clip_skip = clip_skip
        self.embeddings = embeddings
        self.chunker = chunker
        fingerprint = embeddings.fingerprint() if embeddings is not None and len(embeddings) else ""
        self.variant = (f"{CHUNKING_VERSION}|syntax={syntax}|clip_skip={clip_skip}|embeddings={fingerprint}"
                        f"|weights={weights_key}")
        self._memory: dict[str, torch.Tensor] = {}
        self._not_cached: set[str] = set()  # texts the disk cache did not have (or had unusable)
        self._chunked: dict[str, list[TokenChunk]] = {}  # the chunker's chunks of each text
        self.encoder_calls = 0  # texts actually run through the text encoder (tests check the memoisation)

    # ---- what a prompt is made of ----------------------------------------------------------------
    def units(self, prompt: str) -> tuple[tuple[str, float], ...]:
        """The texts encoded on their own for ``prompt``, with their weights in the mean."""
        if self.syntax == "fork":
            return parse_prompt(prompt).parts
        return ((prompt, 1.0),)

    def fragments(self, text: str) -> list[Fragment]:
        """One unit's text as weighted fragments for the chunked text encoder."""
        if self.syntax == "fork":
            return [Fragment(text)]
        try:
            return parse_fragments(text)
        except WebuiSyntaxError as error:
            raise PromptError(str(error)) from None

    def check(self, prompt: str) -> None:
        """Raise :class:`PromptError` now for a prompt that cannot be encoded (before any model loads)."""
        for text, _ in self.units(prompt):
            self.fragments(text)

    def embeddings_used(self, prompts: Iterable[str]) -> list[TextualInversion]:
        """The textual-inversion embeddings these prompts name (for the ``TI hashes`` metadata)."""
        if self.embeddings is None or not len(self.embeddings):
            return []
        token_lists = [
            self.embeddings.tokenize(fragment.text)
            for prompt in prompts
            for text, _ in self.units(prompt)
            for fragment in self.fragments(text)
            if not fragment.breaks_chunk
        ]
        return self.embeddings.used_in(token_lists)

    def infotext_fields(self, prompt: str, negative_prompt: str) -> dict[str, str]:
        """The webui infotext fields that say how ``prompt`` / ``negative_prompt`` were encoded (call after encoding).

        ``Clip skip`` when not 1; ``TI hashes`` (``name: first 12 hex digits of the file's sha256``, as the webui);
        ``Pad conds: True`` when the two contexts were padded to one length (the webui pads only with that
        option); ``Prompt syntax: fork`` when the fork's reading differs from the webui's (any of ``( ) [ ] : \\``
        or BREAK in the text): without the field, a reader takes the webui's syntax.
        """
        fields: dict[str, str] = {}
        if self.clip_skip != 1:
            fields["Clip skip"] = str(self.clip_skip)
        used = self.embeddings_used([prompt, negative_prompt])
        if used:
            fields["TI hashes"] = ", ".join(
                f"{e.name.replace(':', '').replace(',', '')}: {e.shorthash}" for e in used)
        lengths = {self.context_length(text) for text in (prompt, negative_prompt) if self._known(text)}
        if len(lengths) > 1:
            fields["Pad conds"] = "True"
        if self.syntax == "fork" and _FORK_DIFFERS.search(prompt + "\n" + negative_prompt):
            fields["Prompt syntax"] = "fork"
        return fields

    def _known(self, prompt: str) -> bool:
        return all(text in self._memory for text, _ in self.units(prompt))

    # ---- encoding ----------------------------------------------------------------------------------
    def missing(self, prompts: Iterable[str]) -> list[str]:
        """Texts of ``prompts`` not known yet (in memory or, if given, the disk cache).

        Also the empty prompt when the known encodings differ in length and it is needed as padding.
        """
        prompts = list(prompts)
        needed: list[str] = []
        for prompt in prompts:
            for text, _ in self.units(prompt):
                if text not in needed and not self._recall(text):
                    needed.append(text)
        if not needed and self._needs_padding(prompts) and not self._recall(EMPTY_PROMPT):
            needed.append(EMPTY_PROMPT)
        return needed

    def encode_missing(self, prompts: Iterable[str], text_encoder: ChunkEncoder) -> None:
        """Run the text encoder on every text of ``prompts`` not known yet (and the padding, if needed)."""
        prompts = list(prompts)
        text_encoder = _chunk_encoder(text_encoder)
        needed = self.missing(prompts)
        if needed:
            self._encode(needed, text_encoder)
        if self._needs_padding(prompts) and not self._recall(EMPTY_PROMPT):
            self._encode([EMPTY_PROMPT], text_encoder)  # its own call: the batches above stay as before

    def _chunks(self, text: str, text_encoder: ChunkEncoder) -> list[TokenChunk]:
        """``text`` cut into chunks; once per text with the ``chunker`` (a cache check, then its encoding)."""
        mine = text_encoder is self.chunker
        if mine and text in self._chunked:
            return self._chunked[text]
        find = self.embeddings.find if self.embeddings is not None and len(self.embeddings) else None
        chunks = text_encoder.chunk_prompt(self.fragments(text), find)
        if mine:
            self._chunked[text] = chunks
        return chunks

    def _encode(self, texts: list[str], text_encoder: ChunkEncoder) -> None:
        chunked = [self._chunks(text, text_encoder) for text in texts]
        rows = [chunk for chunks in chunked for chunk in chunks]
        with torch.no_grad():  # in batches: a long prompts file must not become one huge CLIP batch
            encoded = torch.cat([
                _on_host(text_encoder.encode_chunks(rows[i : i + ENCODE_CHUNK], self.clip_skip))
                for i in range(0, len(rows), ENCODE_CHUNK)
            ])
        self.encoder_calls += len(texts)
        first = 0
        for text, chunks in zip(texts, chunked):
            encoding = encoded[first : first + len(chunks)].reshape(-1, encoded.shape[-1])
            first += len(chunks)
            self._memory[text] = encoding
            if self.cache is not None:
                self.cache.put(self._cache_key(text), encoding)

    def _recall(self, text: str) -> bool:
        if text in self._memory:
            return True
        if self.cache is None or text in self._not_cached:
            return False
        cached = self.cache.get(self._cache_key(text), self._shape(text))
        if cached is None:
            self._not_cached.add(text)  # asked once: a bad entry is counted once, and read once
            return False
        self._memory[text] = cached
        return True

    def _shape(self, text: str) -> tuple[int | None, int | None]:
        """``(77 * chunks, D)`` of ``text``'s encoding, as far as the ``chunker`` tells (None: not known)."""
        if self.chunker is None:
            return (None, None)
        config = getattr(self.chunker, "config", None)
        rows = (CHUNK_TOKENS + 2) * len(self._chunks(text, self.chunker))  # start and end token: 77 a chunk
        return (rows, getattr(config, "hidden_size", None))

    def _cache_key(self, text: str) -> str:
        return f"{self.variant}\0{text}"

    def _needs_padding(self, prompts: Sequence[str]) -> bool:
        lengths = {self._memory[text].shape[0] for p in prompts for text, _ in self.units(p) if text in self._memory}
        return len(lengths) > 1

    # ---- conditioning ------------------------------------------------------------------------------
    def chunk_count(self, *prompts: str) -> int:
        """The 77-token chunks of the longest text among ``prompts``, from the ``chunker``'s tokenizer alone (nothing
        is encoded, so it works before the text encoder's weights are loaded): :meth:`context_length` over 77."""
        return max(len(self._chunks(text, self.chunker)) for prompt in prompts for text, _ in self.units(prompt))

    def context_length(self, *prompts: str) -> int:
        """Tokens (77 per chunk) of the longest encoding among ``prompts``: the length to pad them to."""
        return max(self._memory[text].shape[0] for prompt in prompts for text, _ in self.units(prompt))

    def conditioning(self, prompt: str, length: int | None = None) -> torch.Tensor:
        """``[length, D]`` conditioning of one prompt; for fork's weighted prompts the weighted mean of its
        sub-prompts' encodings. ``length`` (a multiple of 77) pads with the empty prompt's chunks."""
        units = self.units(prompt)
        length = self.context_length(prompt) if length is None else length
        if len(units) == 1:
            return self._padded(units[0][0], length)
        total = sum(weight for _, weight in units)
        first = self._padded(units[0][0], length)
        result = torch.zeros_like(first, dtype=torch.float32)
        for text, weight in units:
            result += self._padded(text, length).float() * (weight / total)
        return result.to(first.dtype)

    def _padded(self, text: str, length: int) -> torch.Tensor:
        encoding = self._memory[text]
        extra = length - encoding.shape[0]
        if extra == 0:
            return encoding
        chunk = self._memory[EMPTY_PROMPT]
        if extra < 0 or extra % chunk.shape[0]:
            raise ValueError(f"cannot pad a {encoding.shape[0]}-token encoding to {length} tokens")
        return torch.cat([encoding, chunk.repeat(extra // chunk.shape[0], 1)])

    def batch(
        self, prompt: str, batch_size: int, device: torch.device, dtype: torch.dtype, length: int | None = None
    ) -> torch.Tensor:
        """``[batch_size, length, D]`` conditioning for one prompt on ``device`` (see :meth:`conditioning`)."""
        cond = self.conditioning(prompt, length).to(device=device, dtype=dtype)
        return cond.unsqueeze(0).expand(batch_size, *cond.shape).contiguous()


class ChunkEncoder(Protocol):
    """What :class:`PromptEncoder` needs of the text encoder (``ldm.conditioning.text_encoder.CLIPTextEncoder``)."""

    def chunk_prompt(self, fragments: Sequence[Fragment], find_embedding: Any = None) -> list[TokenChunk]: ...

    def encode_chunks(self, chunks: Sequence[TokenChunk], clip_skip: int = 1) -> torch.Tensor: ...


def _chunk_encoder(text_encoder: Any) -> ChunkEncoder:
    """The text encoder itself; callers written before chunking pass its bound ``encode`` method."""
    owner = getattr(text_encoder, "__self__", None)
    return owner if owner is not None and hasattr(owner, "encode_chunks") else text_encoder


def distinct(prompts: Sequence[str]) -> list[str]:
    """``prompts`` without repeats, first occurrence order kept."""
    return list(dict.fromkeys(prompts))
