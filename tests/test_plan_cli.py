"""``--plan`` on both scripts: the ledger's answer from the config alone (no checkpoint), as a table or JSON."""

from __future__ import annotations

import json

import pytest

from ldm.ledger import RunShape
from ldm.ledger.plan import memory_plan
from optimizedSD import optimized_img2img, optimized_txt2img
from tests.conftest import TINY_CONFIG

TINY = ["--config", str(TINY_CONFIG), "--ckpt", "no-such-file.ckpt", "--device", "cpu", "--H", "64", "--W", "64",
        "--n_samples", "1", "--sampler", "ddim", "--ddim_steps", "2"]


def test_plan_json_needs_no_checkpoint_and_has_its_documented_shape(capsys):
    assert optimized_txt2img.main(["--plan", "--json", *TINY]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["height"], data["width"], data["batch"]) == (64, 64, 1)
    assert set(data["modes"]) == {"full", "medium", "low"} and data["auto"] is None  # no GPU, no --gpu_memory
    for mode in data["modes"].values():
        assert set(mode) == {"peak_bytes", "phase_peaks", "weight_bytes"}
        assert mode["peak_bytes"] == max(mode["phase_peaks"].values()) and 0 < mode["weight_bytes"] <= mode["peak_bytes"]
    modes = data["modes"]
    assert modes["low"]["peak_bytes"] < modes["full"]["peak_bytes"]


def test_plan_table_names_autos_choice_on_the_given_card(capsys):
    assert optimized_txt2img.main(["--plan", "--gpu_memory", "64", "--vram_budget", "0.01", *TINY]) == 0
    out = capsys.readouterr().out
    assert "--vram auto on 64.00 GiB free: full" in out
    assert [line.split()[0] for line in out.splitlines()[2:6]] == ["full", "medium", "low", "low_budget"]


def test_img2img_plan_reads_the_init_image_size_and_encodes_it(tmp_path, capsys):
    from PIL import Image

    Image.new("RGB", (72, 136)).save(tmp_path / "init.png")
    argv = [a for a in TINY if a not in ("--H", "--W", "64")]
    assert optimized_img2img.main(["--plan", "--json", "--init-img", str(tmp_path / "init.png"), *argv]) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["height"], data["width"]) == (128, 64)  # floored to multiples of 64


def test_the_plan_is_the_generation_loops_run(capsys):
    """The plan runs the generation stages with the run's request; the ledger's default run (what
    scripts/gpu_check.py measures) runs the same stages with the scripts' defaults: the weights at each mode's
    peak agree, and so does the text encoder's phase."""
    assert optimized_txt2img.main(["--plan", "--json", "--negative_prompt", "", *TINY]) == 0
    stages = json.loads(capsys.readouterr().out)["modes"]
    library = memory_plan(str(TINY_CONFIG), RunShape(64, 64, 1, "ddim", 2)).as_json()["modes"]
    for mode in ("full", "medium", "low"):
        assert stages[mode]["weight_bytes"] == library[mode]["weight_bytes"]
        assert stages[mode]["phase_peaks"]["text_encoder"] == library[mode]["phase_peaks"]["text_encoder"]


def test_the_run_and_the_ledger_call_the_same_stage_functions():
    """One generation loop: the command line and the VRAM ledger (--plan, batch parts, low mode's tiles,
    scripts/gpu_check.py) hold the very same stage functions of ldm.pipeline, not copies."""
    from ldm.ledger import calls
    from ldm.pipeline import batches, decode, encode, prepare, sample
    from optimizedSD import generation

    stages = {"encode_prompts": encode, "sample_batch": sample, "decode_and_write": decode, "plan_batches": batches}
    for name, module in stages.items():
        assert getattr(calls, name) is getattr(module, name) is getattr(generation, name)
    assert calls.InitImage is prepare.InitImage


def test_plan_prints_its_table_only(capfd):
    """No progress bar of the simulated sampling comes before the table."""
    assert optimized_txt2img.main(["--plan", *TINY]) == 0
    out, err = capfd.readouterr()
    assert out.splitlines()[0].startswith("64x64, batch 1, ddim") and err == ""


@pytest.mark.parametrize("extra, message", [(["--json"], "go with --plan"), (["--gpu_memory", "2"], "go with --plan"),
                                            (["--plan", "--gpu_memory", "0"], "positive number of GB")])
def test_plan_flag_errors(capsys, extra, message):
    assert optimized_txt2img.main([*extra, *TINY]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
