#!/usr/bin/env python3
"""CompVis' `scripts/txt2img.py` command line (`--plms`, `--dpm_solver`, CompVis' defaults) on the
optimizedSD engine; see optimizedSD/compvis_flags.py for the translation and docs/cli.md for the flags."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from optimizedSD.compvis_flags import main as _main


def main(argv: Sequence[str] | None = None) -> int:
    return _main(argv, "txt2img")


if __name__ == "__main__":
    sys.exit(main())
