"""``CLIPTextEncoder``: CompVis checkpoint keys load strictly and give the hidden states of a
``transformers.CLIPTextModel`` loaded through diffusers' single-file converter (diffusers
``tests/single_file/`` style: the original-format checkpoint gives the same output as the native one).
"""

from __future__ import annotations

import pytest
import torch
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.config import TextEncoderConfig
from ldm.errors import ConfigError
from ldm.conditioning.text_encoder import CLIPTextEncoder, normalize_text_encoder_keys

TINY = TextEncoderConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, projection_dim=32)
CLIP_PREFIX = "cond_stage_model.transformer."
PROMPTS = ["a photo of a cat", "", "salt &amp; pepper \u2014 \u201cquoted\u201d \U0001F436 \u5bcc\u58eb\u5c71"]


def reference_model(seed: int) -> CLIPTextModel:
    """A CLIPTextModel with random weights, configured here independently of ldm.conditioning.text_encoder."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                            projection_dim=32, layer_norm_eps=1e-5)
    model = CLIPTextModel(config).eval()
    with torch.no_grad():  # perturb LayerNorms and biases too, so that every tensor matters
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model


def compvis_state_dict(model: CLIPTextModel, text_model: bool, position_ids: str | None) -> dict[str, torch.Tensor]:
    """The model's weights under SD v1 checkpoint keys (``cond_stage_model.transformer.[text_model.]*``)."""
    inner = CLIP_PREFIX + ("text_model." if text_model else "")
    sd = {inner + key.removeprefix("text_model."): value.clone() for key, value in model.state_dict().items()}
    if position_ids == "long":
        sd[inner + "embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    elif position_ids == "float":  # some merged files store it as (rounded) floats
        sd[inner + "embeddings.position_ids"] = torch.arange(77, dtype=torch.float32).unsqueeze(0) + 1e-3
    return sd


def load_with_diffusers(checkpoint: dict[str, torch.Tensor], seed: int) -> CLIPTextModel:
    """diffusers' ``create_diffusers_clip_model_from_ldm`` path, minus the config download."""
    model = reference_model(seed)
    converted = convert_ldm_clip_checkpoint(checkpoint)
    if not hasattr(model, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        converted = {key.removeprefix("text_model."): value for key, value in converted.items()}
    result = model.load_state_dict(converted, strict=False)
    assert result.missing_keys == []
    assert all(key.endswith("position_ids") for key in result.unexpected_keys)
    return model


def strip_prefix(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the loader hands to normalize_text_encoder_keys."""
    return {key[len(CLIP_PREFIX):]: value for key, value in checkpoint.items() if key.startswith(CLIP_PREFIX)}


@pytest.fixture(scope="module")
def source() -> CLIPTextModel:
    return reference_model(seed=1)


@pytest.mark.parametrize("position_ids", [None, "long", "float"])
@pytest.mark.parametrize("text_model", [True, False], ids=["text_model", "no_text_model"])
def test_compvis_keys_load_strictly_and_match_diffusers(source, text_model, position_ids):
    checkpoint = compvis_state_dict(source, text_model, position_ids)
    # a few unrelated entries, as in a full SD checkpoint
    checkpoint["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    checkpoint["first_stage_model.decoder.conv_out.bias"] = torch.zeros(3)

    encoder = CLIPTextEncoder(TINY)
    ids = encoder.tokenize(PROMPTS)
    before = encoder(ids)

    normalized = encoder.normalize_text_encoder_keys(strip_prefix(checkpoint))
    assert set(normalized) == set(encoder.transformer.state_dict())
    encoder.transformer.load_state_dict(normalized, strict=True)

    reference = load_with_diffusers(checkpoint, seed=2)
    with torch.no_grad():
        expected = reference(input_ids=ids).last_hidden_state
        got = encoder(ids)
    assert got.shape == (3, 77, 32)
    assert not torch.allclose(before, expected, atol=1e-3)  # the load did change the weights
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(encoder.encode(PROMPTS), expected, rtol=0, atol=1e-5)


def test_module_function_uses_installed_layout(source):
    sub = strip_prefix(compvis_state_dict(source, text_model=True, position_ids="long"))
    assert normalize_text_encoder_keys(sub).keys() == CLIPTextModel(source.config).state_dict().keys()


def test_prefixed_layout_of_older_transformers(source):
    """transformers < 5.6 keys carry ``text_model.``; some versions also keep position_ids in the state dict."""
    bare = [key.removeprefix("text_model.") for key in source.state_dict()]
    expected = {"text_model." + key for key in bare} | {"text_model.embeddings.position_ids"}
    for text_model in (True, False):
        sub = strip_prefix(compvis_state_dict(source, text_model, position_ids="float"))
        out = normalize_text_encoder_keys(sub, expected)
        assert set(out) == expected
        assert out["text_model.embeddings.position_ids"].dtype == torch.int64
        assert out["text_model.embeddings.position_ids"].tolist() == [list(range(77))]
        assert torch.equal(out["text_model.final_layer_norm.weight"], sub[
            ("text_model." if text_model else "") + "final_layer_norm.weight"])


def test_unknown_and_missing_keys_are_reported_by_strict_load(source):
    encoder = CLIPTextEncoder(TINY)
    sub = strip_prefix(compvis_state_dict(source, text_model=True, position_ids=None))
    del sub["text_model.encoder.layers.1.mlp.fc2.bias"]
    sub["text_model.encoder.layers.0.self_attn.bogus.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError) as error:
        encoder.transformer.load_state_dict(encoder.normalize_text_encoder_keys(sub), strict=True)
    assert "encoder.layers.1.mlp.fc2.bias" in str(error.value)
    assert "encoder.layers.0.self_attn.bogus.weight" in str(error.value)


def test_frozen_eval_module_and_encode_device():
    encoder = CLIPTextEncoder(TINY)
    assert not encoder.training and not encoder.transformer.training
    assert not any(p.requires_grad for p in encoder.parameters())
    out = encoder.encode(["a photo of a cat", "a dog"])
    assert out.shape == (2, 77, 32) and out.dtype == torch.float32 and not out.requires_grad
    assert out.device == encoder.transformer.get_input_embeddings().weight.device
    with pytest.raises(ValueError):
        encoder(torch.zeros(2, 78, dtype=torch.long))


def test_tokenizer_dir_does_not_depend_on_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert CLIPTextEncoder(TINY).tokenize(["a photo"])[0, :4].tolist() == [49406, 320, 1125, 49407]
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        CLIPTextEncoder(TINY, tokenizer_dir=tmp_path)


def test_vocab_smaller_than_tokenizer_is_a_config_error():
    with pytest.raises(ConfigError):
        CLIPTextEncoder(TextEncoderConfig(vocab_size=1000, hidden_size=8, intermediate_size=8,
                                          num_hidden_layers=1, num_attention_heads=2, projection_dim=8))


def test_full_vit_l14_text_parameter_count():
    """SD v1's text encoder (CLIP ViT-L/14 text tower); builds in ~2.5 s on this CPU."""
    encoder = CLIPTextEncoder(TextEncoderConfig())
    assert sum(p.numel() for p in encoder.parameters()) == 123_060_480
    assert encoder.transformer.config.hidden_act == "quick_gelu"
