"""Loading copies the weights out of the file's memory map (a file rewritten during the run cannot crash it)
without holding the file twice: the host's peak RSS grows by the weights, not by the weights and the file.

Each load runs in a fresh process (``ru_maxrss`` is a per-process high-water mark) on a mid-size model
(~120 M parameters) in the SD v1 layout.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

CONFIG = """
import dataclasses
from ldm.config import load_model_config
cfg = load_model_config("configs/stable-diffusion/v1-inference.yaml")
cfg = dataclasses.replace(cfg, unet=dataclasses.replace(cfg.unet, model_channels=96, context_dim=384),
                          vae=dataclasses.replace(cfg.vae, ch=64),
                          text=dataclasses.replace(cfg.text, hidden_size=384, intermediate_size=1536,
                                                   num_attention_heads=6, projection_dim=384))
"""

MEASURE = CONFIG + """
import json, resource, sys, torch
from ldm.loading.stable_diffusion import load_stable_diffusion
def rss_kb(field="VmRSS"):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(field))
path, dtype = sys.argv[1], getattr(torch, sys.argv[2])
base, base_file = rss_kb(), rss_kb("RssFile")
sd = load_stable_diffusion(path, cfg, dtype=dtype)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
weights = sum(t.numel() * t.element_size() for m in (sd.unet, sd.vae, sd.text_encoder) for t in m.state_dict().values())
mapped = (rss_kb("RssFile") - base_file) * 1024  # file pages mapped by the load (torch's libraries were before)
print(json.dumps({"growth": (peak - base) * 1024, "weights": weights, "rss_file": mapped}))
"""


def _run(code: str, *args: str) -> str:
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("medium")
    _run(CONFIG + """
import sys, torch
from ldm.loading.random_weights import random_state_dict, save_checkpoint
state = random_state_dict(cfg, seed=0)
save_checkpoint(state, sys.argv[1] + "/m32.safetensors")
save_checkpoint(state, sys.argv[1] + "/m32.ckpt")
save_checkpoint({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, sys.argv[1] + "/m16.safetensors")
print("ok")
""", str(folder))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("name", ["m32.safetensors", "m32.ckpt"])
def test_same_dtype_load_copies_the_weights_once(files, name):
    """A file already in the run's dtype: the weights are copied out of the map as its pages are given back,
    so the peak is one copy (not the copy and the file), and nothing of the file stays mapped."""
    measured = json.loads(_run(MEASURE, str(files / name), "float32"))
    overhead = 160 * 2**20  # tokenizer, meta-device models, allocator slack: ~120 MB measured
    assert measured["growth"] < measured["weights"] + overhead, measured
    assert measured["rss_file"] < 32 * 2**20, measured


@pytest.mark.slow
@pytest.mark.parametrize("name, dtype", [("m16.safetensors", "float32"), ("m32.safetensors", "float16")])
def test_cast_load_holds_one_converted_copy(files, name, dtype):
    """A cast: the converted weights plus, at most, the file's pages (clean, file-backed), never a second copy."""
    measured = json.loads(_run(MEASURE, str(files / name), dtype))
    file_bytes = (files / name).stat().st_size
    overhead = 128 * 2**20  # tokenizer, meta-device models, allocator slack: ~90 MB in the mapped case
    assert measured["growth"] < measured["weights"] + file_bytes + overhead, measured
