"""LoRA inputs: names, unmatched and unsupported keys, file safety, the webui's hash and prompt tags,
and the memory modes (a merged LoRA moves exactly the bytes the plain model moves)."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle

import pytest
import torch

from ldm.loading.lora import (
    LoraError,
    apply_loras,
    extract_lora_tags,
    find_lora_file,
    lora_hashes_text,
    lora_short_hash,
    parse_lora_argument,
    text_encoder_lora_key,
)
from ldm.loading.lora_layouts import split_lora_key
from ldm.loading.stable_diffusion import load_stable_diffusion
from ldm.memory.residency import Residency
from tests import lora_files

KEY = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
TE_KEY = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.fixture
def sd(tiny_checkpoint, tiny_config_path):
    return load_stable_diffusion(tiny_checkpoint, tiny_config_path)


def pair(key, fan_in=32, fan_out=32, rank=2):
    return {f"{key}.lora_down.weight": torch.randn(rank, fan_in), f"{key}.lora_up.weight": torch.randn(fan_out, rank)}


def test_split_lora_key_layouts():
    assert split_lora_key(f"{KEY}.lora_down.weight") == (KEY, "lora_down.weight")
    assert split_lora_key("unet.mid_block.attentions.0.proj_in.lora_B.weight") == ("unet.mid_block.attentions.0.proj_in", "lora_up.weight")
    assert split_lora_key("unet.x.to_k.lora_A.default.weight") == ("unet.x.to_k", "lora_down.weight")
    assert split_lora_key("text_encoder.text_model.encoder.layers.0.self_attn.to_out_lora.up.weight") == (
        "text_encoder.text_model.encoder.layers.0.self_attn.out_proj", "lora_up.weight")
    assert split_lora_key("unet.a.attn2.processor.to_out_lora.down.weight") == ("unet.a.attn2.to_out.0", "lora_down.weight")
    assert split_lora_key("text_encoder.t.mlp.fc1.lora_linear_layer.down.weight") == ("text_encoder.t.mlp.fc1", "lora_down.weight")
    assert split_lora_key("model.diffusion_model.out.2.weight") is None


def test_unmatched_keys_one_warning_line_with_the_count(sd, tmp_path, caplog):
    tensors = {**pair(KEY), "lora_unet_no_such_layer.lora_down.weight": torch.ones(2, 3), "bundle_emb.x": torch.ones(1)}
    path = lora_files.save(tensors, tmp_path / "some.safetensors")
    with caplog.at_level(logging.WARNING, logger="ldm.loading.lora"):
        (lora, _), = apply_loras(sd, [(path, 1.0)])
    assert lora.unmatched_keys == 2
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 4 keys match no layer" in warnings[0] and "\n" not in warnings[0]


def test_a_file_that_matches_nothing_is_an_error_naming_it(sd, tmp_path):
    path = lora_files.save({"lora_unet_nothing_here.lora_down.weight": torch.ones(2, 3)}, tmp_path / "sdxl_only.safetensors")
    with pytest.raises(LoraError, match="sdxl_only.safetensors: none of its 1 keys") as error:
        apply_loras(sd, [(path, 1.0)])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("part, layout", [("dora_scale", "DoRA"), ("oft_blocks", "OFT"), ("diff", "full-weight"), ("w_norm", "norm")])
def test_unsupported_network_layouts_are_refused_by_name(sd, tmp_path, part, layout):
    tensors = {**pair(KEY), f"{KEY}.{part}": torch.ones(32, 1)} if part == "dora_scale" else {f"{KEY}.{part}": torch.ones(2, 2)}
    if part == "w_norm":  # LyCORIS norm layers: GroupNorm weights, which no LoRA layer targets
        tensors = {**pair(KEY), "lora_unet_down_blocks_0_resnets_0_norm1.w_norm": torch.ones(32)}
    path = lora_files.save(tensors, tmp_path / "other.safetensors")
    with pytest.raises(LoraError, match=f"other.safetensors: .*{layout}"):
        apply_loras(sd, [(path, 1.0)])


def test_a_lora_for_another_model_is_refused_by_shape(sd, tmp_path):
    path = lora_files.save(pair(KEY, fan_in=40, fan_out=40), tmp_path / "sd2.safetensors")
    with pytest.raises(LoraError, match=r"sd2.safetensors: .*another model"):
        apply_loras(sd, [(path, 1.0)])


def test_pickled_lora_goes_through_the_restricted_unpickler(sd, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as handle:
        pickle.dump({f"{KEY}.lora_down.weight": Payload()}, handle, protocol=2)
    with pytest.raises(LoraError, match="refusing to load .*evil.pt"):
        apply_loras(sd, [(evil, 1.0)])
    assert not marker.exists()
    with pytest.raises(LoraError, match="LoRA file not found"):
        apply_loras(sd, [(tmp_path / "missing.safetensors", 1.0)])


def test_short_hash_is_the_webuis(tmp_path):
    """safetensors: sha256 of the bytes after the header (so metadata edits keep it), or the trainer's
    ``sshs_model_hash``; other files: sha256 of the whole file. 12 hex digits."""
    tensors = pair(KEY)
    plain = lora_files.save(tensors, tmp_path / "a.safetensors")
    tagged = lora_files.save(tensors, tmp_path / "b.safetensors", {"ss_output_name": "something else"})
    raw = plain.read_bytes()
    data = raw[8 + int.from_bytes(raw[:8], "little"):]
    assert lora_short_hash(plain) == hashlib.sha256(data).hexdigest()[:12] == lora_short_hash(tagged)
    stored = lora_files.save(tensors, tmp_path / "c.safetensors", {"sshs_model_hash": "0123456789abcdef" * 4})
    assert lora_short_hash(stored) == "0123456789ab"
    pt = lora_files.save(tensors, tmp_path / "d.pt")
    assert lora_short_hash(pt) == hashlib.sha256(pt.read_bytes()).hexdigest()[:12]


def test_metadata_and_embedding_cache_key(sd, tmp_path):
    unet_only = lora_files.save(pair(KEY), tmp_path / "style.safetensors")
    both = lora_files.save({**pair(KEY), **pair(TE_KEY)}, tmp_path / "char,v2.safetensors")
    loaded = apply_loras(sd, [(unet_only, 0.5), (both, -1.0)])
    assert lora_hashes_text(loaded) == f"style: {loaded[0][0].short_hash}, charv2: {loaded[1][0].short_hash}"
    assert lora_hashes_text(loaded, names=["my:style", "b"]).startswith("mystyle: ")
    assert text_encoder_lora_key(loaded) == f"lora {loaded[1][0].short_hash}*-1.0"
    assert text_encoder_lora_key([loaded[0]]) == text_encoder_lora_key([(loaded[1][0], 0.0)]) == ""


def test_lora_argument_and_prompt_tags(tmp_path):
    assert parse_lora_argument("x.safetensors") == ("x.safetensors", 1.0)
    assert parse_lora_argument("dir/x.safetensors:-0.75") == ("dir/x.safetensors", -0.75)
    assert parse_lora_argument(r"C:\loras\x.safetensors") == (r"C:\loras\x.safetensors", 1.0)
    text, tags = extract_lora_tags("a cat <lora:Style_1:0.8>, <hypernet:h:1> in <LORA:b> snow<lyco:c:-1>")
    assert text == "a cat ,  in  snow"  # every extra-network tag leaves the text, as in the webui
    assert tags == [("Style_1", 0.8), ("b", 1.0), ("c", -1.0)]
    with pytest.raises(LoraError, match="only <lora:NAME>"):
        extract_lora_tags("<lora:a:1:0.5>")
    with pytest.raises(LoraError, match="must be a number"):
        extract_lora_tags("<lora:a:strong>")
    (tmp_path / "sub").mkdir()
    lora_files.save(pair(KEY), tmp_path / "sub" / "Style_1.safetensors")
    assert find_lora_file("Style_1", tmp_path) == tmp_path / "sub" / "Style_1.safetensors"
    with pytest.raises(LoraError, match="no nope.safetensors"):
        find_lora_file("nope", tmp_path)


def run_low_mode(sd):
    events = []
    residency = Residency(sd, "cpu", "low", track_cpu_copies=True, on_transfer=events.append)
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500.0]), torch.randn(1, 77, 32)
    with torch.no_grad(), residency.use("text_encoder") as text_encoder:
        text_encoder(torch.zeros(1, 77, dtype=torch.long))
    with torch.no_grad(), residency.use("unet") as unet:
        eps = unet(x, t, context)
    on_device = peak = 0
    for event in events:  # the device bytes the transfers leave, at their highest
        on_device += event.nbytes if event.event == "onload" else -event.nbytes
        peak = max(peak, on_device)
    residency.release()
    return events, peak, eps


def test_low_mode_moves_the_same_bytes_with_a_lora(sd, tiny_checkpoint, tiny_config_path, tmp_path):
    """The merge changes weights in place of the old ones: same transfers, same peak device bytes."""
    base = load_stable_diffusion(tiny_checkpoint, tiny_config_path)
    unet_layers, text_layers = lora_files.layers(sd.unet), lora_files.layers(sd.text_encoder.transformer)
    path = lora_files.save(lora_files.kohya_lora(unet_layers, text_layers, 41), tmp_path / "all.safetensors")
    apply_loras(sd, [(path, 1.0)])
    events_lora, peak_lora, eps_lora = run_low_mode(sd)
    events_base, peak_base, eps_base = run_low_mode(base)
    assert events_lora == events_base and peak_lora == peak_base > 0
    assert not torch.equal(eps_lora, eps_base)  # the LoRA is in the weights that were streamed
