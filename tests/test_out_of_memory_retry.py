"""Out of device memory during a batch: the batch runs again one memory mode lower, with the same result.

The out-of-memory error is injected (these machines have no GPU): the first sampling or decoding call
raises ``torch.cuda.OutOfMemoryError`` as CUDA's allocator would, and the test checks what the user
gets: the same image as a run that never failed, the mode that was used in the end, nothing left on the
device, and, when even the lowest mode fails, one line, exit code 1 and the images already written.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.memory import residency as residency_module
from ldm.models.attention import get_attention_backend, set_attention_backend
from ldm.pipeline import decode as decode_stage, model as model_stage, sample as sample_stage
from optimizedSD import optimized_txt2img

# Where each stage function the tests make fail is looked up when the run calls it.
STAGES = {"make_residency": model_stage, "decode_image": decode_stage, "run_sampler": sample_stage}

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny-random.yaml"


def argv(ckpt: Path, outdir: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(ckpt), "--config", str(TINY_CONFIG), "--device", "cpu", "--outdir", str(outdir),
            "--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "2", "--seed", "5", "--sampler", "ddim",
            "--prompt", "a tiny test", "--skip_grid", "--vram", "full", *extra]


def images(outdir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(outdir.rglob("seed_*"))}


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.int16)


@pytest.fixture
def managers(monkeypatch):
    """Every Residency the generator builds, to look at its mode and device afterwards."""
    built = []
    make = model_stage.make_residency

    def recording(*args, **kwargs):
        built.append(make(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(model_stage, "make_residency", recording)
    return built


def failing(monkeypatch, name: str, failures: int):
    """Make the stage function ``name`` raise CUDA's out-of-memory error on its first ``failures`` calls."""
    real = getattr(STAGES[name], name)
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] <= failures:
            raise residency_module.torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(STAGES[name], name, flaky)
    return calls


