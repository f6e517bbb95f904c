"""Prompts of any length as 77-token chunks for CLIP, the way AUTOMATIC1111's webui cuts them.

CLIP's text transformer has 77 positions. A prompt is split into chunks of 75 BPE tokens; each chunk
gets its own ``<|startoftext|>`` and ``<|endoftext|>`` (and end-token padding), is encoded on its own,
and the chunks' hidden states are concatenated into a ``[77 * n, D]`` context (the UNet's
cross-attention takes any context length). This is the webui's ``sd_hijack_clip.py`` scheme:

- a chunk is full at 75 tokens; if the token that does not fit comes within ``comma_backtrack`` (20, the
  webui's default ``comma_padding_backtrack``) tokens after a comma, the words after that comma move to
  the next chunk, so that a comma-separated phrase is not cut in two;
- ``BREAK`` closes the current chunk early;
- a textual-inversion embedding (n vectors) is never split: if it does not fit, the chunk is closed first;
  its placeholder positions hold token 0 and are overwritten with its vectors at the embedding layer.

A prompt of at most 75 tokens is one chunk whose ids are exactly those of the usual 77-token
tokenization, so its encoding does not change.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

import torch

CHUNK_TOKENS = 75  # BPE tokens per chunk; plus start and end = CLIP's 77 positions
COMMA_BACKTRACK = 20  # the webui's default "comma_padding_backtrack"
PLACEHOLDER_ID = 0  # token id under an embedding's vectors (the webui uses 0 too)


@dataclass(frozen=True)
class Fragment:
    """A run of prompt text with one emphasis weight, or (``breaks_chunk``) a BREAK."""

    text: str
    weight: float = 1.0
    breaks_chunk: bool = False


class Embedding(Protocol):
    """What the chunker needs of a textual-inversion embedding: its vectors ``[n, D]``."""

    name: str
    vectors: torch.Tensor


FindEmbedding = Callable[[Sequence[int], int], "tuple[Embedding, int] | None"]
"""``find(tokens, position) -> (embedding, tokens its name spans)``, or None when none starts there."""


@dataclass
class TokenChunk:
    """77 token ids with their emphasis weights, and the embeddings to place at given offsets."""

    ids: list[int] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    embeddings: list[tuple[int, Embedding]] = field(default_factory=list)  # (offset in ids, embedding)


class _ChunkWriter:
    """Fills chunks token by token (the webui's ``tokenize_line``), closing them when full."""

    def __init__(self, start_id: int, end_id: int, comma_id: int | None, comma_backtrack: int) -> None:
        self.start_id, self.end_id, self.comma_id = start_id, end_id, comma_id
        self.comma_backtrack = comma_backtrack
        self.chunks: list[TokenChunk] = []
        self.current = TokenChunk()
        self.last_comma = -1  # index in the current chunk of its last comma

    def close(self) -> None:
        """Pad the current chunk to 75 with end tokens, wrap it in start/end, start a new one."""
        chunk = self.current
        missing = CHUNK_TOKENS - len(chunk.ids)
        chunk.ids = [self.start_id, *chunk.ids, *[self.end_id] * missing, self.end_id]
        chunk.weights = [1.0, *chunk.weights, *[1.0] * missing, 1.0]
        chunk.embeddings = [(offset + 1, embedding) for offset, embedding in chunk.embeddings]
        self.chunks.append(chunk)
        self.current = TokenChunk()
        self.last_comma = -1

    def make_room(self, token: int) -> None:
        """Before the token (or embedding) starting with ``token``: note commas, close a full chunk."""
        chunk = self.current
        if token == self.comma_id:
            self.last_comma = len(chunk.ids)
        elif self._full() and self.last_comma != -1 and len(chunk.ids) - self.last_comma <= self.comma_backtrack:
            # carry the words after the last comma over to the next chunk (with any embedding among them;
            # the webui leaves such an embedding's vectors behind, a bug not reproduced)
            cut = self.last_comma + 1
            carried = TokenChunk(chunk.ids[cut:], chunk.weights[cut:],
                                 [(offset - cut, emb) for offset, emb in chunk.embeddings if offset >= cut])
            chunk.ids, chunk.weights = chunk.ids[:cut], chunk.weights[:cut]
            chunk.embeddings = [(offset, emb) for offset, emb in chunk.embeddings if offset < cut]
            self.close()
            self.current = carried
        if self._full():
            self.close()

    def add_token(self, token: int, weight: float) -> None:
        self.current.ids.append(token)
        self.current.weights.append(weight)

    def add_embedding(self, embedding: Embedding, weight: float) -> None:
        count = int(embedding.vectors.shape[0])
        if count > CHUNK_TOKENS:
            raise ValueError(f"embedding {embedding.name!r} has {count} vectors; at most {CHUNK_TOKENS} fit a chunk")
        if len(self.current.ids) + count > CHUNK_TOKENS:
            self.close()
        self.current.embeddings.append((len(self.current.ids), embedding))
        self.current.ids.extend([PLACEHOLDER_ID] * count)
        self.current.weights.extend([weight] * count)

    def _full(self) -> bool:
        return len(self.current.ids) == CHUNK_TOKENS


def build_chunks(
    tokenized: Iterable[tuple[Fragment, Sequence[int]]],
    *,
    start_id: int,
    end_id: int,
    comma_id: int | None,
    find_embedding: FindEmbedding | None = None,
    comma_backtrack: int = COMMA_BACKTRACK,
) -> list[TokenChunk]:
    """Chunks for fragments already tokenized (BPE ids without start/end); at least one chunk."""
    writer = _ChunkWriter(start_id, end_id, comma_id, comma_backtrack)
    for fragment, tokens in tokenized:
        if fragment.breaks_chunk:
            writer.close()
            continue
        position = 0
        while position < len(tokens):
            writer.make_room(tokens[position])
            found = find_embedding(tokens, position) if find_embedding is not None else None
            if found is None:
                writer.add_token(tokens[position], fragment.weight)
                position += 1
            else:
                writer.add_embedding(found[0], fragment.weight)
                position += found[1]
    if writer.current.ids or not writer.chunks:
        writer.close()
    return writer.chunks
