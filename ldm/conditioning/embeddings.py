"""Textual-inversion embeddings: learned token vectors used in prompts by their file name.

Gal et al. (2022), "An Image is Worth One Word: Personalizing Text-to-Image Generation using Textual
Inversion": a concept is a few vectors ``[n, D]`` in CLIP's token-embedding space, trained while the
models stay frozen. A prompt that names the embedding gets those vectors in place of the name's tokens.

Files, read as AUTOMATIC1111's webui reads them (``modules/textual_inversion/textual_inversion.py``):

- ``.pt`` / ``.bin`` through :func:`ldm.checkpoints.reader.read_torch_data` (the restricted unpickler; no
  code from the file runs), ``.safetensors`` through safetensors;
- layouts: the webui's ``{"string_to_param": {"*": tensor [n, D]}, "name": ..., "step": ...}`` (also with
  the ParameterDict of torch 1.11-1.12 files), and any one-tensor dict: diffusers'
  ``learned_embeds.bin`` ``{token: tensor [D]}`` and the ``{"emb_params": tensor [n, D]}`` of other trainers;
- the name is the file name without its extension (``models/embeddings/my-style.pt`` is ``my-style``),
  matched in prompts on its BPE tokens, so case and surrounding punctuation do not matter.

Matching is on tokens, as in the webui: wherever the name's token sequence occurs in a prompt (in either
prompt syntax, in negative prompts too), the embedding's vectors take those tokens' place.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from ldm.checkpoints.errors import CheckpointError
from ldm.checkpoints.reader import read_torch_data
from ldm.checkpoints.hashes import file_sha256

log = logging.getLogger(__name__)

SUFFIXES = (".pt", ".bin", ".safetensors")
SHORT_HASH_LENGTH = 12  # the webui's "TI hashes" use the first 12 hex digits of the file's sha256


class EmbeddingError(ValueError):
    """An embedding file that cannot be used; the message is one line and names the file."""


@dataclass(frozen=True, eq=False)
class TextualInversion:
    """One embedding: its prompt name, vectors ``[n, D]`` (float32, CPU) and the file's sha256."""

    name: str
    vectors: torch.Tensor
    path: Path
    sha256: str

    @property
    def shorthash(self) -> str:
        return self.sha256[:SHORT_HASH_LENGTH]


def embedding_vectors(data: Any, shown: str) -> torch.Tensor:
    """The ``[n, D]`` vectors in the content of an embedding file (see the module docstring for layouts)."""
    if not isinstance(data, Mapping) or not data:
        raise EmbeddingError(f"{shown} is not a textual-inversion embedding (not a dict of tensors)")
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_stand_in_state", {}).get("_parameters", params)  # torch 1.11 ParameterDict
        if not isinstance(params, Mapping) or len(params) != 1:
            raise EmbeddingError(f"{shown}: string_to_param must hold exactly one tensor")
        tensor = next(iter(params.values()))
    elif "clip_l" in data and "clip_g" in data:
        raise EmbeddingError(f"{shown} is an SDXL embedding (clip_l/clip_g); SD v1 needs a CLIP ViT-L/14 one")
    else:
        tensors = [value for value in data.values() if isinstance(value, torch.Tensor)]
        if len(data) != 1 or len(tensors) != 1:
            raise EmbeddingError(
                f"{shown} is not a textual-inversion embedding (expected string_to_param, emb_params or "
                f"one {{token: tensor}} entry; found keys {sorted(map(str, data))[:5]})"
            )
        tensor = tensors[0]
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() not in (1, 2):
        raise EmbeddingError(f"{shown}: the embedding must be a float tensor [D] or [n, D]")
    return tensor.detach().reshape(-1, tensor.shape[-1]).to(device="cpu", dtype=torch.float32).clone()


def load_embedding(path: str | os.PathLike[str]) -> TextualInversion:
    """Read one ``.pt`` / ``.bin`` / ``.safetensors`` embedding file."""
    file = Path(path)
    shown = str(file)
    suffix = file.suffix.lower()
    if suffix not in SUFFIXES:
        raise EmbeddingError(f"{shown}: not an embedding file (expected {', '.join(SUFFIXES)})")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            data = load_file(str(file), device="cpu")
        else:
            data = read_torch_data(file)
    except CheckpointError as error:
        raise EmbeddingError(str(error)) from None
    except Exception as error:  # safetensors' own errors: damaged header, truncated data
        raise EmbeddingError(f"cannot read {shown}: {type(error).__name__}: {error}") from None
    return TextualInversion(file.stem, embedding_vectors(data, shown), file, file_sha256(file))