@pytest.fixture
def decode_backends(monkeypatch):
    """The attention backend in force at each decode: the run's backend is scoped to the run (a context
    variable), so what the retried batch used is read while it runs, not after ``main`` returns."""
    seen = []
    real = decode_stage.decode_image

    def recording(*args, **kwargs):
        seen.append(get_attention_backend().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(decode_stage, "decode_image", recording)
    return seen


@pytest.fixture(autouse=True)
def attention_backend_restored():
    yield
    set_attention_backend("sdpa")


@pytest.mark.parametrize("stage, failures, final_mode", [("run_sampler", 1, "medium"), ("run_sampler", 2, "low"),
                                                          ("decode_image", 1, "medium")])
def test_a_batch_that_runs_out_of_memory_is_retried_lower_with_the_same_images(
    tiny_checkpoint, tmp_path, monkeypatch, caplog, managers, stage, failures, final_mode
):
    assert optimized_txt2img.main(argv(tiny_checkpoint, tmp_path / "clean")) == 0
    expected = images(tmp_path / "clean")
    assert len(expected) == 2

    calls = failing(monkeypatch, stage, failures)
    with caplog.at_level(logging.WARNING, logger="ldm.memory.residency"):
        assert optimized_txt2img.main(argv(tiny_checkpoint, tmp_path / "retried")) == 0
    assert images(tmp_path / "retried") == expected  # the same bytes, no extra or missing file
    assert calls["n"] > failures
    retries = [r.getMessage() for r in caplog.records if "out of device memory" in r.getMessage()]
    assert len(retries) == failures and retries[-1].endswith(f"retrying in {final_mode} mode")
    residency = managers[-1]
    assert residency.mode == final_mode and residency.on_device() == [] and residency.resident_bytes == 0


def test_out_of_memory_in_the_lowest_mode_keeps_written_images_and_says_what_to_try(
    tiny_checkpoint, tmp_path, monkeypatch, capsys, managers
):
    real = sample_stage.run_sampler
    calls = {"n": 0}

    def second_batch_never_fits(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise residency_module.torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return real(*args, **kwargs)

    monkeypatch.setattr(sample_stage, "run_sampler", second_batch_never_fits)
    outdir = tmp_path / "out"
    assert optimized_txt2img.main(argv(tiny_checkpoint, outdir, "--n_iter", "2")) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if "error:" in line]
    assert "out of memory" in line and "Tried to allocate 9.00 GiB" in line and "--vram low" in line
    assert sorted(images(outdir)) == ["seed_5_00000.png", "seed_6_00001.png"]  # the first batch stays
    assert calls["n"] == 1 + 4  # full, then medium, then low, then low with sliced attention
    assert managers[-1].mode == "low" and managers[-1].on_device() == []


def test_a_decode_that_does_not_fit_medium_mode_is_tiled_and_the_unet_keeps_its_mode(
    tiny_checkpoint, tmp_path, monkeypatch, caplog, managers
):
    real = decode_stage.decode_image
    tiles = []

    def whole_image_never_fits(residency, latent, scale_factor, tiled, tile=None):
        if tile is None:
            raise residency_module.torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        tiles.append(tile)
        return real(residency, latent, scale_factor, tiled, tile)

    monkeypatch.setattr(decode_stage, "decode_image", whole_image_never_fits)
    outdir = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert optimized_txt2img.main(argv(tiny_checkpoint, outdir, "--H", "320", "--W", "320")) == 0
    assert sorted(images(outdir)) == ["seed_5_00000.png", "seed_6_00001.png"]
    assert tiles == [32, 32]  # one small-tile decode per image
    assert sum("decoding in 256 px tiles" in r.getMessage() for r in caplog.records) == 2
    # Only full mode stepped down (to free the UNet's memory for the VAE); low mode and sliced attention
    # would not have helped the decode and would slow the sampling of every later batch.
    assert managers[-1].mode == "medium" and get_attention_backend().name == "sdpa"


def test_a_decode_that_fails_in_small_tiles_is_sliced_for_that_image_only(tiny_checkpoint, tmp_path, monkeypatch):
    real = decode_stage.decode_image
    backends = []

    def needs_sliced_attention(residency, latent, scale_factor, tiled, tile=None):
        backends.append((tile, get_attention_backend().name))
        if get_attention_backend().name != "sliced":
            raise residency_module.torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")
        return real(residency, latent, scale_factor, tiled, tile)

    monkeypatch.setattr(decode_stage, "decode_image", needs_sliced_attention)
    assert optimized_txt2img.main(argv(tiny_checkpoint, tmp_path / "out", "--n_samples", "1")) == 0
    assert backends == [(None, "sdpa"), (None, "sdpa"), (32, "sdpa"), (32, "sliced")]  # full, medium, tiles, sliced
    assert get_attention_backend().name == "sdpa"
    assert len(images(tmp_path / "out")) == 1


def test_after_the_lowest_mode_attention_is_sliced(tiny_checkpoint, tmp_path, monkeypatch, caplog, managers,
                                                    decode_backends):
    assert optimized_txt2img.main(argv(tiny_checkpoint, tmp_path / "clean")) == 0
    failing(monkeypatch, "run_sampler", 3)  # full, medium and low fail
    decode_backends.clear()
    with caplog.at_level(logging.WARNING):
        assert optimized_txt2img.main(argv(tiny_checkpoint, tmp_path / "sliced")) == 0
    assert decode_backends[-1] == "sliced" and managers[-1].mode == "low"
    assert any("retrying with sliced attention" in r.getMessage() for r in caplog.records)
    clean, sliced = images(tmp_path / "clean"), images(tmp_path / "sliced")
    assert sorted(clean) == sorted(sliced)  # the same files; pixels within rounding of the fused result
    for name in clean:
        assert np.abs(pixels(clean[name]) - pixels(sliced[name])).max() <= 1


@pytest.mark.parametrize("vram, budget", [("full", None), ("low", "0.002"), ("low", None)])
def test_out_of_memory_inside_a_unet_block(tiny_checkpoint, tmp_path, monkeypatch, managers, vram, budget,
                                           decode_backends):
    """The error comes from deep inside a step (groups resident or prefetched in low mode, activations
    alive in the UNet's frames): by the time the mode steps down, the failed try's activations are freed;
    the retry gives the images of a run that never failed, and nothing is left on the device."""
    import weakref

    from ldm.memory.residency import Residency
    from ldm.models.unet import TimestepEmbedSequential

    assert optimized_txt2img.main(argv(tiny_checkpoint, tmp_path / "clean")) == 0
    real_forward, calls, alive = TimestepEmbedSequential.forward, {"n": 0}, []

    def forward(self, x, emb, context):
        calls["n"] += 1
        if calls["n"] == 9:  # mid-way through the first UNet evaluation
            alive.append(weakref.ref(x))
            raise residency_module.torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB")
        return real_forward(self, x, emb, context)

    real_step_down, freed_at_step_down = Residency.step_down, []

    def step_down(self):
        import gc

        gc.disable()  # freed by reference counting, not by a collection that happens to run
        try:
            freed_at_step_down.append(alive[-1]() is None)
        finally:
            gc.enable()
        return real_step_down(self)

    monkeypatch.setattr(TimestepEmbedSequential, "forward", forward)
    monkeypatch.setattr(Residency, "step_down", step_down)
    extra = ["--vram", vram] + (["--vram_budget", budget] if budget else [])
    assert optimized_txt2img.main(argv(tiny_checkpoint, tmp_path / "retried", *extra)) == 0
    assert freed_at_step_down == [True]
    residency = managers[-1]
    assert residency.mode == {"full": "medium", "low": "low"}[vram] and residency.budget_bytes is None
    assert residency.on_device() == [] and residency.resident_bytes == 0
    if vram == "low" and budget is None:  # nothing lower: sliced attention, equal within rounding
        assert decode_backends[-1] == "sliced"
        clean, retried = images(tmp_path / "clean"), images(tmp_path / "retried")
        assert sorted(clean) == sorted(retried)
        for name in clean:
            assert np.abs(pixels(clean[name]) - pixels(retried[name])).max() <= 1
    else:  # the 2 MiB budget kept groups resident and prefetched: dropping it is the step down
        assert images(tmp_path / "retried") == images(tmp_path / "clean")
