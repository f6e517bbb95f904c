"""Entry point of both scripts: parse, generate, report; bad input is one line on stderr and exit code 2.

Errors the user can fix (a missing checkpoint, a bad flag, an unreadable image or prompts file, an
unwritable folder, a checkpoint that does not load) never show a traceback. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, Sequence

from ldm.errors import UserError
from ldm.memory.out_of_memory import is_out_of_memory
from ldm.messages import one_line
from optimizedSD.arguments import parse_args
from optimizedSD.atomic_files import sigterm_as_interrupt
from optimizedSD.distributed import RankStopped, is_main_process

EXIT_USAGE = 2
EXIT_OUT_OF_MEMORY = 1
EXIT_INTERRUPTED = 130
EXIT_RANK_STOPPED = 1
OUT_OF_MEMORY_HELP = "try a smaller --H/--W or --n_samples, or --vram low --unet_bs 1"


class _StdoutThatNeverFails:
    """``sys.stdout`` for a run: a closed pipe (``| head``, ``| true``) or a full disk drops the progress lines
    instead of failing the run; the descriptor is then pointed at /dev/null so Python's exit flush is quiet."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self._broken = False

    def write(self, text: str) -> int:
        if not self._broken:
            try:
                self._stream.write(text)
                self._stream.flush()
            except (OSError, ValueError):
                self._give_up()
        return len(text)

    def flush(self) -> None:
        self.write("")

    def _give_up(self) -> None:
        self._broken = True
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
        except (OSError, ValueError):
            pass

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def main(argv: Sequence[str] | None, mode: str) -> int:
    """Run one script (``mode`` ``"txt2img"`` or ``"img2img"``) on ``argv``; returns the exit code."""
    prog = f"optimized_{mode}.py"
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format=f"{prog}: %(message)s")
    try:
        request = parse_args(argv, mode)
        if request.plan:  # answered from the config alone: no checkpoint is read
            from optimizedSD.plan import plan_text  # start-up time: the ledger's code only for --plan

            print(plan_text(request))
            return 0
        from optimizedSD.generation import generate  # after parsing: --help and flag errors need no model code

        sys.stdout = _StdoutThatNeverFails(sys.stdout)
        with sigterm_as_interrupt():  # a scheduler's SIGTERM cleans up as Ctrl-C does: no partial image
            summary = generate(request)
    except UserError as error:
        print(f"{prog}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    except RankStopped:  # a torchrun rank that stopped early: its one error line is out already
        return EXIT_RANK_STOPPED
    except (MemoryError, RuntimeError) as error:
        if not is_out_of_memory(error):
            raise
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"{prog}: error: out of memory ({first_line}); {OUT_OF_MEMORY_HELP} "
              "(images already written are kept)", file=sys.stderr)
        return EXIT_OUT_OF_MEMORY
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (images already written are kept)", file=sys.stderr)
        return EXIT_INTERRUPTED
    if is_main_process():  # torchrun: rank 0 alone reports, for every rank
        print(summary.line())
    return 0


def script(mode: str) -> Callable[[Sequence[str] | None], int]:
    """The ``main(argv=None) -> exit code`` of one script (``mode``: txt2img, img2img or inpaint)."""

    def run(argv: Sequence[str] | None = None) -> int:
        return main(argv, mode)

    return run
