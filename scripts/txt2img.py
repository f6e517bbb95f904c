#!/usr/bin/env python3
"""CompVis' `scripts/txt2img.py` command line (`--plms`, `--dpm_solver`, CompVis' defaults) on the
optimizedSD engine; see optimizedSD/flags/compvis.py for the translation and docs/cli.md for the flags."""

import os, sys  # noqa: E401

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a file: the repository

from optimizedSD.flags.compvis import script  # noqa: E402

main = script("txt2img")  # main(argv=None) -> exit code
if __name__ == "__main__": sys.exit(main())  # noqa: E701
