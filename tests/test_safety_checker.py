"""The safety checker against diffusers' ``StableDiffusionSafetyChecker`` and transformers' ``CLIPImageProcessor``.

The oracle is a tiny random-weight checker (CLIP vision width 32, 2 layers, 32 px input) written by diffusers'
own ``save_pretrained``; thresholds are placed between the oracle's own cosine similarities so that some
images are flagged, some are not, and one is flagged only through the special-care adjustment.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.models.safety_checker import (
    ImagePreprocessor,
    SafetyCheckerError,
    _center_crop,
    censor,
    check_images,
    load_safety_checker,
)

SIZES = [(48, 64), (40, 40), (100, 30), (32, 32), (24, 20), (64, 64), (33, 57), (80, 48)]
CONCEPT, SPECIAL, ADJUSTED = 10, 2, 5  # the concepts the thresholds are placed for


def _images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    images = []
    for index, (h, w) in enumerate(SIZES):
        if index % 2 == 0:
            images.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        else:  # smooth colour ramps: the other kind of picture
            y, x = np.mgrid[0:h, 0:w]
            ramp = np.stack([x / w, y / h, (x + y) / (w + h)], -1) * (rng.random(3) * 255)
            images.append((ramp % 256).astype(np.uint8))
    return images


def clip_processor_class():
    """transformers' Pillow-backed CLIP preprocessing: ``CLIPImageProcessorPil`` in 5.x, the slow
    ``CLIPImageProcessor`` in 4.x (both read images through Pillow and numpy)."""
    import transformers

    return getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor


def _gap_threshold(values: np.ndarray) -> float:
    """The midpoint of the widest gap between sorted values (both sides non-empty)."""
    ordered = np.sort(values)
    gaps = np.diff(ordered)
    i = int(np.argmax(gaps))
    return float((ordered[i] + ordered[i + 1]) / 2)


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    """(diffusers checker, transformers processor, pipeline folder) with thresholds set from its own scores."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker, cosine_distance
    from transformers import CLIPConfig

    torch.manual_seed(0)
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32, patch_size=4)
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
    model = StableDiffusionSafetyChecker(CLIPConfig(vision_config=vision, text_config=text, projection_dim=16)).eval()
    processor = clip_processor_class()(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pixels = processor([Image.fromarray(a) for a in _images()], return_tensors="pt").pixel_values
    with torch.no_grad():
        model.concept_embeds.normal_()
        model.special_care_embeds.normal_()
        embeds = model.visual_projection(model.vision_model(pixels)[1])
        concept = cosine_distance(embeds, model.concept_embeds).numpy()
        special = cosine_distance(embeds, model.special_care_embeds).numpy()
        model.concept_embeds_weights.fill_(1.0)  # no concept fires...
        model.special_care_embeds_weights.fill_(1.0)
        model.concept_embeds_weights[CONCEPT] = _gap_threshold(concept[:, CONCEPT])  # ...but these split the images
        model.special_care_embeds_weights[SPECIAL] = _gap_threshold(special[:, SPECIAL])
        special_hit = np.nonzero(special[:, SPECIAL] > model.special_care_embeds_weights[SPECIAL].item())[0]
        unflagged_hit = [i for i in special_hit if concept[i, CONCEPT] < model.concept_embeds_weights[CONCEPT].item()]
        assert unflagged_hit, "fixture: need a special-care image not flagged by the main concept"
        # 0.005 above that image's similarity: flagged only because the special-care hit lowers it by 0.01
        model.concept_embeds_weights[ADJUSTED] = float(concept[unflagged_hit[0], ADJUSTED]) + 0.005
    root = tmp_path_factory.mktemp("pipeline")
    model.save_pretrained(root / "safety_checker")
    processor.save_pretrained(root / "feature_extractor")
    return model, processor, root


def _oracle_flags(model, processor, images) -> tuple[list[bool], list[np.ndarray]]:
    pixels = processor([Image.fromarray(a) for a in images], return_tensors="pt").pixel_values
    checked, flags = model(clip_input=pixels, images=[a.copy() for a in images])
    return [bool(f) for f in flags], checked


def test_preprocessing_equals_clip_image_processor(oracle):
    _, processor, root = oracle
    _, ours = load_safety_checker(root / "safety_checker")
    images = _images()
    theirs = processor([Image.fromarray(a) for a in images], return_tensors="pt").pixel_values
    assert torch.equal(ours(images), theirs)


def test_legacy_preprocessor_config_equals_transformers_reading_of_it():
    """SD v1 repositories' ``feature_extractor/preprocessor_config.json`` uses int sizes (``"size": 224``)."""
    legacy = {"crop_size": 224, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_resize": True,
              "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
              "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224}
    images = [np.random.default_rng(1).integers(0, 256, (256, 320, 3), dtype=np.uint8)]
    theirs = clip_processor_class().from_dict(legacy)([Image.fromarray(a) for a in images], return_tensors="pt").pixel_values
    assert torch.equal(ImagePreprocessor.from_config(legacy)(images), theirs)


def test_center_crop_pads_small_images_as_transformers_does():
    from transformers.image_transforms import center_crop

    chw = np.arange(3 * 5 * 7, dtype=np.uint8).reshape(3, 5, 7)
    for size in [(4, 4), (8, 9), (6, 3), (5, 7)]:
        assert np.array_equal(_center_crop(chw, *size), center_crop(chw, size, input_data_format="channels_first"))


def test_flags_equal_diffusers_safety_checker(oracle):
    model, processor, root = oracle
    checker, preprocessor = load_safety_checker(root)  # the pipeline folder: finds safety_checker/ inside
    images = _images()
    expected, checked = _oracle_flags(model, processor, images)
    verdicts = check_images(checker, preprocessor, images)
    assert [v.flagged for v in verdicts] == expected
    assert 0 < sum(expected) < len(expected), "fixture must flag some images and not others"
    adjusted = [i for i, v in enumerate(verdicts) if v.concepts == (ADJUSTED,)]
    assert adjusted and all(verdicts[i].special == (SPECIAL,) for i in adjusted)  # the 0.01 adjustment path ran
    for image, verdict, theirs in zip(images, verdicts, checked):  # black mode = diffusers' replacement
        assert np.array_equal(censor(image, "black") if verdict.flagged else image, theirs)


def test_transformers4_layout_bin_file_gives_the_same_flags(oracle, tmp_path):
    """Real files from transformers 4.x: ``vision_model.vision_model.*`` keys, stored ``position_ids``,
    ``pytorch_model.bin`` (read through the restricted unpickler), ``vision_config_dict`` in config.json."""
    model, processor, root = oracle
    folder = tmp_path / "safety_checker"
    folder.mkdir()
    state = {}
    for key, value in model.state_dict().items():
        state[key.replace("vision_model.", "vision_model.vision_model.", 1) if key.startswith("vision_model.") else key] = value
    state["vision_model.vision_model.embeddings.position_ids"] = torch.arange(65)[None]
    torch.save(state, folder / "pytorch_model.bin")
    config = json.loads((root / "safety_checker" / "config.json").read_text())
    config["vision_config_dict"] = {"num_hidden_layers": config["vision_config"].pop("num_hidden_layers")}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "preprocessor_config.json").write_text((root / "feature_extractor" / "preprocessor_config.json").read_text())
    checker, preprocessor = load_safety_checker(folder)
    images = _images()
    assert [v.flagged for v in check_images(checker, preprocessor, images)] == _oracle_flags(model, processor, images)[0]


def test_bad_folders_give_one_line_errors(oracle, tmp_path):
    _, _, root = oracle
    with pytest.raises(SafetyCheckerError, match="not found"):
        load_safety_checker(tmp_path / "nowhere")
    with pytest.raises(SafetyCheckerError, match="no config.json"):
        load_safety_checker(tmp_path)
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text((root / "safety_checker" / "config.json").read_text())
    with pytest.raises(SafetyCheckerError, match="no weights"):
        load_safety_checker(folder)
    from safetensors.torch import load_file, save_file

    weights = load_file(root / "safety_checker" / "model.safetensors")
    weights.pop("visual_projection.weight")
    weights["vision_model.extra.weight"] = torch.zeros(1)
    weights["concept_embeds"] = weights["concept_embeds"]
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "model.safetensors")
    with pytest.raises(SafetyCheckerError, match="not a safety checker"):
        load_safety_checker(folder)
    weights["visual_projection.weight"] = torch.zeros(16, 32)
    save_file({k: v.contiguous() for k, v in weights.items()}, folder / "model.safetensors")
    with pytest.raises(SafetyCheckerError, match=r"unexpected 1 keys \(vision_model.extra.weight\)") as error:
        load_safety_checker(folder)
    assert "\n" not in str(error.value)


