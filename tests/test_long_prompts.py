"""Chunked encoding of long prompts, emphasis with the mean restored, clip skip, and padding.

The oracle is an independent restatement, written here, of the webui's ``sd_hijack_clip.py`` (75-token
chunks with start/end tokens, comma backtracking, BREAK) and ``sd_emphasis.py`` ("Original" emphasis)
over a plain ``transformers.CLIPTextModel`` and ``CLIPTokenizer`` configured here.
"""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ldm.config import TextEncoderConfig
from ldm.conditioning.text_encoder import CLIPTextEncoder
from ldm.conditioning.token_chunks import Fragment
from ldm.conditioning.embedding_cache import EmbeddingCache
from ldm.conditioning.prompts import PromptEncoder
from ldm.conditioning.webui_syntax import parse_prompt_attention
from tests.conftest import REPO

TINY = TextEncoderConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                         num_attention_heads=4, projection_dim=32)
START, END = 49406, 49407


@pytest.fixture(scope="module")
def reference() -> CLIPTextModel:
    torch.manual_seed(7)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                            projection_dim=32, layer_norm_eps=1e-5)
    model = CLIPTextModel(config).eval().requires_grad_(False)
    with torch.no_grad():  # LayerNorms and biases matter too
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    return model


@pytest.fixture(scope="module")
def tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(REPO / "models" / "tokenizer"), model_max_length=77)


@pytest.fixture(scope="module")
def encoder(reference) -> CLIPTextEncoder:
    ours = CLIPTextEncoder(TINY)
    ours.transformer.load_state_dict(ours.normalize_text_encoder_keys(reference.state_dict()), strict=True)
    return ours


# ---- the independent implementation --------------------------------------------------------------
def reference_chunks(pieces, tokenizer, backtrack=20):
    """The webui's tokenize_line: [(text, weight)] with ("BREAK", -1) markers -> [(ids[77], weights[77])]."""
    comma = tokenizer.get_vocab()[",</w>"]
    chunks, ids, weights, last_comma = [], [], [], -1

    def flush():
        nonlocal ids, weights, last_comma
        pad = 75 - len(ids)
        chunks.append(([START] + ids + [END] * pad + [END], [1.0] + weights + [1.0] * pad + [1.0]))
        ids, weights, last_comma = [], [], -1

    for text, weight in pieces:
        if (text, weight) == ("BREAK", -1.0):
            flush()
            continue
        for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
            if token == comma:
                last_comma = len(ids)
            elif len(ids) == 75 and last_comma != -1 and 75 - last_comma <= backtrack:
                keep = last_comma + 1
                moved_ids, moved_weights = ids[keep:], weights[keep:]
                ids, weights = ids[:keep], weights[:keep]
                flush()
                ids, weights = moved_ids, moved_weights
            if len(ids) == 75:
                flush()
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        flush()
    return chunks


def reference_encoding(model, chunks, clip_skip=1):
    """Each chunk on its own; hidden states x weights, the chunk's mean restored; concatenated."""
    out = []
    with torch.no_grad():
        for ids, weights in chunks:
            result = model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            z = result.last_hidden_state if clip_skip == 1 else model.final_layer_norm(result.hidden_states[-clip_skip])
            mean = z.mean()
            z = z * torch.tensor(weights)[None, :, None]
            z = z * (mean / z.mean())
            out.append(z[0])
    return torch.cat(out)


def encode(encoder, prompt, syntax="webui", clip_skip=1):
    prompts = PromptEncoder(syntax=syntax, clip_skip=clip_skip)
    prompts.encode_missing([prompt], encoder)
    return prompts.conditioning(prompt)


LONG_TAGS = ", ".join(["masterpiece", "best quality", "(red hair:1.2)", "[blurry]", "a ((castle)) on a hill",
                       "dramatic lighting", "highly detailed oil painting"] * 6)

WEBUI_PROMPTS = [
    "a (red:1.3) cat, [blurry]",
    "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
    LONG_TAGS,  # ~190 tokens with commas: comma backtracking moves phrases to the next chunk
    " ".join(["(cat:1.1) dog"] * 60),  # 120 tokens, no commas: a hard cut at 75
    "a cat BREAK (a dog:0.8) BREAK",
    "",
]


CASES = [(prompt, 1) for prompt in WEBUI_PROMPTS] + [(WEBUI_PROMPTS[1], 2), (LONG_TAGS, 2)]


@pytest.mark.parametrize("prompt, clip_skip", CASES, ids=[f"{i}-skip{c}" for i, (_, c) in enumerate(CASES)])
def test_webui_syntax_equals_the_independent_implementation(encoder, reference, tokenizer, prompt, clip_skip):
    expected = reference_encoding(reference, reference_chunks(parse_prompt_attention(prompt), tokenizer), clip_skip)
    got = encode(encoder, prompt, clip_skip=clip_skip)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_comma_backtracking_did_happen(encoder, tokenizer):
    chunks = reference_chunks(parse_prompt_attention(LONG_TAGS), tokenizer)
    assert len(chunks) == 2
    first_real = [token for token in chunks[0][0][1:-1]]
    assert END in first_real  # the first chunk was closed early, after a comma, and padded
    ours = encoder.chunk_prompt([Fragment(text, weight) for text, weight in parse_prompt_attention(LONG_TAGS)])
    assert [chunk.ids for chunk in ours] == [ids for ids, _ in chunks]


