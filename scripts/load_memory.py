#!/usr/bin/env python3
"""Host memory of loading a checkpoint: the peak and what stays, anonymous memory apart from mapped file pages.

    python scripts/make_random_checkpoint.py --config configs/stable-diffusion/v1-inference.yaml --out /tmp/sd.safetensors
    python scripts/load_memory.py /tmp/sd.safetensors              # the loader as it is (weights copied out of the map)
    python scripts/load_memory.py /tmp/sd.safetensors --mapped     # weights left in the map (the old loader)

Prints one JSON line, MiB over the process's state before the load: ``maxrss_growth`` (``ru_maxrss``), the
highest ``RssAnon`` and ``RssFile`` seen by a 20 ms sampler, both after loading and after reading every weight
(what sampling does). docs/hostile-inputs.md has the figures for SD v1.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import ldm.loading.stable_diffusion as model_loading  # noqa: E402

FIELDS = ("VmRSS", "RssAnon", "RssFile")


def status() -> dict[str, int]:
    with open("/proc/self/status") as lines:
        return {line.split(":")[0]: int(line.split()[1]) << 10 for line in lines if line.startswith(FIELDS)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--config", default="configs/stable-diffusion/v1-inference.yaml")
    parser.add_argument("--mapped", action="store_true", help="leave the weights in the file's map (no copy)")
    args = parser.parse_args()
    if args.mapped:
        model_loading.owned_copy = lambda t, dtype, pages: t.to(dtype) if t.is_floating_point() else t
    peak, done = {"RssAnon": 0, "RssFile": 0}, threading.Event()

    def sample() -> None:
        while not done.wait(0.02):
            for name, value in status().items():
                if name in peak:
                    peak[name] = max(peak[name], value)

    threading.Thread(target=sample, daemon=True).start()
    base, started = status(), time.perf_counter()
    sd = model_loading.load_stable_diffusion(args.checkpoint, args.config, dtype=torch.float32)
    seconds, loaded = time.perf_counter() - started, status()
    with torch.no_grad():
        for module in (sd.unet, sd.vae, sd.text_encoder):
            for tensor in module.state_dict().values():
                tensor.float().sum()
    touched = status()
    done.set()

    def mib(values: dict[str, int]) -> dict[str, int]:
        return {name: round((value - base.get(name, 0)) / 2**20) for name, value in values.items()}

    growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base["VmRSS"]
    print(json.dumps({"load_s": round(seconds, 1), "maxrss_growth_MiB": round(growth / 2**20), "peak_MiB": mib(peak),
                      "after_load_MiB": mib(loaded), "after_reading_MiB": mib(touched)}))


if __name__ == "__main__":
    main()
