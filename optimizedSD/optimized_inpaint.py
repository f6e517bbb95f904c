#!/usr/bin/env python3
"""Stable Diffusion v1.x inpainting in little GPU memory: repaint the white part of --mask in --init-img.

Usage: `python optimizedSD/optimized_inpaint.py --init-img IMG --mask MASK --prompt "..." [flags]`; `--help` lists the flags,
docs/cli.md explains them.
"""

import os, sys  # noqa: E401

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a file: the repository

from optimizedSD.cli import script  # noqa: E402

main = script("inpaint")  # main(argv=None) -> exit code
if __name__ == "__main__": sys.exit(main())  # noqa: E701