@pytest.mark.parametrize("syntax", ["fork", "webui"])
def test_150_tokens_give_a_154_token_context(encoder, reference, tokenizer, syntax):
    prompt = "cat " * 150
    assert len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) == 150
    got = encode(encoder, prompt, syntax)
    assert got.shape == (154, 32)
    expected = reference_encoding(reference, [([START] + [2368] * 75 + [END], [1.0] * 77)] * 2)
    assert tokenizer.convert_tokens_to_ids("cat</w>") == 2368
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # the first chunk is what the 77-token encoding (which cuts at 75 tokens) gave before
    assert torch.equal(got[:77], encoder.encode([prompt])[0])


SHORT_PROMPTS = [
    "a photo of a cat",
    "",
    "salt &amp; pepper \u2014 \u201cquoted\u201d \U0001F436 \u5bcc\u58eb\u5c71",
    "cat " * 75,  # exactly 75 tokens: still one chunk
    "tabby cat, white duck, hybrid",
]


@pytest.mark.parametrize("syntax", ["fork", "webui"])
def test_prompts_of_at_most_75_tokens_encode_exactly_as_before(encoder, syntax):
    prompts = PromptEncoder(syntax=syntax)
    prompts.encode_missing(SHORT_PROMPTS, encoder)  # one batch, as the generation loop encodes them
    before = encoder.encode(SHORT_PROMPTS)
    for row, prompt in enumerate(SHORT_PROMPTS):
        assert torch.equal(prompts.conditioning(prompt), before[row]), prompt


def test_clip_skip_2_is_the_penultimate_hidden_state_through_the_final_layer_norm(encoder, reference, tokenizer):
    ids = tokenizer(["a photo of a cat", "a dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        states = reference(input_ids=ids, output_hidden_states=True).hidden_states
        assert len(states) == TINY.num_hidden_layers + 1  # the embeddings, then each layer
        expected = reference.final_layer_norm(states[-2])
    torch.testing.assert_close(encoder(ids, clip_skip=2), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(encoder(ids, clip_skip=1), reference(input_ids=ids).last_hidden_state, rtol=0, atol=1e-6)
    assert not torch.allclose(encoder(ids, clip_skip=2), encoder(ids, clip_skip=1), atol=1e-3)
    with pytest.raises(ValueError, match="clip_skip"):
        encoder(ids, clip_skip=4)
    with pytest.raises(ValueError, match="clip_skip"):
        encoder(ids, clip_skip=0)


def test_negative_prompt_is_padded_with_empty_prompt_chunks(encoder):
    prompts = PromptEncoder(syntax="webui")
    prompt, negative = "cat " * 100, "blurry"
    prompts.encode_missing([prompt, negative], encoder)
    length = prompts.context_length(prompt, negative)
    assert length == 154
    cond = prompts.batch(prompt, 2, torch.device("cpu"), torch.float32, length)
    uncond = prompts.batch(negative, 2, torch.device("cpu"), torch.float32, length)
    assert cond.shape == uncond.shape == (2, 154, 32)
    empty = encoder.encode([""])[0]
    torch.testing.assert_close(uncond[0, :77], encoder.encode([negative])[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(uncond[1, 77:], empty, rtol=0, atol=1e-6)
    # and the other way round: a long negative prompt pads the prompt
    assert prompts.batch(negative, 1, torch.device("cpu"), torch.float32, 154).shape == (1, 154, 32)


def test_fork_sub_prompts_of_different_lengths_are_padded_then_averaged(encoder):
    prompts = PromptEncoder(syntax="fork")
    long_part = "dog " * 80
    prompt = f"{long_part}:3 cat:1"
    prompts.encode_missing([prompt], encoder)
    long_encoding = encode(encoder, long_part.strip(), "fork")
    short = torch.cat([encoder.encode(["cat"])[0], encoder.encode([""])[0]])
    torch.testing.assert_close(prompts.conditioning(prompt), 0.75 * long_encoding + 0.25 * short, rtol=0, atol=1e-5)


def test_the_cache_key_holds_syntax_and_clip_skip(encoder, tmp_path):
    cache = EmbeddingCache(tmp_path, "ckpt", torch.float32)
    first = PromptEncoder(cache, syntax="webui", clip_skip=1)
    first.encode_missing(["(cat:1.5)"], encoder)
    assert PromptEncoder(cache, syntax="webui", clip_skip=1).missing(["(cat:1.5)"]) == []
    assert PromptEncoder(cache, syntax="webui", clip_skip=2).missing(["(cat:1.5)"]) == ["(cat:1.5)"]
    assert PromptEncoder(cache, syntax="fork", clip_skip=1).missing(["(cat:1.5)"]) == ["(cat:1.5)"]
    assert PromptEncoder(cache, syntax="webui", weights_key="lora a 0.8").missing(["(cat:1.5)"]) == ["(cat:1.5)"]
    # a long prompt comes back from the disk cache whole, with the padding it needs
    again = PromptEncoder(cache, syntax="webui")
    again.encode_missing(["cat " * 90, "blurry"], encoder)
    later = PromptEncoder(cache, syntax="webui")
    assert later.missing(["cat " * 90, "blurry"]) == []
    assert later.conditioning("cat " * 90).shape == (154, 32)
    assert later.conditioning("blurry", 154).shape == (154, 32)


def test_infotext_fields_say_how_the_prompts_were_encoded(encoder):
    fork = PromptEncoder(syntax="fork", clip_skip=2)
    fork.encode_missing(["a cat:0.5 dog", "cat " * 80, "blurry"], encoder)
    assert fork.infotext_fields("a cat:0.5 dog", "blurry") == {"Clip skip": "2", "Prompt syntax": "fork"}
    assert fork.infotext_fields("cat " * 80, "blurry") == {"Clip skip": "2", "Pad conds": "True"}
    webui = PromptEncoder(syntax="webui")
    webui.encode_missing(["a (cat:0.5) dog", ""], encoder)
    assert webui.infotext_fields("a (cat:0.5) dog", "") == {}
