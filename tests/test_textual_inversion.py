"""Textual-inversion embeddings: the conditioning equals diffusers' ``load_textual_inversion`` with the same
file (tiny random CLIP), for the webui's, diffusers' and the one-tensor layouts, multi-vector included."""

from __future__ import annotations

import logging
import os
import pickle

import pytest
import torch
from diffusers.loaders import TextualInversionLoaderMixin
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.config import TextEncoderConfig
from ldm.conditioning.text_encoder import CLIPTextEncoder
from ldm.conditioning.embeddings import EmbeddingError, EmbeddingLibrary, file_sha256, load_embedding
from ldm.conditioning.token_chunks import Fragment
from ldm.conditioning.embedding_cache import EmbeddingCache
from ldm.conditioning.prompts import PromptEncoder
from tests.conftest import REPO

TINY = TextEncoderConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, projection_dim=32)
TOKENIZER_DIR = REPO / "models" / "tokenizer"


class DiffusersLoader(TextualInversionLoaderMixin):
    """The smallest owner diffusers' mixin accepts: no offload hooks, no components."""

    hf_device_map = None
    components: dict = {}


def reference_model() -> CLIPTextModel:
    torch.manual_seed(11)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                            projection_dim=32, layer_norm_eps=1e-5)
    model = CLIPTextModel(config).eval().requires_grad_(False)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def encoder() -> CLIPTextEncoder:
    ours = CLIPTextEncoder(TINY)
    ours.transformer.load_state_dict(ours.normalize_text_encoder_keys(reference_model().state_dict()), strict=True)
    return ours


@pytest.fixture(scope="module")
def embeddings_dir(tmp_path_factory):
    """One file per layout, with random vectors of CLIP's (tiny) width."""
    directory = tmp_path_factory.mktemp("embeddings")
    generator = torch.Generator().manual_seed(5)
    vectors = {name: torch.randn(n, 32, generator=generator) for name, n in
               [("webui-style", 3), ("my-concept", 1), ("kohya-thing", 2), ("old-style", 2)]}
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors["webui-style"]},
                "name": "webui-style", "step": 1500, "sd_checkpoint": "abcdef12", "sd_checkpoint_name": "v1-5"},
               directory / "webui-style.pt")
    torch.save({"<my-concept>": vectors["my-concept"][0]}, directory / "my-concept.bin")  # diffusers: [D]
    save_file({"emb_params": vectors["kohya-thing"]}, str(directory / "kohya-thing.safetensors"))
    # torch 1.11-1.12 webui files kept the vectors in a ParameterDict module
    (directory / "sub").mkdir()
    torch.save({"string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors["old-style"])}),
                "name": "old-style"}, directory / "sub" / "old-style.pt")
    return directory, vectors


def library(encoder, directory) -> EmbeddingLibrary:
    return EmbeddingLibrary.from_directory(directory, encoder.tokenize_fragment, hidden_size=32)


