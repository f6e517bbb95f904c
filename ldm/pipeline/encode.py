"""The encode stage: every distinct (sub-)prompt through the text encoder once, from ``--embedding_cache``
where it is there, with ``--clip_skip`` and the ``--embeddings_dir`` embeddings."""

from __future__ import annotations

import logging
from typing import Sequence

from ldm.conditioning.embedding_cache import EmbeddingCache
from ldm.conditioning.embeddings import EmbeddingLibrary
from ldm.conditioning.prompts import PromptEncoder, distinct
from ldm.loading.lora import text_encoder_lora_key
from ldm.loading.fingerprints import part_fingerprints
from ldm.loading.stable_diffusion import StableDiffusion
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
            key = " ".join(filter(None, (part_fingerprints(request.ckpt).text_encoder, text_encoder_lora_key(model.loras))))
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


