"""CLIP ViT-L/14 text encoder of Stable Diffusion v1 (CompVis ``FrozenCLIPEmbedder``), built offline.

CompVis' ``ldm/modules/encoders/modules.py::FrozenCLIPEmbedder`` downloads
``openai/clip-vit-large-patch14`` in ``__init__`` only for the SD checkpoint to overwrite the weights.
Here the same ``transformers.CLIPTextModel`` is built from a :class:`~ldm.config.TextEncoderConfig`
with no network, and the BPE tokenizer reads the ``vocab.json`` / ``merges.txt`` in
``models/tokenizer/`` (derived from OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` by
``scripts/make_clip_tokenizer_files.py``).

The conditioning is ``last_hidden_state`` (after ``final_layer_norm``) for prompts tokenized to 77 ids:
``<|startoftext|>`` (49406), at most 75 BPE tokens, ``<|endoftext|>`` (49407), then padding with 49407
as SD v1 was trained (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision"; Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models").

Prompts longer than 75 tokens: :meth:`CLIPTextEncoder.encode_chunks` encodes 77-token chunks
(:mod:`ldm.conditioning.token_chunks`, cut as AUTOMATIC1111's webui cuts them), each on its own, with per-token emphasis
weights applied to the hidden states and each chunk's mean restored (:func:`apply_emphasis`), textual-inversion
vectors placed at the token embedding, and the webui's "clip skip" (the N-th last layer's output through
``final_layer_norm``). A prompt of at most 75 tokens without weights gives exactly :meth:`encode`'s result.

Checkpoint keys: SD v1 files store the text model under ``cond_stage_model.transformer.text_model.*``
(some merged files leave out ``text_model.``, many carry ``embeddings.position_ids``). The loader strips
``cond_stage_model.transformer.`` and passes the rest through :func:`normalize_text_encoder_keys`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import html
import inspect
import json
import logging
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import ftfy
import regex
import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.config import REPO_ROOT, TextEncoderConfig
from ldm.errors import ConfigError
from ldm.conditioning.token_chunks import FindEmbedding, Fragment, TokenChunk, build_chunks

log = logging.getLogger(__name__)

DEFAULT_TOKENIZER_DIR = REPO_ROOT / "models" / "tokenizer"
START_TOKEN_ID = 49406  # <|startoftext|>
END_TOKEN_ID = 49407  # <|endoftext|>; also SD v1's padding id
TEXT_MODEL_PREFIX = "text_model."
PlacedVectors = tuple[int, int, torch.Tensor]  # (batch row, token offset, vectors [n, D])

_WHITESPACE = regex.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Normalise a prompt as OpenAI's ``simple_tokenizer.py`` does before BPE.

    ``ftfy.fix_text`` (repairs mojibake, straightens curly quotes, NFC), HTML entities unescaped twice
    (``&amp;amp;`` -> ``&``), whitespace runs collapsed, lowercased. transformers' fast ``CLIPTokenizer``
    only lowercases and collapses whitespace, so without this step prompts with curly quotes, ``&amp;``
    or mojibake get other ids than CLIP (and SD v1) were trained with.
    """
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip().lower()


@functools.lru_cache(maxsize=4)
def _load_tokenizer(tokenizer_dir: str, max_length: int) -> CLIPTokenizer:
    """Build the fast ``CLIPTokenizer`` from ``vocab.json`` + ``merges.txt`` (cached: ~1 s to build)."""
    directory = Path(tokenizer_dir)
    vocab_path = directory / "vocab.json"
    merges_path = directory / "merges.txt"
    for path in (vocab_path, merges_path):
        if not path.is_file():
            raise FileNotFoundError(
                f"CLIP tokenizer file not found: {path} (make it with scripts/make_clip_tokenizer_files.py)"
            )
    if "vocab_file" in inspect.signature(CLIPTokenizer.__init__).parameters:
        # transformers 4.x: the (slow) tokenizer reads the files itself.
        tokenizer = CLIPTokenizer(str(vocab_path), str(merges_path), model_max_length=max_length)
    else:
        # transformers 5.x: only the fast tokenizer, built from the vocabulary and merge pairs.
        vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
        lines = merges_path.read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)
    if tokenizer.bos_token_id != START_TOKEN_ID or tokenizer.eos_token_id != END_TOKEN_ID:
        raise ValueError(
            f"{directory} is not CLIP's BPE vocabulary: special token ids "
            f"{tokenizer.bos_token_id}/{tokenizer.eos_token_id}, expected {START_TOKEN_ID}/{END_TOKEN_ID}"
        )
    return tokenizer


def clip_text_config(config: TextEncoderConfig) -> CLIPTextConfig:
    """The ``transformers.CLIPTextConfig`` of ``config``: the one place this project builds one.

    Start, end and padding ids are CLIP's (``<|endoftext|>`` pads, as SD v1 was trained).
    """
    return CLIPTextConfig(
        **dataclasses.asdict(config),  # TextEncoderConfig's fields are CLIPTextConfig's
        bos_token_id=START_TOKEN_ID,
        eos_token_id=END_TOKEN_ID,
        pad_token_id=END_TOKEN_ID,
    )


