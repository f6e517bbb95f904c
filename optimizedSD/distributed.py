"""One run spread over the processes ``torchrun`` starts (one per GPU, on one machine or many).

Without torchrun's environment variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) :func:`from_environment` returns None and nothing here runs: a plain run is unchanged.

Work units: a single process walks ``for iteration in range(n_iter): for prompt in prompts:`` and samples one
batch of ``n_samples`` images per step. Each such (iteration, prompt) step is a :class:`WorkUnit`, numbered in
that order; unit ``u`` holds images ``u * n_samples ... u * n_samples + n_samples - 1`` of the run, so its
seeds (``seed + image index``; with ``--fixed_code`` ``seed + k``) are the single process's. Ranks take the
units round-robin (``units[rank::world_size]``), so 1 prompt x ``--n_iter 8`` spreads as well as 8 prompts.

File names: the writer numbers a folder's files from one past the highest number already there
(``seed_<seed>_<NNNNN>.png``). Rank 0 reads those starting numbers once, before anyone writes, and every rank
gets them (:meth:`Distributed.broadcast`); :func:`planned_file_numbers` then gives each image the number a
single process would give it, so the union of the ranks' files equals a one-process run's, name for name.
The output folder must be shared by the ranks (one machine, or a shared file system across machines).

Communication: the default process group is NCCL on CUDA (each rank on ``cuda:LOCAL_RANK``) and gloo on the
CPU, initialised from torchrun's variables. What the ranks exchange (the seed, the starting numbers, each
rank's results for the grid and the summary) are small CPU objects; they go over a gloo group, which notices
a dead peer at once where NCCL would wait for its timeout. The only collectives are at the start and the
end, so a rank that fails (an exception, or SIGTERM) stops its work, names its unfinished units in one line,
and still joins the final gather: the others finish their share and rank 0 writes the grid from every
image that was made. A rank killed outright (SIGKILL) cannot report; torchrun then stops the others.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from ldm.errors import UserError
from ldm.memory.out_of_memory import is_out_of_memory

log = logging.getLogger(__name__)

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# The ranks meet only at the start and the end; the fastest rank may wait at the end for the slowest one's whole
# share (all of it when it failed early), so the collectives get a timeout longer than any run.
COLLECTIVE_TIMEOUT = timedelta(days=7)


class DistributedError(UserError):
    """torchrun's environment is inconsistent or the process group cannot start (one line)."""


class RankStopped(Exception):
    """This rank stopped early; its one error line (``line``) is printed already. The scripts exit with 1."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line


class Terminated(BaseException):
    """SIGTERM (torchrun stopping the job, or a user's ``kill``) raised as an exception, so that the rank
    reports its unfinished units and joins the final gather instead of vanishing."""


@dataclass(frozen=True)
class WorkUnit:
    """One (iteration, prompt) batch of a run, numbered in a single process's order."""

    index: int
    iteration: int
    prompt_index: int
    n_samples: int

    @property
    def first_image(self) -> int:
        """The run-wide index of the unit's first image (images are counted in the order they are written)."""
        return self.index * self.n_samples

    def seeds(self, seed: int) -> list[int]:
        """The seeds a single process gives this unit's images (also the ``Seed:`` of their metadata)."""
        return [seed + self.first_image + k for k in range(self.n_samples)]

    def noise_seeds(self, seed: int, fixed_code: bool) -> list[int]:
        """``--fixed_code``: every batch starts from the first batch's noise (and carries its seeds)."""
        return [seed + k for k in range(self.n_samples)] if fixed_code else self.seeds(seed)

    def describe(self, seed: int, fixed_code: bool = False) -> str:
        seeds = self.noise_seeds(seed, fixed_code)
        span = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}-{seeds[-1]}"
        return f"#{self.index} (prompt {self.prompt_index + 1}, iteration {self.iteration + 1}, seeds {span})"


def work_units(n_prompts: int, n_iter: int, n_samples: int) -> list[WorkUnit]:
    """Every unit of a run, in the order a single process runs them (iteration-major, then prompt)."""
    return [
        WorkUnit(iteration * n_prompts + prompt, iteration, prompt, n_samples)
        for iteration in range(n_iter)
        for prompt in range(n_prompts)
    ]


