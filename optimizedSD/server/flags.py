"""The server's command line: its own flags (``--host``, ``--port``, ``--api-auth``, ``--ckpt_dir``, ...) and the
scripts' model flags (``--ckpt``, ``--vram``, ``--device``, ...), checked by the scripts' own parser and then
given to every request's run.

Listening beyond this machine without ``--api-auth`` is refused unless ``--insecure`` says so: the API runs
whatever prompt it is sent on this machine's GPU and writes files with ``save_images``.
"""

from __future__ import annotations

import argparse
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ldm.errors import UsageError
from ldm.pipeline.model import WEIGHTS_HELP
from ldm.pipeline.request import GenerationRequest
from optimizedSD.arguments import given_flags, parse_args

DEFAULT_PORT = 7861  # the webui's API-only port (--nowebui)
# The scripts' flags that set up the model and the machine (the rest belong to each request)
MODEL_FLAGS = ("ckpt", "config", "vae", "use_ema", "vram", "vram_budget", "turbo", "device", "precision", "lora",
               "lora_dir", "embeddings_dir", "no_watermark", "attention", "unet_bs", "tome", "quantize",
               "embedding_cache", "safety_checker", "safety_checker_mode", "vae_tiling")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(message)


@dataclass(frozen=True)
class ServerConfig:
    """The checked command line."""

    host: str
    port: int
    users: tuple[tuple[str, str], ...]  # --api-auth; empty: no authentication
    ckpt: Path | None
    ckpt_dir: Path | None
    outdir: Path
    save_images: bool
    model_argv: tuple[str, ...]  # the scripts' model flags, without --ckpt
    base: GenerationRequest  # those flags parsed (device, memory mode, ...)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="optimized_server.py", allow_abbrev=False,
        description="Serve AUTOMATIC1111's webui API (/sdapi/v1/txt2img, img2img, ...) and a page at /, with the "
                    "model kept loaded. Besides these, the scripts' model flags: " + ", ".join(
                        "--" + name.replace("no_watermark", "no-watermark") for name in MODEL_FLAGS) + " (docs/cli.md).")
    add = parser.add_argument
    add("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    add("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}, the webui's API port)")
    add("--api-auth", dest="api_auth", default=None, metavar="USER:PASS[,USER:PASS]",
        help="HTTP Basic credentials every request must carry")
    add("--insecure", action="store_true", help="allow a --host beyond this machine without --api-auth")
    add("--ckpt_dir", default=None, metavar="DIR", help="checkpoints the server offers (sd-models, sd_model_checkpoint)")
    add("--outdir", default="outputs/server-samples", help="where images go with --save_images or save_images: true")
    add("--save_images", action="store_true", help="write every image to --outdir, as the scripts do")
    return parser


def parse_users(text: str | None) -> tuple[tuple[str, str], ...]:
    if text is None:
        return ()
    users = []
    for item in text.split(","):
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise UsageError("--api-auth must be USER:PASS[,USER:PASS], each with a user and a password")
        users.append((user, password))
    return tuple(users)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_server_args(argv: Sequence[str] | None) -> ServerConfig:
    """The server's flags and the scripts' model flags, each checked; a per-request flag is refused."""
    opt, rest = build_parser().parse_known_args(argv)
    given = given_flags("txt2img", rest)  # the scripts' parser: an unknown flag is a UsageError
    if {"backend", "backend_cache"} & given:  # prompt LoRAs merge into the PyTorch UNet, which openvino empties
        raise UsageError("--backend is not served: the server runs the PyTorch UNet (prompt LoRAs merge into it)")
    per_request = sorted(given - set(MODEL_FLAGS))
    if per_request:
        raise UsageError(f"--{per_request[0]} belongs to each request (send it in the JSON body), not to the server")
    users = parse_users(opt.api_auth)
    if not is_loopback(opt.host) and not users and not opt.insecure:
        raise UsageError(f"--host {opt.host} listens beyond this machine: give --api-auth USER:PASS "
                         "(or --insecure to let anyone who reaches the port use it)")
    if not 0 < opt.port < 65536:
        raise UsageError(f"--port must be 1 to 65535, got {opt.port}")
    ckpt_dir = Path(opt.ckpt_dir) if opt.ckpt_dir else None
    if ckpt_dir is not None and not ckpt_dir.is_dir():
        raise UsageError(f"--ckpt_dir {ckpt_dir}: no such folder")
    base = parse_args([*rest, "--prompt", "x"], "txt2img")
    ckpt = base.ckpt if "ckpt" in given or ckpt_dir is None else None
    if ckpt is not None and not ckpt.exists():
        raise UsageError(f"checkpoint not found: {ckpt}; {WEIGHTS_HELP}")
    model_argv = strip_ckpt(rest)
    return ServerConfig(opt.host, opt.port, users, ckpt, ckpt_dir, Path(opt.outdir), opt.save_images,
                        tuple(model_argv), base)


def strip_ckpt(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--ckpt FILE`` / ``--ckpt=FILE`` (each request names its checkpoint)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt":
            skip = True
        elif not arg.startswith("--ckpt="):
            out.append(arg)
    return out
