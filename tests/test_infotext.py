"""Infotext read back as the webui reads it, the JPEG UserComment as type UNDEFINED, and ``--from_png``'s
mapping of the fields (honoured or named in the warning)."""

from __future__ import annotations

import json
import re
import struct

import numpy as np
import piexif
import piexif.helper
import pytest
from PIL import Image, PngImagePlugin

from optimizedSD.from_png import FromPngError, restore_settings
from optimizedSD.infotext import Infotext, parse_infotext, read_parameters, user_comment_exif


# ---- the webui's reader, restated (modules/images.py::read_info_from_image and
# ---- modules/infotext_utils.py::parse_generation_parameters, the parts that read the text) ---------
WEBUI_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def webui_read_info_from_image(image: Image.Image) -> str | None:
    items = dict(image.info or {})
    text = items.pop("parameters", None)
    if "exif" in items:
        exif = piexif.load(items["exif"])
        comment = (exif or {}).get("Exif", {}).get(piexif.ExifIFD.UserComment, b"")
        try:
            comment = piexif.helper.UserComment.load(comment)
        except ValueError:
            comment = comment.decode("utf8", errors="ignore")
        if comment:
            text = comment
    return text


def webui_parse_generation_parameters(x: str) -> dict[str, str]:
    res: dict[str, str] = {}
    prompt, negative_prompt, done_with_prompt = "", "", False
    *lines, lastline = x.strip().split("\n")
    if len(WEBUI_PARAM.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt = True
            line = line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    res["Prompt"], res["Negative prompt"] = prompt, negative_prompt
    for k, v in WEBUI_PARAM.findall(lastline):
        if v[0] == '"' and v[-1] == '"':
            v = json.loads(v)
        res[k] = v
    return res


INFOTEXTS = [
    "a (red:1.3) cat, [blurry]\nNegative prompt: lowres, bad anatomy\n"
    "Steps: 20, Sampler: Euler a, Schedule type: Uniform, CFG scale: 7.0, Seed: 42, Size: 512x768, "
    'Model hash: 6ce0161689, RNG: CPU, TI hashes: "my-style: 0123456789ab, other: ba9876543210", Version: v1.10.1',
    "two\nline prompt\nNegative prompt: first\nsecond\nSteps: 30, Sampler: DPM++ 2M, CFG scale: 6.5, Seed: 1, Size: 64x64",
    "only a prompt, no parameters",
    'cat:0.5 dog\nSteps: 10, Sampler: DDIM, CFG scale: 7.5, Seed: 3, Size: 64x64, Prompt syntax: fork, '
    'Lora hashes: "a: 1, b: 2", Hires upscale: 2',
]


@pytest.mark.parametrize("text", INFOTEXTS)
def test_parse_infotext_reads_as_the_webui(text):
    ours = parse_infotext(text)
    webui = webui_parse_generation_parameters(text)
    assert ours.prompt == webui.pop("Prompt")
    assert ours.negative_prompt == webui.pop("Negative prompt")
    assert ours.fields == webui


def _image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8))


@pytest.mark.parametrize("text", INFOTEXTS[:2] + ["unicode \u5bcc\u58eb\u5c71 \U0001F436 \u201cq\u201d"])
def test_jpeg_user_comment_undefined_reads_in_the_webui_and_here(tmp_path, text):
    path = tmp_path / "image.jpg"
    _image().save(path, format="JPEG", quality=95, exif=user_comment_exif(text))
    with Image.open(path) as image:
        assert webui_read_info_from_image(image) == text
        tag_type = _user_comment_type(image.info["exif"])
    assert tag_type == 7  # UNDEFINED
    assert read_parameters(path) == text


def test_pillows_byte_typed_user_comment_is_what_the_webui_cannot_read(tmp_path):
    """Why user_comment_exif exists: Pillow writes bytes as type BYTE, piexif returns a tuple."""
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + "a cat".encode("utf-16-be")
    path = tmp_path / "pillow.jpg"
    _image().save(path, format="JPEG", exif=exif.tobytes())
    with Image.open(path) as image:
        assert _user_comment_type(image.info["exif"]) == 1  # BYTE
        with pytest.raises(AttributeError):
            webui_read_info_from_image(image)
    assert read_parameters(path) == "a cat"  # our reader copes with both


