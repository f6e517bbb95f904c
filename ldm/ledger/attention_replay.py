"""CUDA's choice of attention kernel, replayed on the ``meta`` device.

On ``meta``, ``F.scaled_dot_product_attention`` always takes its math path (the whole score matrix,
upcast to fp32 for fp16 inputs), while on a CUDA GPU it picks a fused kernel whenever the inputs allow
it, and a fused kernel holds no score matrix at all. :class:`CudaAttentionChoice` (a
``TorchFunctionMode``, so it sees this project's, transformers' and diffusers' calls alike) decides as
PyTorch's ``sdp_utils.cpp`` does for inference without a mask or dropout, in its default priority order:

1. flash attention (Dao et al. 2022): fp16/bf16, equal head dims of at most 256, last dimension
   contiguous (stride 1);
2. memory-efficient attention (Rabe & Staats 2021, xFormers' kernel): fp16/bf16/fp32, head dims
   aligned (a multiple of 8 in half precision, 4 in fp32), last dimension contiguous;
3. otherwise the math path, which runs as it is on ``meta`` (its memory is what CUDA's math path holds).

A fused choice is replayed by calling that kernel's own op, whose ``meta`` implementation allocates
exactly its outputs (the attention output and the fp32 log-sum-exp).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

FLASH_MAX_HEAD_DIM = 256


def _last_dim_contiguous(*tensors: torch.Tensor) -> bool:
    return all(t.stride(-1) == 1 for t in tensors)


def cuda_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, has_mask: bool = False, dropout: float = 0.0) -> str:
    """``"flash"``, ``"efficient"`` or ``"math"``: what CUDA's SDPA runs for these inputs (sm80 or newer)."""
    if q.dim() != 4 or has_mask or dropout or not _last_dim_contiguous(q, k, v):
        return "math"
    half = q.dtype in (torch.float16, torch.bfloat16)
    if half and q.shape[-1] == k.shape[-1] == v.shape[-1] <= FLASH_MAX_HEAD_DIM:
        return "flash"
    alignment = 8 if half else 4
    if (half or q.dtype == torch.float32) and q.shape[-1] % alignment == 0 and v.shape[-1] % alignment == 0:
        return "efficient"
    return "math"


class CudaAttentionChoice(TorchFunctionMode):
    """Within the mode, SDPA on ``meta`` tensors allocates what CUDA's kernel would. ``choices`` counts the
    kernels picked (for tests and the ledger's report)."""

    def __init__(self) -> None:
        super().__init__()
        self.choices: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or not args or not args[0].is_meta:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        dropout = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
        causal = kwargs.get("is_causal", args[5] if len(args) > 5 else False)
        kernel = cuda_kernel(q, k, v, mask is not None, dropout)
        self.choices[kernel] = self.choices.get(kernel, 0) + 1
        scale = kwargs.get("scale")
        if kernel == "flash":
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[0]
        if kernel == "efficient":
            return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False, 0.0, causal, scale=scale)[0]
        return func(*args, **kwargs)
