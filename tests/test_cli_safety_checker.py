"""``--safety_checker DIR`` end to end: the images diffusers' ``StableDiffusionSafetyChecker`` flags (tiny random
weights, written by diffusers' ``save_pretrained``) come out black / blurred / as they were, marked in the
metadata and counted in the summary; the others are the images of a run without the checker."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.models.safety_checker import censor
from optimizedSD import optimized_txt2img
from optimizedSD.infotext import read_parameters
from tests.test_cli_txt2img import TINY_CONFIG, pixels
from tests.test_safety_checker import clip_processor_class

CONCEPT = 3


def _run(ckpt, outdir, *extra) -> int:
    return optimized_txt2img.main(["--ckpt", str(ckpt), "--config", str(TINY_CONFIG), "--device", "cpu",
                                   "--outdir", str(outdir), "--H", "64", "--W", "64", "--ddim_steps", "2",
                                   "--n_samples", "3", "--n_iter", "2", "--seed", "11", "--prompt", "a tiny test",
                                   "--sampler", "ddim", "--skip_grid", *extra])


@pytest.fixture(scope="module")
def baseline(tiny_checkpoint, tmp_path_factory):
    outdir = tmp_path_factory.mktemp("baseline")
    assert _run(tiny_checkpoint, outdir) == 0
    return {p.name: pixels(p).astype(np.uint8) for p in sorted((outdir / "a_tiny_test").iterdir())}


@pytest.fixture(scope="module")
def checker_dir(baseline, tmp_path_factory):
    """A tiny diffusers checker whose one live threshold splits the baseline images into flagged and not."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker, cosine_distance
    from transformers import CLIPConfig

    torch.manual_seed(1)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=4)
    model = StableDiffusionSafetyChecker(CLIPConfig(vision_config=vision, text_config=dict(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2), projection_dim=16)).eval()
    processor = clip_processor_class()(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pixel_values = processor([Image.fromarray(a) for a in baseline.values()], return_tensors="pt").pixel_values
    with torch.no_grad():
        model.concept_embeds.normal_()
        model.special_care_embeds.normal_()
        cosine = cosine_distance(model.visual_projection(model.vision_model(pixel_values)[1]), model.concept_embeds)[:, CONCEPT]
        ordered = cosine.sort().values
        gap = int((ordered[1:] - ordered[:-1]).argmax())
        model.concept_embeds_weights.fill_(1.0)
        model.special_care_embeds_weights.fill_(1.0)
        model.concept_embeds_weights[CONCEPT] = float(ordered[gap] + ordered[gap + 1]) / 2
    root = tmp_path_factory.mktemp("checker")
    model.save_pretrained(root / "safety_checker")
    processor.save_pretrained(root / "feature_extractor")
    _, flags = model(clip_input=pixel_values, images=[a.copy() for a in baseline.values()])
    assert 0 < sum(flags) < len(flags)
    return root, dict(zip(baseline, (bool(f) for f in flags)))


@pytest.mark.parametrize("mode", ["black", "blur", "warn"])
def test_flagged_images_are_replaced_marked_and_counted(tiny_checkpoint, tmp_path, baseline, checker_dir, mode, capsys):
    root, flags = checker_dir
    assert _run(tiny_checkpoint, tmp_path, "--safety_checker", str(root), "--safety_checker_mode", mode) == 0
    out = capsys.readouterr().out
    for name, image in baseline.items():
        path = tmp_path / "a_tiny_test" / name
        expected = censor(image, mode) if flags[name] else image
        assert np.array_equal(pixels(path), expected), name
        assert ("Safety checker: flagged (" + mode + ")" in read_parameters(path)) == flags[name]
    assert f"{sum(flags.values())} flagged by the safety checker ({mode})" in out


def test_a_wrong_checker_folder_is_one_line_before_loading(tiny_checkpoint, tmp_path, capsys):
    assert _run(tiny_checkpoint, tmp_path, "--safety_checker", str(tmp_path / "nowhere")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "safety checker folder not found" in err
    assert _run(tiny_checkpoint, tmp_path, "--safety_checker_mode", "blur") == 2
    assert "needs --safety_checker" in capsys.readouterr().err