def test_png_parameters_chunk(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", INFOTEXTS[0])
    path = tmp_path / "image.png"
    _image().save(path, format="PNG", pnginfo=info)
    with Image.open(path) as image:
        assert webui_read_info_from_image(image) == INFOTEXTS[0]
    assert read_parameters(path) == INFOTEXTS[0]
    _image().save(tmp_path / "bare.png")
    assert read_parameters(tmp_path / "bare.png") is None


def _user_comment_type(exif: bytes) -> int:
    """The TIFF type of the UserComment entry: IFD0 -> Exif IFD pointer (0x8769) -> entry 0x9286."""
    data = exif[6:] if exif.startswith(b"Exif\0\0") else exif
    order = ">" if data[:2] == b"MM" else "<"

    def entries(offset):
        (count,) = struct.unpack(order + "H", data[offset:offset + 2])
        for i in range(count):
            yield struct.unpack(order + "HHII", data[offset + 2 + 12 * i: offset + 14 + 12 * i])

    (ifd0,) = struct.unpack(order + "I", data[4:8])
    exif_ifd = next(value for tag, _, _, value in entries(ifd0) if tag == 0x8769)
    return next(kind for tag, kind, _, _ in entries(exif_ifd) if tag == 0x9286)


# ---- --from_png -----------------------------------------------------------------------------------
LABELS = {"DDIM": "ddim", "PLMS": "plms", "DPM++ 2M": "dpmpp_2m", "Euler": "euler", "Euler a": "euler_a",
          "Heun": "heun", "DPM2": "dpm2", "DPM2 a": "dpm2_a", "LMS": "lms"}


def test_our_own_infotext_is_honoured_whole():
    text = ("a (red:1.3) cat\nNegative prompt: blurry\nSteps: 20, Sampler: DPM2 a, Schedule type: Uniform, "
            "CFG scale: 6.5, Seed: 1234, Size: 64x128, Model hash: 6ce0161689, Clip skip: 2, "
            "Denoising strength: 0.6, RNG: CPU, TI hashes: \"my-style: 0123456789ab\", Version: optimizedSD")
    restored = restore_settings(parse_infotext(text), img2img=True, sampler_labels=LABELS,
                                model_hash="6ce0161689", embedding_hashes={"my-style": "0123456789ab"})
    assert restored.values == {
        "prompt": "a (red:1.3) cat", "negative_prompt": "blurry", "prompt_syntax": "webui", "sampler": "dpm2_a",
        "steps": 20, "scale": 6.5, "seed": 1234, "clip_skip": 2, "width": 64, "height": 128, "strength": 0.6,
        "schedule": "uniform", "rng": "cpu"}
    assert restored.ignored == [] and restored.warning() is None


def test_what_cannot_be_honoured_is_named_in_one_line():
    text = ("a cat\nSteps: 20, Sampler: DPM++ 2M, CFG scale: 7, Seed: 5, Size: 512x512, Model hash: deadbeef00, "
            "Denoising strength: 0.7, Hires upscale: 2, Hires upscaler: Latent, TI hashes: \"gone: 111111111111\", "
            "Lora hashes: \"x: 1\", ENSD: 31337")
    restored = restore_settings(parse_infotext(text), img2img=False, sampler_labels=LABELS, model_hash="6ce0161689")
    assert restored.values["sampler"] == "dpmpp_2m" and restored.values["steps"] == 20
    assert restored.values["schedule"] == "automatic"  # Karras for DPM++ 2M, as the webui
    assert "strength" not in restored.values  # a txt2img "Denoising strength" is the hires fix's
    assert (restored.values["hires_strength"], restored.values["hires_scale"], restored.values["hires_upscaler"]) == (
        0.7, 2.0, "Latent")  # honoured since the hires fix (ldm/passes/hires.py)
    warning = restored.warning()
    assert warning.count("\n") == 0
    assert restored.values["rng"] == "gpu" and restored.values["ensd"] == 31337  # no RNG field: the webui's GPU
    assert "Hires" not in warning and "Denoising strength" not in warning
    for part in ["Model hash: deadbeef00", "TI hashes: gone (not found)", "Lora hashes: x (no <lora:x> tag in the prompt)"]:
        assert part in warning, part


def test_lora_tags_become_loras_checked_against_lora_hashes():
    """Tags leave the prompt and name files (``find_lora``); a file with another hash, a missing file and a
    hash without a tag are named in the warning."""
    text = ("a <lora:style:0.8>cat <lora:gone> <lora:other:-1>\nSteps: 20, Seed: 5, "
            "Lora hashes: \"style: aaaaaaaaaaaa, other: bbbbbbbbbbbb, extra: cccccccccccc\"")
    files = {"style": ("/l/style.safetensors", "aaaaaaaaaaaa"), "other": ("/l/other.pt", "999999999999")}
    restored = restore_settings(parse_infotext(text), img2img=False, sampler_labels=LABELS, find_lora=files.get)
    assert restored.values["prompt"] == "a cat"
    assert restored.values["loras"] == [("/l/style.safetensors", 0.8), ("/l/other.pt", -1.0)]
    assert restored.ignored == ["<lora:gone> (not found)", "Lora hashes: other (another file)",
                                "Lora hashes: extra (no <lora:extra> tag in the prompt)"]


@pytest.mark.parametrize("sampler, schedule, honoured", [
    ("Euler a", None, True), ("Euler", "Automatic", True), ("DPM2", "Uniform", True), ("DPM2", None, True),
    ("DPM++ 2M Karras", None, True), ("Euler a", "Karras", True), ("DDIM", None, True), ("UniPC", None, False),
    ("Euler", "Karras Exponential", False),
])
def test_sampler_and_schedule(sampler, schedule, honoured):
    fields = {"Sampler": sampler, "RNG": "CPU"} | ({"Schedule type": schedule} if schedule else {})
    restored = restore_settings(Infotext("p", "", fields), img2img=False, sampler_labels=LABELS)
    assert (restored.ignored == []) == honoured, restored.ignored


def test_a_size_this_tool_cannot_make_is_named():
    restored = restore_settings(Infotext("p", "", {"Size": "520x512", "RNG": "CPU"}), img2img=False,
                                sampler_labels=LABELS)
    assert "width" not in restored.values and restored.ignored == ["Size: 520x512"]


def test_prompt_syntax_and_bad_numbers():
    restored = restore_settings(Infotext("cat:0.5 dog", "", {"Prompt syntax": "fork", "RNG": "CPU"}),
                                img2img=False, sampler_labels=LABELS)
    assert restored.values["prompt_syntax"] == "fork"
    with pytest.raises(FromPngError, match="Steps"):
        restore_settings(Infotext("p", "", {"Steps": "many"}), img2img=False, sampler_labels=LABELS)
    with pytest.raises(FromPngError, match="Size"):
        restore_settings(Infotext("p", "", {"Size": "big"}), img2img=False, sampler_labels=LABELS)
