"""CompVis' flag spellings (``scripts/txt2img.py``, ``scripts/img2img.py``) on the optimizedSD engine.

CompVis chooses the sampler with switches (``--plms``, ``--dpm_solver``; DDIM otherwise) and has its own
defaults (seed 42; 3 samples and 2 iterations for txt2img; 2 samples and guidance 5.0 for img2img). This module turns such a
command line into the engine's: the switches become ``--sampler``, CompVis' defaults go first so anything
the user gives wins (argparse keeps the last value; ``--plms`` also works for img2img here, where CompVis
raised NotImplementedError), ``--C``/``--f`` are checked against SD v1's 4 and 8
(the engine reads them from the model config), and ``--laion400m`` (the old LDM model) is refused.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from ldm.errors import UsageError
from ldm.pipeline.request import IMG2IMG, TXT2IMG
from optimizedSD.cli import EXIT_USAGE, main as engine_main

COMPVIS_DEFAULTS = {
    TXT2IMG: ["--seed", "42", "--n_samples", "3", "--n_iter", "2", "--sampler", "ddim"],
    IMG2IMG: ["--seed", "42", "--n_samples", "2", "--scale", "5.0", "--sampler", "ddim"],
}


def translate(argv: Sequence[str], mode: str) -> list[str]:
    """A CompVis-style command line -> the engine's."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--plms", action="store_true")
    parser.add_argument("--dpm_solver", action="store_true")
    parser.add_argument("--laion400m", action="store_true")
    parser.add_argument("--C", type=int, default=4)
    parser.add_argument("--f", type=int, default=8)
    known, rest = parser.parse_known_args(list(argv))
    if known.laion400m:
        raise UsageError("--laion400m (the LDM text2img-large model) is not supported; use an SD v1 checkpoint")
    if known.C != 4 or known.f != 8:
        raise UsageError(f"SD v1 has C=4 latent channels and downsampling f=8 (got --C {known.C} --f {known.f})")
    sampler: list[str] = []
    if known.dpm_solver:  # CompVis checks dpm_solver before plms
        sampler = ["--sampler", "dpm_solver"]
    elif known.plms:
        sampler = ["--sampler", "plms"]
    return [*COMPVIS_DEFAULTS[mode], *sampler, *rest]


def main(argv: Sequence[str] | None, mode: str) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        engine_argv = translate(argv, mode)
    except UsageError as error:
        print(f"{mode}.py: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    return engine_main(engine_argv, mode)


def script(mode: str) -> Callable[[Sequence[str] | None], int]:
    """The ``main(argv=None) -> exit code`` of one script (``mode``: txt2img, img2img or inpaint)."""

    def run(argv: Sequence[str] | None = None) -> int:
        return main(argv, mode)

    return run