def test_censor_modes():
    image = np.random.default_rng(2).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    assert not censor(image, "black").any()
    blurred = censor(image, "blur")
    assert blurred.shape == image.shape and blurred.dtype == np.uint8
    assert blurred.std() < image.std() / 4  # radius 6 px on noise: the detail is gone
    assert censor(image, "warn") is image
    with pytest.raises(ValueError):
        censor(image, "pink")


@pytest.mark.parametrize("mode", ["full", "medium", "low"])
def test_runs_under_the_residency_and_its_bytes_are_counted(oracle, tiny_checkpoint, tiny_config_path, mode):
    """On a CPU stand-in device with real copies: in medium and low mode the checker is the only model on the
    device while it runs and leaves when the UNet comes; its bytes are in the residency's count; same flags."""
    from ldm.loading.stable_diffusion import load_stable_diffusion
    from ldm.memory.estimates import model_bytes
    from ldm.memory.residency import Residency

    model, processor, root = oracle
    checker, preprocessor = load_safety_checker(root)
    checker_bytes = sum(t.numel() * t.element_size() for t in list(checker.parameters()) + list(checker.buffers()))
    sd = load_stable_diffusion(tiny_checkpoint, tiny_config_path)
    events = []
    residency = Residency(sd, "cpu", mode, track_cpu_copies=True, on_transfer=events.append,
                          extra_models={"safety_checker": checker})
    images = _images()
    with residency.use("vae"):
        pass
    with residency.use("safety_checker") as on_device:
        assert on_device is checker
        if mode != "full":
            assert residency.on_device() == ["safety_checker"]
        during = residency.resident_bytes
        verdicts = check_images(on_device, preprocessor, images)
    with residency.use("unet"):
        assert ("safety_checker" in residency.on_device()) == (mode == "full")
    residency.release()
    assert residency.on_device() == [] and residency.resident_bytes == 0
    assert [v.flagged for v in verdicts] == _oracle_flags(model, processor, images)[0]
    onloads = [e for e in events if e.event == "onload" and e.group == "safety_checker"]
    assert [e.nbytes for e in onloads] == [checker_bytes]
    expected = checker_bytes + (model_bytes(sd)["vae"] if mode == "full" else 0)
    assert during == expected


def test_auto_mode_counts_the_checker_weights():
    """SD v1 fp16 with the real checker's 304M-parameter ViT-L/14 (0.61 GB fp16): free memory that just fits full
    mode without it picks medium with it."""
    from ldm.memory.estimates import DEVICE_RESERVE_BYTES as RESERVE_BYTES, SAFETY, model_bytes, working_bytes
    from ldm.memory.mode_choice import resolve_mode

    need = sum(model_bytes().values()) + max(working_bytes(512, 512, 1).values())
    free = int(need * SAFETY + RESERVE_BYTES) + 1
    assert resolve_mode("auto", "cuda", 512, 512, 1, free_bytes=free) == "full"
    assert resolve_mode("auto", "cuda", 512, 512, 1, free_bytes=free, extra_bytes=304_000_000 * 2) == "medium"