def diffusers_conditioning(path, token, prompt) -> torch.Tensor:
    """diffusers: add the token(s) to the tokenizer, write the vectors into the embedding matrix, expand
    the prompt for multi-vector embeddings, encode 77 tokens."""
    tokenizer = CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR), model_max_length=77)
    model = reference_model()
    loader = DiffusersLoader()
    loader.load_textual_inversion(str(path), token=token, tokenizer=tokenizer, text_encoder=model)
    text = loader.maybe_convert_prompt(prompt, tokenizer)
    ids = tokenizer(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(input_ids=ids).last_hidden_state[0], ids[0]


def ours(encoder, embeddings, prompt, syntax="fork") -> torch.Tensor:
    prompts = PromptEncoder(syntax=syntax, embeddings=embeddings)
    prompts.encode_missing([prompt], encoder)
    return prompts.conditioning(prompt)


@pytest.mark.parametrize("file, name", [
    ("webui-style.pt", "webui-style"),          # the webui's string_to_param, 3 vectors
    ("my-concept.bin", "my-concept"),           # diffusers' {token: tensor [D]}
    ("kohya-thing.safetensors", "kohya-thing"),  # {"emb_params": tensor [2, D]}
])
@pytest.mark.parametrize("syntax", ["fork", "webui"])
def test_same_conditioning_as_diffusers_load_textual_inversion(encoder, embeddings_dir, file, name, syntax):
    directory, vectors = embeddings_dir
    prompt = f"a photo of {name} in the snow, highly detailed"
    expected, ids = diffusers_conditioning(directory / file, name, prompt)
    got = ours(encoder, library(encoder, directory), prompt, syntax)
    assert got.shape == (77, 32)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # and the embedding did matter: without it the name is ordinary text
    assert not torch.allclose(ours(encoder, None, prompt), expected, atol=1e-3)


def test_emphasis_on_an_embedding_weighs_its_vectors(encoder, embeddings_dir):
    directory, vectors = embeddings_dir
    plain, ids = diffusers_conditioning(directory / "webui-style.pt", "webui-style", "a webui-style cat")
    weights = torch.ones(77)
    weights[2:5] = 1.3  # start, "a", then the three vectors
    expected = plain * weights[:, None]
    expected = expected * (plain.mean() / expected.mean())
    got = ours(encoder, library(encoder, directory), "a (webui-style:1.3) cat", "webui")
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_torch_1_11_parameter_dict_files_and_subfolders(encoder, embeddings_dir):
    directory, vectors = embeddings_dir
    embeddings = library(encoder, directory)
    assert sorted(embeddings.embeddings) == ["kohya-thing", "my-concept", "old-style", "webui-style"]
    assert torch.equal(embeddings.embeddings["old-style"].vectors, vectors["old-style"])
    assert embeddings.embeddings["my-concept"].vectors.shape == (1, 32)


def test_names_match_on_tokens_in_negative_prompts_and_long_prompts(encoder, embeddings_dir):
    directory, _ = embeddings_dir
    embeddings = library(encoder, directory)
    prompts = PromptEncoder(syntax="webui", embeddings=embeddings)
    negative = "WEBUI-STYLE, blurry"  # case does not matter: names match on BPE tokens
    long_prompt = "cat, " * 70 + "kohya-thing"
    prompts.encode_missing([negative, long_prompt], encoder)
    assert [e.name for e in prompts.embeddings_used([negative])] == ["webui-style"]
    assert [e.name for e in prompts.embeddings_used([long_prompt, negative])] == ["kohya-thing", "webui-style"]
    expected_negative = ours(encoder, embeddings, "webui-style, blurry", "webui")
    torch.testing.assert_close(prompts.conditioning(negative), expected_negative, rtol=0, atol=0)
    assert prompts.conditioning(long_prompt).shape == (154, 32)


def test_an_embedding_is_never_split_across_chunks(encoder, embeddings_dir):
    directory, _ = embeddings_dir
    embeddings = library(encoder, directory)
    chunks = encoder.chunk_prompt([Fragment("cat " * 74 + "webui-style")], embeddings.find)
    assert len(chunks) == 2
    assert chunks[0].embeddings == [] and chunks[0].ids[75:] == [49407, 49407]
    assert [(offset, e.name) for offset, e in chunks[1].embeddings] == [(1, "webui-style")]
    assert chunks[1].ids[1:4] == [0, 0, 0]


def test_hashes_and_the_cache_key(encoder, embeddings_dir, tmp_path):
    directory, _ = embeddings_dir
    embeddings = library(encoder, directory)
    webui_style = embeddings.embeddings["webui-style"]
    assert webui_style.sha256 == file_sha256(directory / "webui-style.pt")
    assert webui_style.shorthash == webui_style.sha256[:12]
    cache = EmbeddingCache(tmp_path, "ckpt", torch.float32)
    PromptEncoder(cache, embeddings=embeddings).encode_missing(["a webui-style cat"], encoder)
    assert PromptEncoder(cache, embeddings=embeddings).missing(["a webui-style cat"]) == []
    assert PromptEncoder(cache).missing(["a webui-style cat"]) == ["a webui-style cat"]
    fewer = EmbeddingLibrary([e for n, e in embeddings.embeddings.items() if n != "kohya-thing"],
                             encoder.tokenize_fragment)
    assert fewer.fingerprint() != embeddings.fingerprint()


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unusable_files_are_skipped_with_one_warning_each(encoder, tmp_path, caplog):
    torch.save({"string_to_param": {"*": torch.randn(2, 768)}}, tmp_path / "sd2-size.pt")  # another width
    save_file({"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 1280)}, str(tmp_path / "sdxl.safetensors"))
    with open(tmp_path / "exploit.pt", "wb") as handle:
        pickle.dump({"string_to_param": {"*": _Exploit()}}, handle, protocol=2)
    (tmp_path / "damaged.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    torch.save({"a": torch.randn(32), "b": torch.randn(32)}, tmp_path / "two-terms.bin")
    (tmp_path / "notes.txt").write_text("not an embedding")
    with caplog.at_level(logging.WARNING, logger="ldm.conditioning.embeddings"):
        embeddings = library(encoder, tmp_path)
    assert len(embeddings) == 0
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 5
    assert any("sd2-size.pt" in m and "768 dimensions" in m for m in messages)
    assert any("SDXL" in m for m in messages)
    assert any("exploit.pt" in m and "system" in m for m in messages)
    assert any("damaged.safetensors" in m for m in messages)
    assert any("two-terms.bin" in m for m in messages)
    with pytest.raises(EmbeddingError, match="not an embedding file"):
        load_embedding(tmp_path / "notes.txt")


def test_ti_hashes_field_as_the_webui_writes_it(encoder, embeddings_dir):
    directory, _ = embeddings_dir
    embeddings = library(encoder, directory)
    prompts = PromptEncoder(syntax="webui", embeddings=embeddings)
    prompts.encode_missing(["a kohya-thing cat", "webui-style"], encoder)
    kohya, webui_style = embeddings.embeddings["kohya-thing"], embeddings.embeddings["webui-style"]
    assert prompts.infotext_fields("a kohya-thing cat", "webui-style") == {
        "TI hashes": f"kohya-thing: {kohya.shorthash}, webui-style: {webui_style.shorthash}"}