@functools.lru_cache(maxsize=1)
def _installed_clip_keys() -> frozenset[str]:
    """State-dict keys of a 1-layer ``CLIPTextModel`` in the installed transformers (the key layout)."""
    tiny = TextEncoderConfig(hidden_size=4, intermediate_size=4, num_hidden_layers=1, num_attention_heads=1,
                             projection_dim=4)
    with torch.device("meta"):
        return frozenset(CLIPTextModel(clip_text_config(tiny)).state_dict())


def normalize_text_encoder_keys(
    state_dict: Mapping[str, torch.Tensor], expected_keys: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """Map an SD v1 text-encoder state dict onto ``CLIPTextModel.state_dict()`` keys.

    ``state_dict``: the checkpoint entries with ``cond_stage_model.transformer.`` already stripped,
    i.e. ``text_model.embeddings.token_embedding.weight`` or, from merged files that dropped it,
    ``embeddings.token_embedding.weight``. ``expected_keys``: the keys of the module to load into
    (``CLIPTextEncoder.transformer.state_dict()``); by default the layout of the installed transformers,
    which has no ``text_model.`` prefix from 5.6 on and has it before. The layout is read from the keys,
    never assumed from a version number.

    ``position_ids`` is dropped: it is the constant ``arange(77)``, absent from (or a non-persistent
    buffer of) recent ``CLIPTextModel`` state dicts, and some merged files store it as rounded floats.
    Where the installed transformers does expect it, a correct ``arange`` is supplied instead.
    Other keys pass through unchanged, so that a strict load reports them by name.
    """
    expected = frozenset(expected_keys) if expected_keys is not None else _installed_clip_keys()
    prefixed = any(key.startswith(TEXT_MODEL_PREFIX) for key in expected)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        bare = key[len(TEXT_MODEL_PREFIX):] if key.startswith(TEXT_MODEL_PREFIX) else key
        if bare == "embeddings.position_ids":
            continue
        out[TEXT_MODEL_PREFIX + bare if prefixed else bare] = value
    position_key = (TEXT_MODEL_PREFIX if prefixed else "") + "embeddings.position_ids"
    position_weight = out.get((TEXT_MODEL_PREFIX if prefixed else "") + "embeddings.position_embedding.weight")
    if position_key in expected and position_weight is not None:
        out[position_key] = torch.arange(position_weight.shape[0]).unsqueeze(0)
    return out


class CLIPTextEncoder(nn.Module):
    """Prompts -> ``[B, 77, hidden]`` cross-attention context, as CompVis' ``FrozenCLIPEmbedder``.

    ``self.transformer`` is a ``transformers.CLIPTextModel`` built from ``config`` (random weights until a
    checkpoint is loaded into it); the module is in eval mode with gradients off.
    """

    def __init__(self, config: TextEncoderConfig, tokenizer_dir: str | Path | None = None) -> None:
        super().__init__()
        self.config = config
        self.max_length = config.max_position_embeddings
        directory = Path(tokenizer_dir) if tokenizer_dir is not None else DEFAULT_TOKENIZER_DIR
        self.tokenizer = _load_tokenizer(str(directory.resolve()), self.max_length)
        if config.vocab_size < len(self.tokenizer):
            raise ConfigError(
                f"text encoder vocab_size {config.vocab_size} is smaller than the tokenizer's {len(self.tokenizer)}"
            )
        self.comma_id: int | None = self.tokenizer.get_vocab().get(",</w>")
        self.transformer = CLIPTextModel(clip_text_config(config))
        self.eval()
        self.requires_grad_(False)

    def normalize_text_encoder_keys(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """:func:`normalize_text_encoder_keys` onto the keys of ``self.transformer``."""
        return normalize_text_encoder_keys(state_dict, self.transformer.state_dict().keys())

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids ``LongTensor[B, 77]``: start, BPE tokens (truncated), end, then end-token padding."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError("tokenize() takes a list of prompt strings")
        batch = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length",
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return batch["input_ids"].long()

    def tokenize_fragment(self, text: str) -> list[int]:
        """BPE ids of ``text`` (cleaned as :func:`clean_prompt`), without start/end tokens, not truncated."""
        return list(self.tokenizer(clean_prompt(text), add_special_tokens=False, truncation=False,
                                   verbose=False)["input_ids"])

    def chunk_prompt(self, fragments: Sequence[Fragment], find_embedding: FindEmbedding | None = None) -> list[TokenChunk]:
        """A prompt's weighted fragments as 77-token chunks (:mod:`ldm.conditioning.token_chunks`, the webui's cutting)."""
        tokenized = [(f, [] if f.breaks_chunk else self.tokenize_fragment(f.text)) for f in fragments]
        return build_chunks(tokenized, start_id=START_TOKEN_ID, end_id=END_TOKEN_ID, comma_id=self.comma_id,
                            find_embedding=find_embedding)

    def forward(
        self, token_ids: torch.Tensor, clip_skip: int = 1, embeddings: Sequence[PlacedVectors] = ()
    ) -> torch.Tensor:
        """Hidden states ``[B, L, D]`` for ``token_ids`` ``[B, L]``, L <= 77.

        ``clip_skip`` 1 is ``last_hidden_state``; N > 1 is the output of the N-th layer from the end put
        through ``final_layer_norm`` (the webui's "Clip skip"; ``hidden_states[-N]``). ``embeddings``:
        ``(row, offset, vectors [n, D])`` written over the token embeddings of ``row`` from ``offset``
        (textual inversion), before the position embeddings are added.
        """
        if token_ids.dim() != 2 or token_ids.shape[1] > self.max_length:
            raise ValueError(f"token_ids must be [batch, <= {self.max_length}], got {tuple(token_ids.shape)}")
        layers = self.config.num_hidden_layers
        if not 1 <= clip_skip <= layers:
            raise ValueError(f"clip_skip must be between 1 and {layers} (the text encoder's layers), got {clip_skip}")
        with self._vectors_placed(embeddings):
            if clip_skip == 1:
                return self.transformer(input_ids=token_ids).last_hidden_state
            hidden = self.transformer(input_ids=token_ids, output_hidden_states=True).hidden_states[-clip_skip]
        return self._final_layer_norm(hidden)

    @property
    def _final_layer_norm(self) -> nn.Module:
        # transformers < 5.6 nests the layers under .text_model
        return getattr(self.transformer, "text_model", self.transformer).final_layer_norm

    @contextlib.contextmanager
    def _vectors_placed(self, embeddings: Sequence[PlacedVectors]) -> Iterator[None]:
        """A forward hook on the token embedding that overwrites the given rows (the webui's EmbeddingsWithFixes)."""
        if not embeddings:
            yield
            return

        def place(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            output = output.clone()
            for row, offset, vectors in embeddings:
                output[row, offset : offset + vectors.shape[0]] = vectors.to(output)
            return output

        handle = self.transformer.get_input_embeddings().register_forward_hook(place)
        try:
            yield
        finally:
            handle.remove()

    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """Tokenize ``prompts`` and encode them on the module's device: ``[B, 77, hidden]``."""
        device = self.transformer.get_input_embeddings().weight.device
        return self(self.tokenize(prompts).to(device))

    @torch.no_grad()
    def encode_chunks(self, chunks: Sequence[TokenChunk], clip_skip: int = 1) -> torch.Tensor:
        """``[len(chunks), 77, D]``: the chunks in one batch, embeddings placed, emphasis applied."""
        device = self.transformer.get_input_embeddings().weight.device
        ids = torch.tensor([chunk.ids for chunk in chunks], dtype=torch.long, device=device)
        placed = [(row, offset, emb.vectors) for row, chunk in enumerate(chunks) for offset, emb in chunk.embeddings]
        hidden = self(ids, clip_skip, placed)
        return apply_emphasis(hidden, [chunk.weights for chunk in chunks])

    @torch.no_grad()
    def encode_prompt(
        self, fragments: Sequence[Fragment], clip_skip: int = 1, find_embedding: FindEmbedding | None = None
    ) -> torch.Tensor:
        """One prompt of any length: ``[77 * chunks, D]``, the chunks' encodings concatenated."""
        encoded = self.encode_chunks(self.chunk_prompt(fragments, find_embedding), clip_skip)
        return encoded.reshape(-1, encoded.shape[-1])


def apply_emphasis(hidden: torch.Tensor, weights: Sequence[Sequence[float]]) -> torch.Tensor:
    """The webui's "Original" emphasis on chunk encodings ``hidden`` ``[B, 77, D]``.

    Each token's hidden state is multiplied by its weight, then the chunk is rescaled so that its mean
    (over all 77 x D values) is the mean it had before (``sd_emphasis.EmphasisOriginal``). Computed in
    float32. Chunks whose weights are all 1 are returned bit for bit.
    """
    emphasised = [any(w != 1.0 for w in row) for row in weights]  # on the host: no device read-back
    if not any(emphasised):
        return hidden
    factors = torch.tensor(weights, dtype=torch.float32, device=hidden.device)
    weighted = torch.tensor(emphasised, device=hidden.device)
    rows = hidden[weighted].float()
    original_mean = rows.mean(dim=(1, 2), keepdim=True)
    rows = rows * factors[weighted].unsqueeze(-1)
    rows = rows * (original_mean / rows.mean(dim=(1, 2), keepdim=True))
    out = hidden.clone()
    out[weighted] = rows.to(hidden.dtype)
    return out
