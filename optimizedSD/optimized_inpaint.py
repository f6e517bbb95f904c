#!/usr/bin/env python3
"""Stable Diffusion v1.x inpainting in little GPU memory: repaint the white part of --mask in --init-img.

Usage: `python optimizedSD/optimized_inpaint.py --init-img IMG --mask MASK --prompt "..." [flags]`; `--help` lists the flags,
docs/cli.md explains them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file: make the repository importable (as the fork's scripts assume)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from optimizedSD.cli import main as _main


def main(argv: Sequence[str] | None = None) -> int:
    """Run with `argv` (default: the command line); returns the exit code."""
    return _main(argv, "inpaint")


if __name__ == "__main__":
    sys.exit(main())
