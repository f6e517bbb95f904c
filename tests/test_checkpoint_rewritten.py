"""A checkpoint truncated or rewritten in place after loading does not crash the run.

The reader maps the file; had the weights stayed in that map, the first read after the truncation would kill
the process with SIGBUS (which Python cannot catch: hence a child process). The loader copies them out
(``ldm.loading.stable_diffusion.owned_copy``), so the run finishes with the weights it loaded. With ``--quantize`` the
UNet is read from the map into int8 first and what is left is copied after (``own_weights``): the same.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

CHILD = textwrap.dedent("""
    import os, sys, torch
    from ldm.loading.stable_diffusion import load_stable_diffusion, own_weights
    from ldm.models.quantize import quantize_unet
    path, config, kind = sys.argv[1:4]
    int8 = kind.endswith("int8")
    sd = load_stable_diffusion(path, config, copy_weights=not int8)
    if int8:  # as ldm.pipeline.model.load_model does it
        quantize_unet(sd.unet)
        own_weights(sd.unet, sd.vae, sd.text_encoder)
    before = {name: t.clone() for name, t in sd.unet.state_dict().items()}
    size = os.path.getsize(path)
    with open(path, "r+b") as file:  # in place, as `cp new.ckpt old.ckpt` or a resumed download does
        file.truncate(0)
        file.write(os.urandom(size // 3))
    with torch.no_grad():  # every weight read again, then one step's UNet call and a decode
        assert all(torch.equal(t, before[name]) for name, t in sd.unet.state_dict().items())
        total = sum(float(t.float().sum()) for m in (sd.vae, sd.text_encoder.transformer) for t in m.state_dict().values())
        x = torch.randn(1, 4, 8, 8)
        eps = sd.unet(x, torch.tensor([500.0]), torch.randn(1, 77, sd.config.unet.context_dim))
        image = sd.vae.decode(x)
    print("finished", bool(torch.isfinite(eps).all() and torch.isfinite(image).all()), total == total)
""")


@pytest.mark.parametrize("kind", ["safetensors", "ckpt", "safetensors int8"])
def test_a_checkpoint_rewritten_after_loading_does_not_crash_the_run(tiny_checkpoint, tiny_checkpoint_ckpt,
                                                                     tiny_config_path, tmp_path, kind):
    source = tiny_checkpoint_ckpt if kind == "ckpt" else tiny_checkpoint
    path = shutil.copy(source, tmp_path / source.name)  # the session's fixture stays whole
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), str(tiny_config_path), kind], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])  # -7: SIGBUS
    assert done.stdout.strip().splitlines()[-1] == "finished True True"
