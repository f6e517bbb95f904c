"""Shared fixtures: tiny random-weight checkpoints in the real SD v1 key layout, written once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.config import load_model_config
from ldm.loading.random_weights import random_state_dict, save_checkpoint

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny-random.yaml"
SD_V1_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-inference.yaml"

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_config_path() -> Path:
    return TINY_CONFIG


@pytest.fixture(scope="session")
def tiny_config():
    return load_model_config(TINY_CONFIG)


@pytest.fixture(scope="session")
def tiny_state_dict(tiny_config):
    return random_state_dict(tiny_config, seed=1234)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_state_dict) -> Path:
    """A tiny random checkpoint as .safetensors."""
    return save_checkpoint(tiny_state_dict, tmp_path_factory.mktemp("ckpt") / "tiny.safetensors")


@pytest.fixture(scope="session")
def tiny_checkpoint_ckpt(tmp_path_factory, tiny_state_dict) -> Path:
    """The same weights as a CompVis-style pickled .ckpt."""
    return save_checkpoint(tiny_state_dict, tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")
