"""Cross-attention and the spatial transformer of SD v1's UNet (CompVis ``ldm/modules/attention.py``).

Attribute paths mirror CompVis so checkpoint keys load as they are
(``...transformer_blocks.0.attn2.to_k.weight``, ``ff.net.0.proj``, ``to_out.0``).

Two attention backends compute the same softmax(QK^T / sqrt(d)) V (Vaswani et al. 2017), here and in the
VAE's attention block (:func:`attention`):
- ``sdpa``: PyTorch's fused ``scaled_dot_product_attention`` (flash / memory-efficient kernels on CUDA).
- ``sliced``: the score matrix is built ``slice_size`` query rows at a time, as the optimizedSD fork and
  diffusers' ``set_attention_slice`` do, so peak memory grows with the slice and not with (h*w)^2.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ldm.models.token_matching import TokenMerging, plan_merge


BACKENDS = ("sdpa", "sliced")


@dataclass(frozen=True)
class AttentionBackend:
    name: str = "sdpa"
    slice_size: int | None = None  # query rows per slice for "sliced"; None picks by size

    def __post_init__(self) -> None:
        if self.name not in BACKENDS:
            raise ValueError(f"unknown attention backend {self.name!r}; choose sdpa or sliced")
        if self.slice_size is not None and self.slice_size < 1:
            raise ValueError("attention slice size must be at least 1")


# A context variable, not a module global: a ``with attention_backend(...)`` block sets it for its own
# code only, and leaves it as it was on the way out, an exception included.
_backend: ContextVar[AttentionBackend] = ContextVar("attention_backend", default=AttentionBackend())


@contextmanager
def attention_backend(name: str, slice_size: int | None = None) -> Iterator[AttentionBackend]:
    """Every attention inside the block (UNet and VAE) computes with ``name`` (``"sdpa"`` or ``"sliced"``)."""
    token = _backend.set(AttentionBackend(name, slice_size))
    try:
        yield _backend.get()
    finally:
        _backend.reset(token)


def set_attention_backend(name: str, slice_size: int | None = None) -> None:
    """Choose the backend for the rest of this context (prefer :func:`attention_backend`, which undoes it)."""
    _backend.set(AttentionBackend(name, slice_size))


def get_attention_backend() -> AttentionBackend:
    return _backend.get()


def _sliced_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slice_size: int | None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over [B, heads, N, d] tensors, ``slice_size`` query rows at a time."""
    scale = q.shape[-1] ** -0.5
    queries = q.shape[2]
    if slice_size is None:
        # Keep one slice's score matrix near 64 MiB of fp32 whatever the image size.
        per_row = q.shape[0] * q.shape[1] * k.shape[2] * 4
        slice_size = max(1, min(queries, (64 << 20) // max(per_row, 1)))
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    for start in range(0, queries, slice_size):
        end = min(start + slice_size, queries)
        scores = torch.matmul(q[:, :, start:end], k.transpose(-1, -2)) * scale
        out[:, :, start:end] = torch.matmul(scores.softmax(dim=-1), v)
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over [B, heads, N, d] tensors, with the backend of the current context."""
    backend = _backend.get()
    if backend.name == "sliced":
        return _sliced_attention(q, k, v, backend.slice_size)
    return F.scaled_dot_product_attention(q, k, v)


class CrossAttention(nn.Module):
    """Multi-head attention of queries from ``x`` over keys/values from ``context`` (self-attention without it)."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        batch, tokens, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        # [B, N, heads * d] -> [B, heads, N, d]
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        if q.device.type == "cpu":
            # The CPU's fused kernel reads each head faster when it is contiguous (the same numbers: -3 to
            # -13 % per 4096-token attention, docs/benchmarks.md); CUDA's take the strided views as they are.
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(batch, tokens, -1))


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        inner_dim = dim * mult
        # net.1 is CompVis' Dropout slot: kept so that net.2 lines up with the checkpoint.
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(0.0), nn.Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention to the text, gated feed-forward; pre-norm residuals.

    With ``token_merging`` set (:func:`ldm.models.token_merging.apply_token_merging`) and the token grid's
    ``size`` given, self-attention runs over merged tokens (ToMe for SD, :mod:`ldm.models.token_merging`).
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=heads, dim_head=dim_head)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=heads, dim_head=dim_head)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.token_merging: TokenMerging | None = None

    def forward(self, x: torch.Tensor, context: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        merge = plan_merge(self.token_merging, x, size)  # matched on the block's input, as tomesd does
        if merge is None:
            x = self.attn1(self.norm1(x)) + x
        else:
            x = merge.unmerge(self.attn1(merge.merge(self.norm1(x)))) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, conditioned on ``context`` (Rombach et al. 2022, Sec. 3.3)."""

    def __init__(self, in_channels: int, heads: int, dim_head: int, depth: int, context_dim: int):
        super().__init__()
        inner_dim = heads * dim_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, heads, dim_head, context_dim) for _ in range(depth)
        )
        self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = x.shape
        h = self.proj_in(self.norm(x))
        h = h.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H*W, C]
        for block in self.transformer_blocks:
            h = block(h, context, (height, width))
        # contiguous(): the transposed view is channels-last, and every conv after it would run slower.
        h = h.transpose(1, 2).reshape(batch, -1, height, width).contiguous()
        return self.proj_out(h) + x
