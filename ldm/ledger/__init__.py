"""The VRAM ledger: device memory of a run counted on the ``meta`` device (see :mod:`ldm.ledger.simulation`)."""

from ldm.ledger.attention_replay import CudaAttentionChoice, cuda_kernel
from ldm.ledger.counting import DeviceBytes, Peak
from ldm.ledger.shapes import RunShape
from ldm.ledger.simulation import PHASES, LedgerRun, meta_stable_diffusion, simulate

__all__ = ["CudaAttentionChoice", "DeviceBytes", "LedgerRun", "PHASES", "Peak", "RunShape", "cuda_kernel",
           "meta_stable_diffusion", "simulate"]
