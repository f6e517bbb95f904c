"""Token merging (``--tome``) equals tomesd applied to diffusers' UNet on the same weights."""

from __future__ import annotations

import pytest
import torch

from ldm.loading.stable_diffusion import load_stable_diffusion
from ldm.memory.residency import Residency
from ldm.models.token_matching import TokenMerge, TokenMerging
from ldm.models.token_merging import apply_token_merging, transformer_blocks_by_downsample
from tests.reference import diffusers_unet, max_abs_diff

tomesd = pytest.importorskip("tomesd")

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def sd(tiny_checkpoint, tiny_config_path):
    return load_stable_diffusion(tiny_checkpoint, tiny_config_path)


def _inputs(batch: int, height: int, width: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, height, width, generator=generator)
    context = torch.randn(batch, 77, 32, generator=generator)
    t = torch.linspace(1.0, 981.0, batch)
    return x, t, context


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
@pytest.mark.parametrize("shape", [(2, 8, 8), (1, 16, 8), (3, 12, 20)])
def test_unet_with_token_merging_matches_tomesd_on_diffusers(sd, tiny_state_dict, tiny_config_path, ratio, shape):
    reference = diffusers_unet(tiny_state_dict, tiny_config_path)
    x, t, context = _inputs(*shape)
    with torch.no_grad():
        plain = sd.unet(x, t, context)
        tomesd.apply_patch(reference, ratio=ratio, use_rand=False)  # its other defaults: 2x2, max_downsample 1
        theirs = reference(x, t, encoder_hidden_states=context).sample
        assert apply_token_merging(sd.unet, ratio) == 3  # the tiny UNet's full-resolution blocks: input 1, output 2 and 3
        try:
            ours = sd.unet(x, t, context)
        finally:
            apply_token_merging(sd.unet, None)
        again = sd.unet(x, t, context)
    assert max_abs_diff(plain, theirs) > 1e-3  # merging changes the output...
    assert max_abs_diff(ours, theirs) < TOLERANCE  # ...as tomesd does
    assert torch.equal(again, plain)  # and clearing it restores the UNet


def test_streamed_unet_merges_the_same(sd):
    x, t, context = _inputs(2, 8, 16)
    apply_token_merging(sd.unet, 0.5)
    try:
        with torch.no_grad():
            whole = sd.unet(x, t, context)
            residency = Residency(sd, "cpu", "low", track_cpu_copies=True)
            with residency.use("unet") as streamed:
                low = streamed(x, t, context, 1)
            residency.release()
    finally:
        apply_token_merging(sd.unet, None)
    assert max_abs_diff(low, whole) < 1e-5


def test_merge_averages_groups_and_unmerge_hands_each_token_its_groups_value():
    """Checked token by token against the definition (ToMe Sec. 3), in plain Python."""
    x = torch.randn(2, 6 * 5, 3, generator=torch.Generator().manual_seed(3))
    merge = TokenMerge(x, 6, 5, (2, 2), 0.5)  # 6x5 grid: 6 destinations (the last column has none)
    assert merge.dst_idx.tolist() == [0, 2, 10, 12, 20, 22]
    assert merge.merge(x).shape == (2, 30 - 15, 3)
    restored = merge.unmerge(merge.merge(x))
    for b in range(2):
        groups = {int(d): [int(d)] for d in merge.dst_idx}
        for s, d in zip(merge.merged[b].tolist(), merge.partner[b].tolist()):
            groups[int(merge.dst_idx[d])].append(int(merge.src_idx[s]))
        seen = set()
        for members in groups.values():
            for token in members:
                assert torch.allclose(restored[b, token], x[b, members].mean(dim=0), atol=1e-6)
            seen.update(members)
        assert len(seen) == 6 + 15  # every destination and every merged source...
        for token in set(range(30)) - seen:  # ...and the rest are untouched
            assert torch.equal(restored[b, token], x[b, token])


def test_only_full_resolution_blocks_merge(sd):
    levels = [factor for factor, _ in transformer_blocks_by_downsample(sd.unet)]
    assert levels == [1, 2, 2, 2, 2, 1, 1]  # input 1, input 2, middle, output 0-1 at 2, output 2-3 at 1
    assert apply_token_merging(sd.unet, TokenMerging(0.5, max_downsample=2)) == 7
    assert apply_token_merging(sd.unet, TokenMerging(0.5)) == 3
    assert apply_token_merging(sd.unet, 0.0) == 0
    assert all(block.token_merging is None for _, block in transformer_blocks_by_downsample(sd.unet))


@pytest.mark.parametrize("ratio", [-0.1, 0.76])
def test_ratio_out_of_range(ratio):
    with pytest.raises(ValueError, match="between 0 and 0.75"):
        TokenMerging(ratio)
