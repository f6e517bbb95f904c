"""The torchrun work split (optimizedSD/distributed.py): every unit once, the single process's seeds and
file numbers, torchrun's environment read or ignored."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest

from optimizedSD.distributed import (
    Distributed,
    DistributedError,
    RankResult,
    merge_results,
    from_environment,
    is_main_process,
    planned_file_numbers,
    run_share,
    unfinished_line,
    units_for_rank,
    work_units,
)
from optimizedSD.outputs import SampleWriter

SHAPES = [(1, 8, 1), (3, 2, 2), (5, 1, 3), (2, 3, 1), (1, 1, 4)]  # (prompts, n_iter, n_samples)


def _single_process_images(n_prompts: int, n_iter: int, n_samples: int, seed: int, fixed_code: bool):
    """(iteration, prompt, seed) of every image, as the generation loop on main walks them (its code, copied)."""
    out = []
    image_index = 0
    for iteration in range(n_iter):
        for prompt in range(n_prompts):
            seeds = [seed + image_index + k for k in range(n_samples)]
            noise_seeds = [seed + k for k in range(n_samples)] if fixed_code else seeds
            out.extend((iteration, prompt, s) for s in noise_seeds)
            image_index += n_samples
    return out


@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7, 9])
@pytest.mark.parametrize("shape", SHAPES)
def test_every_unit_exactly_once_and_balanced(shape, world_size):
    units = work_units(*shape)
    shares = [units_for_rank(units, rank, world_size) for rank in range(world_size)]
    indices = sorted(unit.index for share in shares for unit in share)
    assert indices == list(range(shape[0] * shape[1]))
    assert len({(u.iteration, u.prompt_index) for share in shares for u in share}) == len(units)
    sizes = [len(share) for share in shares]
    assert max(sizes) - min(sizes) <= 1


def test_one_prompt_many_iterations_spreads():
    units = work_units(1, 8, 1)
    assert [len(units_for_rank(units, rank, 4)) for rank in range(4)] == [2, 2, 2, 2]


@pytest.mark.parametrize("fixed_code", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_seeds_equal_a_single_process(shape, fixed_code):
    seed = 1234
    expected = _single_process_images(*shape, seed, fixed_code)
    for world_size in (1, 2, 3):
        got = {}
        for rank in range(world_size):
            for unit in units_for_rank(work_units(*shape), rank, world_size):
                for k, s in enumerate(unit.noise_seeds(seed, fixed_code)):
                    got[unit.first_image + k] = (unit.iteration, unit.prompt_index, s)
        assert [got[i] for i in range(len(expected))] == expected


def test_file_numbers_equal_the_writer_writing_in_order(tmp_path):
    """The oracle is SampleWriter itself, writing a single process's images one after the other into folders
    that already hold files (two prompts share a folder)."""
    folders = ["a_cat", "a_dog", "a_cat"]
    n_iter, n_samples, seed = 2, 2, 7
    for name, existing in [("a_cat", "seed_1_00004.png"), ("a_dog", "seed_9_00000.png")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / existing).write_bytes(b"")
    starts = {"a_cat": 5, "a_dog": 1}
    writer = SampleWriter(tmp_path, "png")
    pixel = np.zeros((8, 8, 3), np.uint8)
    names = []
    for image in _single_process_images(len(folders), n_iter, n_samples, seed, False):
        names.append(writer.write_sample(folders[image[1]], image[2], pixel, None).name)
    numbers = planned_file_numbers(folders, n_iter, n_samples, starts)
    seeds = [image[2] for image in _single_process_images(len(folders), n_iter, n_samples, seed, False)]
    assert names == [f"seed_{s}_{n:05}.png" for s, n in zip(seeds, numbers)]


def test_environment():
    full = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    assert from_environment({}) is None
    assert from_environment({**full, "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}) is None
    ctx = from_environment(full)
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.is_main) == (1, 2, 1, False)
    for broken in ({"RANK": "0"}, {**full, "RANK": "2"}, {**full, "WORLD_SIZE": "two"}):
        with pytest.raises(DistributedError):
            from_environment(broken)
    import torch

    assert ctx.device(torch.device("cpu")) == torch.device("cpu")


def test_only_rank_0_reports():
    assert is_main_process({}) and is_main_process({"RANK": "0"}) and not is_main_process({"RANK": "3"})


def test_run_share_stops_at_the_failure_and_names_what_is_left():
    units = work_units(3, 2, 2)[1::2]  # rank 1 of 2
    done = []

    def run(unit):
        if unit.index == 3:
            raise RuntimeError("disk full\nmore detail")
        done.append(unit.index)

    unfinished, error = run_share(units, run)
    assert done == [1] and [u.index for u in unfinished] == [3, 5]
    line = unfinished_line("optimized_txt2img.py", 1, 2, "RuntimeError: disk full", unfinished, seed=10)
    assert line == ("optimized_txt2img.py: error: rank 1 of 2 stopped (RuntimeError: disk full); unfinished units: "
                    "#3 (prompt 1, iteration 2, seeds 16-17), #5 (prompt 3, iteration 2, seeds 20-21)")


def test_run_share_turns_sigterm_into_a_report():
    units = work_units(1, 3, 1)
    before = signal.getsignal(signal.SIGTERM)
    unfinished, error = run_share(units, lambda unit: os.kill(os.getpid(), signal.SIGTERM) if unit.index == 1 else None)
    assert [u.index for u in unfinished] == [1, 2] and type(error).__name__ == "Terminated"
    assert signal.getsignal(signal.SIGTERM) == before  # the handler is put back


def test_merge_results_orders_as_a_single_process():
    results = [
        RankResult(rank=1, images=1, flagged=1, written=["a1"], grid_images=[(1, "p1")], unfinished=[3]),
        RankResult(rank=0, images=2, written=["a0", "a2"], grid_images=[(0, "p0"), (2, "p2")]),
    ]
    merged = merge_results(results)
    assert merged.written == ["a0", "a2", "a1"] and merged.grid_images == ["p0", "p1", "p2"]
    assert (merged.images, merged.flagged, merged.unfinished, merged.failed) == (3, 1, {1: [3]}, True)


@pytest.mark.parametrize("fixed_code", [False, True])
def test_units_are_the_generation_loops_batches(tmp_path, fixed_code):
    """generate() maps unit ``u`` to ``plan_batches(...)[u]``: same order, same seeds, same first image."""
    from optimizedSD.arguments import parse_args
    from ldm.pipeline.batches import plan_batches

    prompts = ["a", "b", "c"]
    argv = ["--prompt", "x", "--n_iter", "3", "--n_samples", "2", "--seed", "5", "--device", "cpu"]
    request = parse_args(argv + (["--fixed_code"] if fixed_code else []), "txt2img")
    batches = list(plan_batches(request, prompts))
    units = work_units(len(prompts), 3, 2)
    assert len(batches) == len(units)
    for unit, batch in zip(units, batches):
        assert (batch.iteration, batch.prompt_index, batch.first_image) == (unit.iteration, unit.prompt_index, unit.first_image)
        assert list(batch.seeds) == unit.noise_seeds(5, fixed_code)
