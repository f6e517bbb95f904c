#!/usr/bin/env python3
"""Serve Stable Diffusion v1.x over AUTOMATIC1111's webui API, with the model kept loaded between requests.

Usage: `python optimizedSD/optimized_server.py --ckpt FILE [--ckpt_dir DIR] [--host H --port P --api-auth U:P]`
plus the scripts' model flags (`--vram`, `--device`, ...); `--help` lists them, docs/cli.md explains them.
"""

import os, sys  # noqa: E401

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a file: the repository

from optimizedSD.server.main import main  # noqa: E402

if __name__ == "__main__": sys.exit(main())  # noqa: E701
