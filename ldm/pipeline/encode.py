"""The encode stage: every distinct (sub-)prompt through the text encoder once, from ``--embedding_cache``
where it is there, with ``--clip_skip`` and the ``--embeddings_dir`` embeddings."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Sequence

from ldm.checkpoints.hashes import sampled_fingerprint
from ldm.conditioning.embedding_cache import EmbeddingCache
from ldm.conditioning.embeddings import EmbeddingLibrary
from ldm.conditioning.prompts import PromptEncoder, distinct
from ldm.loading.lora import text_encoder_lora_key
from ldm.loading.stable_diffusion import StableDiffusion, read_model_weights
from ldm.messages import escaped
from ldm.pipeline.model import LoadedModel
from ldm.pipeline.request import GenerationRequest

log = logging.getLogger(__name__)


def load_embeddings(request: GenerationRequest, sd: StableDiffusion) -> EmbeddingLibrary | None:
    """The textual-inversion embeddings of ``--embeddings_dir`` (none when the default folder is absent)."""
    if not request.embeddings_dir.is_dir():
        return None
    text_encoder = sd.text_encoder
    library = EmbeddingLibrary.from_directory(request.embeddings_dir, text_encoder.tokenize_fragment,
                                              text_encoder.config.hidden_size)
    log.info("%d textual-inversion embeddings from %s", len(library), request.embeddings_dir)
    return library


def encode_prompts(request: GenerationRequest, prompts: Sequence[str], model: LoadedModel) -> PromptEncoder:
    """Every distinct (sub-)prompt through the text encoder once; from ``--embedding_cache`` when there.

    A fault of the cache (:class:`EmbeddingCache`: unreadable, unwritable, full, a bad entry) is one warning line
    for the run; the encodings it could not give are computed.

    The cache key names the LoRAs merged into the text encoder (:func:`ldm.loading.lora.text_encoder_lora_key`),
    so encodings cached without them (or with others) are not reused."""
    cache = None
    if request.embedding_cache is not None:
        try:
            key = " ".join(filter(None, (text_encoder_fingerprint(request.ckpt), text_encoder_lora_key(model.loras))))
            cache = EmbeddingCache(request.embedding_cache, key, request.dtype)
        except OSError as error:  # the cache only saves time: never fail a run over it
            log.warning("not using --embedding_cache %s: %s", escaped(request.embedding_cache),
                        escaped(error.strerror or error))
    encoder = PromptEncoder(cache, syntax=request.prompt_syntax, clip_skip=request.clip_skip,
                            embeddings=load_embeddings(request, model.sd), chunker=model.sd.text_encoder)
    needed = distinct(prompts) + ([request.negative_prompt] if request.guided else [])
    if encoder.missing(needed):
        with model.residency.use("text_encoder") as text_encoder:
            encoder.encode_missing(needed, text_encoder)
    faults = cache.fault_line() if cache is not None else None
    if faults:  # one line for the run, however many entries were bad or could not be written
        log.warning("%s", faults)
    return encoder


def text_encoder_fingerprint(ckpt: Path) -> str:
    """What keys cached encodings: the checkpoint's text-encoder tensors, sampled
    (:func:`~ldm.checkpoints.hashes.sampled_fingerprint`; a file's first and last MB would miss a text encoder that
    differs past its first rows, as a merged LoRA's does). Once per file version (a server's requests share it)."""
    stat = ckpt.stat()
    return _text_encoder_fingerprint(str(ckpt.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _text_encoder_fingerprint(path: str, size: int, mtime_ns: int) -> str:
    # The file (or folder) memory-mapped again and two pages a tensor read: milliseconds once in the page cache.
    return sampled_fingerprint(read_model_weights(Path(path), unread_prefixes=("",)), ("cond_stage_model.",))
