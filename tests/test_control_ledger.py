"""The VRAM ledger with ControlNets: ``--plan`` counts one ControlNet of the config's architecture per
``--control_model`` (reading no file), and the targets hold (SD v1, fp16, 512x512, batch 1 with guidance,
DPM-Solver++(2M), one ControlNet): low <= 0.50 GiB, medium <= 2.5 GiB, full no more than diffusers' resident
``StableDiffusionControlNetPipeline``."""

from __future__ import annotations

import pytest

from ldm.ledger.plan import plan_steps
from tests.conftest import SD_V1_CONFIG
from tests.test_vram_ledger import GIB, plan_request

CONTROL = ["--control_model", "no-such-controlnet.pth"]


class Plans(dict):
    """``--plan`` of the 512x512 run with ``count`` ControlNets, simulated when first asked for."""

    def __missing__(self, count: int):
        from optimizedSD.plan import plan_for

        self[count] = plan_for(plan_request(512, *CONTROL * count))
        return self[count]


@pytest.fixture(scope="module")
def plans():
    return Plans()


def test_targets_with_one_controlnet(plans):
    modes = plans[1].modes
    assert modes["low"].peak_bytes <= 0.50 * GIB, modes["low"].peak_bytes / GIB
    assert modes["medium"].peak_bytes <= 2.5 * GIB, modes["medium"].peak_bytes / GIB
    assert modes["low"].peak_bytes < modes["medium"].peak_bytes < modes["full"].peak_bytes


@pytest.mark.slow
def test_each_controlnet_is_counted(plans):
    from ldm.control.network import ControlNet
    from ldm.control.units import control_config
    from ldm.config import load_model_config
    import torch

    with torch.device("meta"):
        net = ControlNet(control_config(load_model_config(SD_V1_CONFIG)))
    control_bytes = 2 * sum(p.numel() for p in net.parameters())  # fp16
    assert 360e6 < control_bytes / 2 < 362e6  # lllyasviel's 361M parameters
    full = [plans[n].modes["full"].peak.weights for n in (0, 1, 2)]
    assert full[1] - full[0] == full[2] - full[1] == control_bytes  # resident in full mode, one copy each
    low = [plans[n].modes["low"].peak_bytes for n in (0, 1, 2)]
    assert low[0] < low[1] < low[2] < low[0] + control_bytes / 4  # streamed: a few blocks at a time


@pytest.mark.slow
def test_full_mode_is_no_more_than_diffusers_resident_control_pipeline(plans):
    from tests.control_ledger_reference import diffusers_control_resident_run

    ours = plans[1].modes["full"]
    theirs = diffusers_control_resident_run(SD_V1_CONFIG, 512, 512, steps=plan_steps("dpm_solver", 20))
    assert ours.peak_bytes <= theirs.peak_bytes, (ours.peak_bytes / GIB, theirs.peak_bytes / GIB)
