"""``--backend`` and ``--backend_cache``: which engine runs the UNet (what they do: :mod:`ldm.backends`;
docs/cli.md)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from ldm.backends import BACKENDS
from ldm.backends.openvino_runtime import import_openvino
from ldm.errors import UsageError, UserError

# Flags that change the UNet's forward in ways the converted model does not carry: (destination, flag).
# ControlNet (issue 25) and DeepCache (issue 26) are read with getattr, so this check holds before and after
# their flags exist.
NOT_CONVERTED = (("tome", "--tome"), ("control_model", "--control_model"), ("deepcache", "--deepcache"))


def default_cache_dir() -> Path:
    """The user's cache directory (``$XDG_CACHE_HOME``, else ``~/.cache``), ``optimizedSD/openvino`` in it."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "optimizedSD" / "openvino"


def add_backend_flags(add: Callable[..., object]) -> None:
    """The flags, added with the parser's ``add_argument``."""
    add("--backend", choices=(*BACKENDS, "auto"), default="torch",
        help="the engine of the UNet: torch (PyTorch, any device) or openvino (CPU only: the UNet converted "
             "once to OpenVINO and compiled in fp32; same images, faster on x86 CPUs; pip install -e \".[openvino]\"); "
             "auto: openvino on the CPU when it is installed and the run has no flag it cannot run, else torch")
    add("--backend_cache", type=str, default=None, metavar="DIR",
        help="with --backend openvino: where converted models are kept between runs (default: "
             "~/.cache/optimizedSD/openvino, or $XDG_CACHE_HOME/optimizedSD/openvino); 'none' keeps nothing")


def check_backend_args(opt: argparse.Namespace, default_device: str = "cpu") -> None:
    """openvino: installed, on the CPU (the default device with it), and no flag whose UNet it cannot run; auto
    becomes one of the two (:func:`auto_backend`), ``default_device`` being the device without ``--device``."""
    if opt.backend == "auto":
        opt.backend = auto_backend(opt, opt.device or default_device)
    if opt.backend == "torch":
        if opt.backend_cache is not None:
            raise UsageError("--backend_cache goes with --backend openvino")
        return
    if opt.device is None:
        opt.device = "cpu"
    elif opt.device != "cpu":
        raise UsageError(f"--backend openvino runs on the CPU; drop --device {opt.device} or use --backend torch")
    for dest, flag in NOT_CONVERTED:
        if getattr(opt, dest, None):
            raise UsageError(f"{flag} does not work with --backend openvino yet; use --backend torch for it")
    import_openvino()  # a missing package is one line naming the install command, before any model loads


def auto_backend(opt: argparse.Namespace, device: str) -> str:
    """openvino where it runs this run: on the CPU, installed, and no flag of :data:`NOT_CONVERTED` given. There it
    was measured faster per step (docs/benchmarks.md: 0.59-0.65x of PyTorch's at 256x256, 0.90x at 512x512 on an
    AVX-512 CPU) and gives the same images; the first run with a checkpoint converts it (about a minute, 3.4 GB
    of disk for SD v1). torch elsewhere, and then ``--backend_cache`` is dropped. One line says which and why."""
    blocked = [flag for dest, flag in NOT_CONVERTED if getattr(opt, dest, None)]
    reason = None
    if device != "cpu":
        reason = f"the device is {device}"
    elif blocked:
        reason = f"{blocked[0]} is given"
    else:
        try:
            import_openvino()
        except UserError:
            reason = "the openvino package is not installed or does not import"
    print(f"--backend auto: {f'torch ({reason})' if reason else 'openvino (the CPU)'}", file=sys.stderr)  # not stdout: --plan --json
    if reason:
        opt.backend_cache = None
    return "torch" if reason else "openvino"


def backend_settings(opt: argparse.Namespace) -> dict[str, object]:
    """The :class:`ldm.pipeline.request.GenerationRequest` fields of these flags."""
    cache = None
    if opt.backend == "openvino" and (opt.backend_cache or "").lower() != "none":
        cache = Path(opt.backend_cache) if opt.backend_cache else default_cache_dir()
    return {"backend": opt.backend, "backend_cache": cache}
