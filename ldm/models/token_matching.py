"""Token merging for the UNet's self-attention (ToMe for SD: Bolya & Hoffman 2023, "Token Merging for Fast
Stable Diffusion", after Bolya et al. 2023, "Token Merging: Your ViT But Faster").

Before a transformer block's self-attention, the pixels (tokens) of the feature map are split into a
destination set, one token per ``stride`` cell (its top-left token: no random choice, so a seed keeps its
image), and a source set (the rest). Each source token is paired with its most similar destination token
by cosine similarity of the block's input (bipartite soft matching, ToMe Sec. 3); the ``r = ratio * N``
source tokens with the most similar partners are averaged into them. Attention runs over the N - r tokens
left, and its output is copied back ("unmerged") to every token, merged ones taking their partner's.
Self-attention costs O(N^2), so it shrinks by about (1 - ratio)^2; the rest of the block is untouched.

This is tomesd's algorithm (``tomesd.patch.compute_merge`` and ``merge.bipartite_soft_matching_random2d``)
with its defaults: stride 2x2, only the blocks at the latent's full resolution (``max_downsample=1``), only
self-attention merged, no random partition. It is carried here rather than patched in by tomesd: tomesd
finds the image size with a forward hook on the UNet, which the low-VRAM mode's streamed UNet never calls,
and it swaps the blocks' classes at run time; here each block holds its settings and is told its grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


MAX_RATIO = 0.75  # 1 - 1/(2*2): with a 2x2 stride at most three tokens in four are sources


@dataclass(frozen=True)
class TokenMerging:
    """Merge ``ratio`` of the tokens before self-attention in blocks downsampled at most ``max_downsample``
    times; one destination token per ``stride`` = (rows, columns) cell."""

    ratio: float
    max_downsample: int = 1
    stride: tuple[int, int] = (2, 2)

    def __post_init__(self):
        limit = 1 - 1 / (self.stride[0] * self.stride[1])
        if not 0 <= self.ratio <= limit:
            raise ValueError(f"token merging ratio must be between 0 and {limit:g}, not {self.ratio:g}")


class TokenMerge:
    """The merge and unmerge of one block call, matched on ``metric`` [B, N, C] over an ``height`` x
    ``width`` token grid (row-major)."""

    def __init__(self, metric: torch.Tensor, height: int, width: int, stride: tuple[int, int], ratio: float):
        batch, tokens, _ = metric.shape
        if height * width != tokens:
            raise ValueError(f"a {height}x{width} grid has {height * width} tokens, not {tokens}")
        self.batch, self.tokens = batch, tokens
        self.dst_idx, self.src_idx = _partition(height, width, stride, metric.device)
        with torch.no_grad():
            unit = metric / metric.norm(dim=-1, keepdim=True)
            scores = unit[:, self.src_idx] @ unit[:, self.dst_idx].transpose(-1, -2)  # [B, src, dst]
            self.r = min(int(tokens * ratio), self.src_idx.numel())
            best, partner = scores.max(dim=-1)
            order = best.argsort(dim=-1, descending=True)
            self.unmerged = order[:, self.r :]  # source tokens kept as they are (indices into the source set)
            self.merged = order[:, : self.r]  # source tokens averaged into a destination token
            self.partner = partner.gather(-1, self.merged)  # their destinations (indices into the dst set)

    def merge(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, C] -> [B, N - r, C]: the unmerged sources, then the destinations averaged with theirs."""
        src, dst = x[:, self.src_idx], x[:, self.dst_idx]
        channels = x.shape[-1]
        kept = src.gather(1, _expand(self.unmerged, channels))
        moved = src.gather(1, _expand(self.merged, channels))
        dst = dst.scatter_reduce(1, _expand(self.partner, channels), moved, reduce="mean", include_self=True)
        return torch.cat([kept, dst], dim=1)

    def unmerge(self, y: torch.Tensor) -> torch.Tensor:
        """[B, N - r, C] -> [B, N, C]: every token gets its own output, a merged one its destination's."""
        channels = y.shape[-1]
        kept, dst = y[:, : self.unmerged.shape[1]], y[:, self.unmerged.shape[1] :]
        out = y.new_empty(self.batch, self.tokens, channels)
        out[:, self.dst_idx] = dst
        out.scatter_(1, _expand(self.src_idx[self.unmerged], channels), kept)
        out.scatter_(1, _expand(self.src_idx[self.merged], channels), dst.gather(1, _expand(self.partner, channels)))
        return out


def _expand(index: torch.Tensor, channels: int) -> torch.Tensor:
    return index[..., None].expand(*index.shape, channels)


def _partition(height: int, width: int, stride: tuple[int, int], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices of the destinations (the top-left of each whole stride cell) and of the sources (the
    rest, rows and columns past the last whole cell included), both ascending."""
    rows, cols = torch.arange(0, (height // stride[0]) * stride[0], stride[0]), torch.arange(0, (width // stride[1]) * stride[1], stride[1])
    is_dst = torch.zeros(height, width, dtype=torch.bool)
    is_dst[rows[:, None], cols[None, :]] = True
    flat = is_dst.flatten()
    return flat.nonzero().flatten().to(device), (~flat).nonzero().flatten().to(device)


def plan_merge(settings: TokenMerging | None, x: torch.Tensor, size: tuple[int, int] | None) -> TokenMerge | None:
    """The merge for one block call with input ``x`` on a ``size`` = (height, width) grid, or None when
    the block does not merge (no settings, ratio 0, no grid given, or fewer than one token to merge)."""
    if settings is None or size is None or int(x.shape[1] * settings.ratio) <= 0:
        return None
    return TokenMerge(x, size[0], size[1], settings.stride, settings.ratio)