def units_for_rank(units: Sequence[WorkUnit], rank: int, world_size: int) -> list[WorkUnit]:
    """Rank ``rank``'s share: round-robin, so every rank gets within one unit of the same number."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of {world_size}")
    return list(units[rank::world_size])


def planned_file_numbers(folders: Sequence[str], n_iter: int, n_samples: int, starts: Mapping[str, int]) -> list[int]:
    """The file number (``NNNNN`` of ``seed_<seed>_<NNNNN>``) of every image of the run, by image index.

    ``folders[p]`` is prompt ``p``'s folder name (two prompts can share one); ``starts[folder]`` is one past
    the highest number in that folder when the run began. A single process numbers each folder's images in the
    order it writes them, which is the order of the image indices.
    """
    written = {folder: 0 for folder in set(folders)}
    numbers = []
    for _ in range(n_iter):
        for folder in folders:
            numbers.extend(starts[folder] + written[folder] + k for k in range(n_samples))
            written[folder] += n_samples
    return numbers


def unfinished_line(prog: str, rank: int, world_size: int, reason: str, units: Sequence[WorkUnit], seed: int,
                    fixed_code: bool = False) -> str:
    """The one error line of a rank that stops early: what stopped it and which units it did not finish."""
    listed = ", ".join(unit.describe(seed, fixed_code) for unit in units) or "none"
    return f"{prog}: error: rank {rank} of {world_size} stopped ({reason}); unfinished units: {listed}"


@dataclass
class RankResult:
    """What one rank made, sent to rank 0 at the end (pixels only when rank 0 makes a grid)."""

    rank: int
    images: int = 0
    flagged: int = 0
    written: list[str] = field(default_factory=list)
    grid_images: list[tuple[int, Any]] = field(default_factory=list)  # (image index, [H, W, 3] uint8)
    unfinished: list[int] = field(default_factory=list)  # unit indices
    error: str | None = None


@dataclass
class MergedResults:
    """All ranks' results together, in a single process's order."""

    images: int
    flagged: int
    written: list[str]
    grid_images: list[Any]
    unfinished: dict[int, list[int]]  # rank -> unit indices it did not finish

    @property
    def failed(self) -> bool:
        return any(self.unfinished.values())


def merge_results(results: Sequence[RankResult]) -> MergedResults:
    grid = sorted((pair for result in results for pair in result.grid_images), key=lambda pair: pair[0])
    return MergedResults(
        images=sum(result.images for result in results),
        flagged=sum(result.flagged for result in results),
        written=[path for result in sorted(results, key=lambda r: r.rank) for path in result.written],
        grid_images=[image for _, image in grid],
        unfinished={result.rank: list(result.unfinished) for result in results if result.unfinished},
    )


@dataclass
class Distributed:
    """This process's place in a torchrun job."""

    rank: int
    world_size: int
    local_rank: int
    _results_group: Any = field(default=None, repr=False, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """``cuda`` (any index) becomes ``cuda:LOCAL_RANK``: one GPU per process; other devices stay."""
        if requested.type != "cuda":
            return requested
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise DistributedError(f"rank {self.rank}: LOCAL_RANK {self.local_rank} but this machine has {count} "
                                   "CUDA device(s); start at most that many processes per node (--nproc_per_node)")
        return torch.device("cuda", self.local_rank)

    def start(self, device: torch.device) -> None:
        """Join the job: NCCL on CUDA, gloo on the CPU, from torchrun's variables; plus the gloo group the
        results travel on."""
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
            self._objects_group()
        except (RuntimeError, ValueError) as error:
            raise DistributedError(f"rank {self.rank}: cannot join the torchrun job ({_first_line(error)})") from None
        log.info("rank %d of %d on %s (%s)", self.rank, self.world_size, device, backend)

    def _objects_group(self):
        if self._results_group is None:
            gloo = dist.get_backend() == "gloo"
            self._results_group = dist.group.WORLD if gloo else dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT)
        return self._results_group

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (e.g. the seed when none was given: each rank drew its own)."""
        box = [value if self.is_main else None]
        dist.broadcast_object_list(box, src=0, group=self._objects_group())
        return box[0]

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value``, in rank order, on rank 0 (None on the others)."""
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, out, dst=0, group=self._objects_group())
        return out

    def stop(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def is_main_process(environ: Mapping[str, str] | None = None) -> bool:
    """False on every torchrun rank but 0 (only rank 0 prints progress and the summary); True without torchrun."""
    environ = os.environ if environ is None else environ
    return environ.get("RANK", "0").strip() in ("0", "")


def join(request):
    """``(Distributed, request)`` for a torchrun rank, ``(None, request)`` otherwise.

    The rank's request runs on ``cuda:LOCAL_RANK`` (CUDA) and with rank 0's seed: each rank drew its own
    random seed when ``--seed`` was not given (and its own variation seed when ``--subseed`` was not).
    """
    import dataclasses

    job = from_environment()
    if job is None:
        return None, request
    device = job.device(request.device)
    job.start(device)
    return job, dataclasses.replace(request, device=device, seed=job.broadcast(request.seed),
                                    subseed=job.broadcast(request.subseed))


def from_environment(environ: Mapping[str, str] | None = None) -> Distributed | None:
    """This process's :class:`Distributed` when torchrun started it with more than one process, else None."""
    environ = os.environ if environ is None else environ
    present = [name for name in TORCHRUN_VARIABLES if name in environ]
    if not present:
        return None
    if len(present) != len(TORCHRUN_VARIABLES):
        missing = [name for name in TORCHRUN_VARIABLES if name not in environ]
        raise DistributedError(f"torchrun's environment is incomplete: {', '.join(present)} set but not "
                               f"{', '.join(missing)}; start the script with torchrun or unset them")
    try:
        rank, world_size, local_rank = (int(environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise DistributedError("RANK, WORLD_SIZE and LOCAL_RANK must be whole numbers") from None
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise DistributedError(f"inconsistent torchrun environment: RANK {rank}, WORLD_SIZE {world_size}, "
                               f"LOCAL_RANK {local_rank}")
    if world_size == 1:
        return None  # one process: the plain run
    return Distributed(rank, world_size, local_rank)


def run_share(units: Sequence[WorkUnit], run_unit: Callable[[WorkUnit], None]) -> tuple[list[WorkUnit], BaseException | None]:
    """Run this rank's units in order; on a failure or SIGTERM stop and return (unfinished units, the error).

    The error is returned, not raised, so that the rank still joins the final gather (see the module
    docstring); a unit that stopped halfway counts as unfinished (its written images stay).
    """
    undo = raise_on_sigterm()
    done = 0
    try:
        for unit in units:
            run_unit(unit)
            done += 1
    except (Exception, Terminated, KeyboardInterrupt) as error:
        return list(units[done:]), error
    finally:
        undo()
    return [], None


def report_stop(prog: str, job: Distributed, error: BaseException, unfinished: Sequence[WorkUnit], seed: int,
                fixed_code: bool) -> str:
    """Print this rank's one error line (after the traceback when the error is a bug) and return it."""
    expected = isinstance(error, (UserError, Terminated, KeyboardInterrupt)) or is_out_of_memory(error)
    if not expected:
        traceback.print_exception(error)
    line = unfinished_line(prog, job.rank, job.world_size, describe_error(error), unfinished, seed, fixed_code)
    print(line, file=sys.stderr, flush=True)
    return line


def describe_error(error: BaseException) -> str:
    """The reason part of a rank's error line."""
    if isinstance(error, Terminated):
        return "SIGTERM"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return f"{type(error).__name__}: {_first_line(error)}"


def raise_on_sigterm() -> Callable[[], None]:
    """Turn the first SIGTERM into :class:`Terminated` (a second one kills as usual); returns the undo."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # signal handlers can only be set from the main thread
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated("SIGTERM")

    signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
