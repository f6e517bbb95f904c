"""``--plan``: every memory mode's simulated peak for a run, before any weight is read.

:func:`memory_plan` runs the ledger (:func:`ldm.ledger.simulation.simulate`) once per mode on the config's
models built on ``meta``, and says which mode ``--vram auto`` picks on a card with a given amount of
free memory. :func:`low_mode_tiles` is the rule low mode decodes by: in tiles exactly when a whole-image
decode would set the run's peak above the UNet's.

Steps: the memory of a sampling step repeats from one step to the next (the same UNet call on the same
shapes); what grows is the sampler's history, a few latent-sized tensors (64 KiB each for a 512 px
image). The plan simulates :func:`plan_steps` steps, enough for the sampler's history to be in use
(``tests/test_vram_ledger.py`` checks the peak does not move with more steps).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, replace

import torch

from ldm.ledger.shapes import Calls, RunShape
from ldm.ledger.simulation import LedgerRun, meta_stable_diffusion, simulate
from ldm.samplers import find_sampler

# Steps after which a sampler's memory repeats: PLMS keeps 3 earlier eps, LMS 3 earlier derivatives besides
# the current one, DPM-Solver++(2M) and the 2M SDE ones earlier output (used from their second step, and the
# last step is first order), 3M SDE two, UniPC its last 3 x0 predictions (all 3 from its third step); the
# others keep nothing between steps.
_HISTORY_STEPS = {"plms": 5, "lms": 5, "dpmpp_2m": 3, "dpmpp_2m_sde": 3, "dpmpp_2m_sde_heun": 3, "dpmpp_3m_sde": 4,
                  "unipc": 4}
DEFAULT_HISTORY_STEPS = 2


def plan_steps(sampler: str, steps: int) -> int:
    """How many of ``steps`` the plan simulates: as many as the sampler needs to reach its steady state."""
    found = find_sampler(sampler)
    name = found[0].name if found is not None else sampler
    return min(steps, _HISTORY_STEPS.get(name, DEFAULT_HISTORY_STEPS))
# Device memory max_memory_allocated does not see but a card must have free besides the peak: cuBLAS and
# cuDNN workspaces and the caching allocator's fragmentation. A first guess; scripts/gpu_check.sh measures it.
HEADROOM_BYTES = 384 << 20
MODE_ORDER = ("full", "medium", "low")


@functools.lru_cache(maxsize=4)
def _meta_models(config: str, dtype: torch.dtype, quantize: str | None = None, tome: float | None = None,
                 taesd: bool = False):
    return meta_stable_diffusion(config, dtype, quantize, tome, taesd)


def low_mode_tiles(config: str, shape: RunShape, dtype: torch.dtype = torch.float16, quantize: str | None = None,
                   tome: float | None = None, taesd: bool = False) -> bool:
    """Whether low mode decodes ``shape`` in tiles: when the ledger's whole-image decode (or img2img's encode, which
    then tiles too: :mod:`ldm.memory.vae_encoding`) would peak above the UNet's sampling. One step of DDIM stands for the sampling: its UNet call is every sampler's.
    ``quantize`` and ``tome`` as the run's UNet, ``taesd`` for TAESD as the VAE
    (:func:`~ldm.ledger.simulation.meta_stable_diffusion`)."""
    if shape.tiled:
        return True
    run = simulate(_meta_models(str(config), dtype, quantize, tome, taesd), "low", replace(shape, sampler="ddim", steps=1))
    return run.phase_peaks["vae"].total > run.phase_peaks["unet"].total


@dataclass(frozen=True)
class MemoryPlan:
    """The ledger's answer for one run shape: each mode's :class:`LedgerRun`, and ``auto``'s choice."""

    shape: RunShape
    modes: dict[str, LedgerRun]
    auto: str | None
    low_tiled: bool

    def as_json(self) -> dict:
        return {
            "height": self.shape.height, "width": self.shape.width, "batch": self.shape.batch,
            "modes": {name: run.as_json() for name, run in self.modes.items()},
            "auto": self.auto,
        }


def pick_mode(modes: dict[str, LedgerRun], gpu_bytes: int | None) -> str | None:
    """The fastest mode whose peak plus :data:`HEADROOM_BYTES` fits ``gpu_bytes``; "low" when none does
    (it is the last resort, not a promise); None without a figure for the card."""
    if gpu_bytes is None:
        return None
    for name in MODE_ORDER:
        if name in modes and modes[name].peak_bytes + HEADROOM_BYTES <= gpu_bytes:
            return name
    return "low"


def memory_plan(
    config, shape: RunShape, dtype: torch.dtype = torch.float16, *, budget_bytes: int | None = None,
    gpu_bytes: int | None = None, calls: Calls | None = None, quantize: str | None = None, tome: float | None = None,
    taesd: bool = False,
) -> MemoryPlan:
    """Simulate ``shape`` in full, medium and low mode (and low with ``budget_bytes`` when given, as
    "low_budget"), low decoding in tiles where :func:`low_mode_tiles` says so; ``calls`` as
    :func:`~ldm.ledger.simulation.simulate`'s; ``quantize`` and ``tome`` change the UNet as the run does, ``taesd``
    puts the tiny autoencoder in the VAE's place (``--vae`` with a TAESD)."""
    sd = _meta_models(str(config), dtype, quantize, tome, taesd)
    shape = replace(shape, steps=plan_steps(shape.sampler, shape.steps))
    modes = {name: simulate(sd, name, shape, calls=calls) for name in ("full", "medium")}
    low = simulate(sd, "low", shape, calls=calls)
    tiled = shape.tiled or low.phase_peaks["vae"].total > low.phase_peaks["unet"].total
    if tiled and not shape.tiled:
        low = simulate(sd, "low", replace(shape, tiled=True), calls=calls)
    modes["low"] = low
    if budget_bytes is not None:
        modes["low_budget"] = simulate(sd, "low", replace(shape, tiled=tiled), budget_bytes, calls=calls)
    return MemoryPlan(shape, modes, pick_mode(modes, gpu_bytes), tiled)


def format_plan(plan: MemoryPlan, gpu_bytes: int | None = None) -> str:
    """The plan as a small table for people (``--plan`` without ``--json``)."""
    gib = 2**30
    shape = plan.shape
    lines = [f"{shape.width}x{shape.height}, batch {shape.batch}, {shape.sampler}, attention {shape.attention}: "
             "simulated peak device memory (max_memory_allocated)"]
    lines.append(f"{'mode':<11}{'peak GiB':>9}{'weights':>9}{'text enc':>10}{'UNet':>8}{'VAE':>8}")
    for name, run in plan.modes.items():
        phases = run.phase_peaks
        lines.append(
            f"{name:<11}{run.peak_bytes / gib:>9.3f}{run.peak.weights / gib:>9.3f}"
            + "".join(f"{phases[p].total / gib:>{w}.3f}" for p, w in (("text_encoder", 10), ("unet", 8), ("vae", 8)))
        )
    if plan.low_tiled:
        lines.append("low mode decodes in 512 px tiles here: a whole-image decode would set its peak")
    if plan.auto is None:
        lines.append("--vram auto: no GPU found; give --gpu_memory GB to see its choice")
    else:
        lines.append(f"--vram auto on {gpu_bytes / gib:.2f} GiB free: {plan.auto} "
                     f"(peak + {HEADROOM_BYTES >> 20} MiB for workspaces and fragmentation)")
    return "\n".join(lines)