def embedding_file_hashes(directory: str | os.PathLike[str]) -> dict[str, str]:
    """``{name: shorthash}`` of the embedding files under ``directory`` (none when it does not exist),
    without reading them as embeddings: what ``--from_png`` compares with an image's ``TI hashes``."""
    root = Path(directory)
    if not root.is_dir():
        return {}
    return {path.stem: file_sha256(path)[:SHORT_HASH_LENGTH] for path in sorted(root.rglob("*"))
            if path.suffix.lower() in SUFFIXES and not path.name.startswith(".") and path.is_file()}


class EmbeddingLibrary:
    """The embeddings usable in prompts, looked up by the token ids of their names.

    ``tokenize(text) -> BPE ids`` must be the text encoder's (without start/end tokens), so that a name
    in a prompt gives the same ids as the name itself.
    """

    def __init__(self, embeddings: Iterable[TextualInversion], tokenize: Callable[[str], list[int]]) -> None:
        self.tokenize = tokenize
        self.embeddings: dict[str, TextualInversion] = {}
        self._by_first_token: dict[int, list[tuple[list[int], TextualInversion]]] = {}
        for embedding in embeddings:
            ids = tokenize(embedding.name)
            if not ids:
                log.warning("embedding %s: its name has no tokens; skipped", embedding.path)
                continue
            if embedding.name in self.embeddings:
                log.warning("embedding %s: the name %r is taken by %s; skipped", embedding.path, embedding.name,
                            self.embeddings[embedding.name].path)
                continue
            self.embeddings[embedding.name] = embedding
            candidates = self._by_first_token.setdefault(ids[0], [])
            candidates.append((ids, embedding))
            candidates.sort(key=lambda pair: len(pair[0]), reverse=True)  # the longest name wins

    @classmethod
    def from_directory(
        cls, directory: str | os.PathLike[str], tokenize: Callable[[str], list[int]], hidden_size: int
    ) -> EmbeddingLibrary:
        """Every embedding file under ``directory`` (sub-folders too); unusable files are skipped with a warning."""
        found: list[TextualInversion] = []
        for path in sorted(Path(directory).rglob("*")):
            if path.suffix.lower() not in SUFFIXES or path.name.startswith(".") or not path.is_file():
                continue
            try:
                embedding = load_embedding(path)
            except EmbeddingError as error:
                log.warning("skipping embedding: %s", error)
                continue
            if embedding.vectors.shape[1] != hidden_size:
                log.warning("skipping embedding %s: its vectors have %d dimensions, the text encoder %d",
                            path, embedding.vectors.shape[1], hidden_size)
                continue
            found.append(embedding)
        return cls(found, tokenize)

    def __len__(self) -> int:
        return len(self.embeddings)

    def find(self, tokens: Sequence[int], position: int) -> tuple[TextualInversion, int] | None:
        """The embedding whose name's tokens start at ``tokens[position]``, and how many tokens that is."""
        for ids, embedding in self._by_first_token.get(tokens[position], ()):
            if list(tokens[position : position + len(ids)]) == ids:
                return embedding, len(ids)
        return None

    def used_in(self, token_lists: Iterable[Sequence[int]]) -> list[TextualInversion]:
        """The embeddings named in these token sequences, in order of first use."""
        used: dict[str, TextualInversion] = {}
        for tokens in token_lists:
            position = 0
            while position < len(tokens):
                found = self.find(tokens, position)
                if found is None:
                    position += 1
                else:
                    used.setdefault(found[0].name, found[0])
                    position += found[1]
        return list(used.values())

    def fingerprint(self) -> str:
        """Changes whenever an embedding is added, removed, renamed or changed (keys cached encodings)."""
        listing = "\n".join(f"{name}\t{emb.sha256}" for name, emb in sorted(self.embeddings.items()))
        return hashlib.sha256(listing.encode("utf-8")).hexdigest()
