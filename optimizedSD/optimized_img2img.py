#!/usr/bin/env python3
"""Stable Diffusion v1.x img2img in little GPU memory (the optimizedSD fork's `optimized_img2img.py`).

Usage: `python optimizedSD/optimized_img2img.py --prompt "..." [flags]`; `--help` lists the flags,
docs/cli.md explains them.
"""

import os, sys  # noqa: E401

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a file: the repository

from optimizedSD.cli import script  # noqa: E402

main = script("img2img")  # main(argv=None) -> exit code
if __name__ == "__main__": sys.exit(main())  # noqa: E701
