"""Entry point of both scripts: parse, generate, report; bad input is one line on stderr and exit code 2.

Errors the user can fix (a missing checkpoint, a bad flag, an unreadable image or prompts file, an
unwritable folder, a checkpoint that does not load) never show a traceback. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Sequence

from optimizedSD.arguments import UsageError, parse_args
from optimizedSD.outputs import OutputError
from optimizedSD.prompts import PromptError

EXIT_USAGE = 2
EXIT_OUT_OF_MEMORY = 1
EXIT_INTERRUPTED = 130
OUT_OF_MEMORY_HELP = "try a smaller --H/--W or --n_samples, or --vram low --unet_bs 1"


def _is_out_of_memory(error: BaseException) -> bool:
    """Out of device or host memory: CUDA's error, Python's, or the CPU allocator's RuntimeError."""
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [UsageError, PromptError, OutputError]
    try:
        from ldm.checkpoint_file import CheckpointError
        from ldm.config import ConfigError

        errors += [CheckpointError, ConfigError]
    except ImportError:  # the library is broken: let the real error surface below
        pass
    return tuple(errors)


def main(argv: Sequence[str] | None, mode: str) -> int:
    """Run one script (``mode`` ``"txt2img"`` or ``"img2img"``) on ``argv``; returns the exit code."""
    prog = f"optimized_{mode}.py"
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format=f"{prog}: %(message)s")
    try:
        opt = parse_args(argv, mode)
        from optimizedSD.generation import generate

        summary = generate(opt)
    except _user_errors() as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (MemoryError, RuntimeError) as error:
        if not _is_out_of_memory(error):
            raise
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"{prog}: error: out of memory ({first_line}); {OUT_OF_MEMORY_HELP} "
              "(images already written are kept)", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (images already written are kept)", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(summary.line())
    return 0
