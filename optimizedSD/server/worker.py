"""One generation at a time, first come first served, with the model kept loaded between requests.

Every job (a generation, a checkpoint switch) runs on one worker thread, taken from a FIFO queue (a one-thread
executor), so requests wait in the order they came while ``/progress``, ``/interrupt`` and ``/skip`` answer from
the event loop. A generation is the scripts' own run (:func:`optimizedSD.generation.generate`) with
:class:`~optimizedSD.generation.RunHooks`: the model from :class:`ModelHolder` instead of a fresh load, every
sampling step reported to :class:`Progress` (where an interrupt or skip stops the batch), and each batch run
under :meth:`Worker.around_batch`, which drops an interrupted batch and keeps the finished ones, as the webui's
``state.interrupted`` / ``state.skipped`` do (the webui also decodes the half-denoised latent of the batch it
stopped; here that batch gives no image). ``current_image`` is the running latent of the batch's first image through
the webui's "Approx cheap" (:mod:`ldm.models.latent_preview`: no weights, an eighth of the image's side).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Callable, TypeVar

import torch
from PIL import Image

from ldm.models.latent_preview import cheap_approximation
from ldm.pipeline.request import GenerationRequest
from optimizedSD.generation import RunHooks, check_inputs, generate
from optimizedSD.outputs import to_uint8
from optimizedSD.run_outputs import RunSummary
from optimizedSD.server.model_holder import ModelHolder

log = logging.getLogger(__name__)
T = TypeVar("T")


class ShuttingDown(Exception):
    """A job that was still waiting when SIGTERM came (answered 503)."""


class StopBatch(Exception):
    """Raised from the step callback: the batch under way stops (interrupt or skip)."""


@dataclass(frozen=True)
class Position:
    """Where the running job is; replaced whole (one assignment), so a reader never sees half an update."""

    job: str = ""
    job_count: int = 0  # batches
    job_no: int = 0  # batches done
    sampling_step: int = 0
    sampling_steps: int = 0


@dataclass
class Progress:
    """The webui's ``shared.state`` as ``/progress`` reports it; written by the worker thread, read by any."""

    at: Position = field(default_factory=Position)
    interrupted: bool = False
    skipped: bool = False
    started: float = 0.0
    job_timestamp: str = "0"
    queued: int = 0  # jobs waiting behind the running one
    latent: torch.Tensor | None = None  # the running batch's first image, as the sampler last left it

    def begin(self, job: str, batches: int) -> None:
        self.interrupted = self.skipped = False
        self.started = time.time()
        self.job_timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
        self.at = Position(job, batches)

    def step(self, step: int, steps: int, x: torch.Tensor | None = None) -> None:
        self.at = replace(self.at, sampling_step=step, sampling_steps=steps)
        if x is not None:
            self.latent = x[:1].detach().clone()  # the sampler may reuse its tensor

    def batch_done(self) -> None:
        self.at = replace(self.at, job_no=self.at.job_no + 1, sampling_step=0)

    def end(self) -> None:
        self.at = Position()
        self.latent = None

    def current_image(self) -> str | None:
        """The running image as base64 PNG (the webui's ``current_image``), None between jobs."""
        latent = self.latent
        if latent is None:
            return None
        buffer = io.BytesIO()
        Image.fromarray(to_uint8(cheap_approximation(latent).clamp(-1, 1))[0]).save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")

    @staticmethod
    def fraction(at: Position) -> float:
        if not at.job_count:
            return 0.0
        within = at.sampling_step / at.sampling_steps if at.sampling_steps else 0.0
        return min(1.0, (at.job_no + within) / at.job_count)

    def report(self, skip_current_image: bool = False) -> dict[str, Any]:
        """``GET /sdapi/v1/progress``: progress in [0, 1], eta_relative in seconds, the state, the running image
        (unless ``skip_current_image``)."""
        at = self.at
        done = self.fraction(at)
        elapsed = time.time() - self.started if at.job else 0.0
        eta = elapsed / done - elapsed if done > 0 else 0.0
        state = {"skipped": self.skipped, "interrupted": self.interrupted, "stopping_generation": False,
                 "job": at.job, "job_count": at.job_count + self.queued, "job_timestamp": self.job_timestamp,
                 "job_no": at.job_no, "sampling_step": at.sampling_step, "sampling_steps": at.sampling_steps}
        image = None if skip_current_image else self.current_image()
        return {"progress": done, "eta_relative": eta, "state": state, "current_image": image, "textinfo": None,
                "current_task": None}


@dataclass
class Worker:
    """The queue and its one worker thread, the model holder and the progress."""

    progress: Progress = field(default_factory=Progress)
    holder: ModelHolder = field(default_factory=ModelHolder)
    closing: bool = False

    def __post_init__(self) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generation")

    async def run(self, job: Callable[..., T], *args: Any) -> T:
        """Run ``job(*args)`` on the worker thread after the jobs before it."""
        if self.closing:
            raise ShuttingDown()
        self.progress.queued += 1
        return await asyncio.get_running_loop().run_in_executor(self.executor, self._started, job, args)

    def _started(self, job: Callable[..., T], args: tuple) -> T:
        self.progress.queued -= 1  # running now, not waiting
        if self.closing:
            raise ShuttingDown()
        return job(*args)

    def generate(self, request: GenerationRequest, job: str) -> RunSummary:
        """The scripts' run of ``request`` on the kept model (on the worker thread)."""
        self.progress.begin(job, request.n_iter)
        try:
            return generate(request, RunHooks(self.holder.get, self.on_step, self.around_batch))
        finally:
            self.progress.end()

    def switch(self, request: GenerationRequest) -> None:
        """Load ``request``'s checkpoint now (``POST /options`` with ``sd_model_checkpoint``)."""
        self.progress.begin("load checkpoint", 1)
        try:
            inputs = check_inputs(request)
            self.holder.get(request, inputs)
        finally:
            self.progress.end()

    def on_step(self, step: int, total: int, x: torch.Tensor) -> None:
        self.progress.step(step + 1, total, x)
        if self.progress.interrupted or self.progress.skipped or self.closing:
            raise StopBatch()

    def around_batch(self, run: Callable[[], None]) -> None:
        """One batch; after an interrupt none; a stopped batch's images are dropped, the finished ones kept."""
        if self.progress.interrupted or self.closing:
            return
        self.progress.skipped = False
        try:
            run()
        except StopBatch:
            log.info("batch %d of %d stopped", self.progress.at.job_no + 1, self.progress.at.job_count)
        self.progress.batch_done()

    def interrupt(self) -> None:
        if self.progress.at.job:
            self.progress.interrupted = True

    def skip(self) -> None:
        if self.progress.at.job:
            self.progress.skipped = True

    def close(self) -> None:
        """SIGTERM: the running generation stops at its next step (its finished images are answered), the
        waiting ones are refused; then the model is released."""
        self.closing = True
        self.executor.shutdown(wait=True, cancel_futures=False)
        self.holder.release()
