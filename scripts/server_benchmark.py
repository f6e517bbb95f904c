#!/usr/bin/env python3
"""What the server saves: the time to the first image of its second request (the model already loaded) next to
one run of ``optimized_txt2img.py`` with the same settings (Python start, imports, checkpoint read, models built,
then the same image).

    python scripts/server_benchmark.py                                  # SD v1 shapes (random weights), 256x256
    python scripts/server_benchmark.py --config configs/tiny-random.yaml --H 64 --W 64   # seconds, for a check

Both sides run in subprocesses on the same checkpoint (``--ckpt``; by default random weights in the real layout
of ``--config`` are written to a temporary .safetensors first), with the same device and threads. Prints one
line (``--json``: one JSON object).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ldm.config import load_model_config  # noqa: E402
from ldm.loading.random_weights import random_state_dict, save_checkpoint  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", default=None, help="checkpoint (default: random weights for --config)")
    parser.add_argument("--config", default=str(REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--H", type=int, default=256)
    parser.add_argument("--W", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    return parser.parse_args(argv)


def model_flags(args: argparse.Namespace, ckpt: Path) -> list[str]:
    return ["--ckpt", str(ckpt), "--config", args.config, "--device", args.device, "--no-watermark"]


def script_seconds(args: argparse.Namespace, ckpt: Path, outdir: Path) -> float:
    """One script run, start to exit."""
    argv = [sys.executable, str(REPO / "optimizedSD" / "optimized_txt2img.py"), *model_flags(args, ckpt),
            "--prompt", "a lighthouse", "--prompt_syntax", "webui", "--seed", "1", "--sampler", "euler",
            "--ddim_steps", str(args.steps), "--H", str(args.H), "--W", str(args.W), "--n_samples", "1",
            "--scale", "7", "--skip_grid", "--outdir", str(outdir)]
    started = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True)
    return time.perf_counter() - started


def server_seconds(args: argparse.Namespace, ckpt: Path) -> tuple[float, float, float]:
    """(start until it answers, first request, second request) of a server subprocess."""
    port = free_port()
    argv = [sys.executable, str(REPO / "optimizedSD" / "optimized_server.py"), "--port", str(port),
            *model_flags(args, ckpt)]
    url = f"http://127.0.0.1:{port}/sdapi/v1"
    body = {"prompt": "a lighthouse", "seed": 1, "sampler_name": "Euler", "steps": args.steps, "width": args.W,
            "height": args.H, "cfg_scale": 7}
    started = time.perf_counter()
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            try:
                requests.get(f"{url}/progress", timeout=5)
                break
            except requests.ConnectionError:
                if process.poll() is not None:
                    raise SystemExit("the server did not start")
                time.sleep(0.1)
        up = time.perf_counter() - started
        times = []
        for _ in range(2):
            begin = time.perf_counter()
            requests.post(f"{url}/txt2img", json=body, timeout=3600).raise_for_status()
            times.append(time.perf_counter() - begin)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)
    return up, times[0], times[1]


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="server-benchmark-") as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else save_checkpoint(
            random_state_dict(load_model_config(args.config), seed=0), Path(tmp) / "random.safetensors")
        script = script_seconds(args, ckpt, Path(tmp) / "out")
        up, first, second = server_seconds(args, ckpt)
    result = {"config": Path(args.config).name, "size": f"{args.W}x{args.H}", "steps": args.steps,
              "device": args.device, "threads": os.environ.get("OMP_NUM_THREADS", "default"),
              "script_run_s": round(script, 2), "server_start_s": round(up, 2),
              "server_first_request_s": round(first, 2), "server_second_request_s": round(second, 2)}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['config']} {result['size']} {args.steps} steps on {args.device}: second server request "
              f"{second:.1f} s to its image, script run {script:.1f} s ({script / second:.1f}x; the server saves "
              f"{script - second:.1f} s a request); server start {up:.1f} s, first request {first:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
