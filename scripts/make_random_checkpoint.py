"""Write a random-weight checkpoint in the real SD v1 key layout.

    python scripts/make_random_checkpoint.py --config configs/tiny-random.yaml --out models/tiny-random.safetensors

With the tiny config the file is a few MB and the whole pipeline runs in seconds on a CPU; with
configs/stable-diffusion/v1-inference.yaml it has every key and shape of a real sd-v1 file (4.3 GB).
Images generated from random weights are noise: this is for trying the tools and for tests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.config import ConfigError, load_model_config  # noqa: E402
from ldm.loading.random_weights import random_state_dict, save_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny-random.yaml", help="CompVis-format model yaml")
    parser.add_argument("--out", default="models/tiny-random.safetensors", help=".safetensors or .ckpt to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"error: {out} exists; not overwriting it", file=sys.stderr)
        return 2
    try:
        config = load_model_config(args.config)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    path = save_checkpoint(random_state_dict(config, seed=args.seed), out)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, random weights from {args.config})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
