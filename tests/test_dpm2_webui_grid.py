"""DPM2 and DPM2 a walk the webui's grid: k-diffusion's sigmas for steps + 1 with the next-to-last one dropped
(the webui's ``discard_next_to_last_sigma``), so that "Sampler: DPM2, Schedule type: Uniform" reproduces there.

The oracle is k-diffusion itself (``pip install --no-deps k-diffusion``): its ``CompVisDenoiser`` around the
same eps model, its ``get_sigmas``, its ``sample_dpm_2`` / ``sample_dpm_2_ancestral``. Only
``k_diffusion/sampling.py`` and ``external.py`` are loaded: the package's ``__init__`` imports torchvision,
and ``sampling.py`` imports torchsde / torchdiffeq, which the DPM2 samplers never call (stubbed when absent).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch

from ldm.config import ScheduleConfig
from ldm.samplers.noise import SeededNoise
from ldm.samplers import SAMPLERS, sample
from ldm.samplers.schedule import DiffusionSchedule

SHAPE = (4, 8, 8)


def _stub(name: str, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


@pytest.fixture(scope="module")
def k_diffusion():
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (pip install --no-deps k-diffusion)")
    root = Path(spec.submodule_search_locations[0])
    package = _stub("k_diffusion", __path__=[str(root)])
    utils = _stub("k_diffusion.utils", append_dims=lambda x, n: x[(...,) + (None,) * (n - x.ndim)])
    stubs = {"k_diffusion": package, "k_diffusion.utils": utils}
    for missing in ("torchsde", "torchdiffeq"):
        if importlib.util.find_spec(missing) is None:
            stubs[missing] = _stub(missing, odeint=None, BrownianTree=None)
    loaded = {}
    with pytest.MonkeyPatch.context() as patch:
        for name, module in stubs.items():
            patch.setitem(sys.modules, name, module)
        package.utils = utils
        for name in ("sampling", "external"):
            module_spec = importlib.util.spec_from_file_location(f"k_diffusion.{name}", root / f"{name}.py")
            module = importlib.util.module_from_spec(module_spec)
            patch.setitem(sys.modules, f"k_diffusion.{name}", module)
            setattr(package, name, module)
            module_spec.loader.exec_module(module)
            loaded[name] = module
    return types.SimpleNamespace(**loaded)


@pytest.fixture(scope="module")
def schedule():
    return DiffusionSchedule.from_config(ScheduleConfig())


@pytest.fixture(scope="module")
def eps_model():
    """A smooth, x- and t-dependent eps model: what matters here is the grid and the integrator."""
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(SHAPE[0], SHAPE[0], generator=g) / 2
    bias = torch.randn(1, *SHAPE, generator=g)

    def model(x, t):
        mixed = torch.einsum("oc,bchw->bohw", weight, x)
        return torch.tanh(mixed + bias * torch.cos(t.float()[:, None, None, None] / 150))

    return model


class InnerModel(torch.nn.Module):
    """What k-diffusion's CompVisDenoiser wraps: ``alphas_cumprod`` and ``apply_model(x, t, cond)``."""

    def __init__(self, eps_model, schedule):
        super().__init__()
        self.eps_model = eps_model
        self.register_buffer("alphas_cumprod", torch.as_tensor(schedule.alphas_cumprod, dtype=torch.float32))

    def apply_model(self, x, t, cond=None):
        return self.eps_model(x, t)


class Recorder:
    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, like):
        return torch.randn(like.shape, generator=self.generator, dtype=like.dtype)


def webui_dpm2_sigmas(denoiser, steps):
    """sd_samplers_kdiffusion: ``steps + 1`` sigmas of the model's grid, the next-to-last one dropped."""
    sigmas = denoiser.get_sigmas(steps + 1)
    return torch.cat([sigmas[:-2], sigmas[-1:]])


@pytest.mark.parametrize("steps", [4, 10])
def test_dpm2_grid_is_the_webuis(k_diffusion, schedule, eps_model, steps):
    denoiser = k_diffusion.external.CompVisDenoiser(InnerModel(eps_model, schedule))
    expected = webui_dpm2_sigmas(denoiser, steps)
    for name in ("dpm2", "dpm2_a"):
        levels = torch.tensor(SAMPLERS[name].grid.levels(schedule, steps, "uniform"))
        assert len(levels) == steps + 1
        torch.testing.assert_close(levels.float(), expected, rtol=1e-4, atol=0)  # k-diffusion computes them in float32
    plain = torch.tensor(SAMPLERS["euler"].grid.levels(schedule, steps))
    torch.testing.assert_close(plain.float(), denoiser.get_sigmas(steps), rtol=1e-4, atol=0)


@pytest.mark.parametrize("steps", [4, 10])
def test_dpm2_equals_k_diffusion_driven_with_the_same_sigmas(k_diffusion, schedule, eps_model, steps):
    noise = SeededNoise([5, 6]).initial(SHAPE)
    denoiser = k_diffusion.external.CompVisDenoiser(InnerModel(eps_model, schedule))
    sigmas = webui_dpm2_sigmas(denoiser, steps)
    with torch.no_grad():
        expected = k_diffusion.sampling.sample_dpm_2(denoiser, noise * sigmas[0], sigmas, disable=True)
    got = sample("dpm2", eps_model, schedule, noise, steps, schedule_type="uniform")
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-4 * max(1.0, expected.abs().max().item()))


@pytest.mark.parametrize("steps", [4, 10])
def test_dpm2_a_equals_k_diffusion_given_the_same_noise(k_diffusion, schedule, eps_model, steps):
    noise = SeededNoise([5, 6]).initial(SHAPE)
    denoiser = k_diffusion.external.CompVisDenoiser(InnerModel(eps_model, schedule))
    sigmas = webui_dpm2_sigmas(denoiser, steps)
    with torch.no_grad():
        draws = Recorder(9)  # k-diffusion asks noise_sampler(sigma, sigma_next) for noise shaped like x
        expected = k_diffusion.sampling.sample_dpm_2_ancestral(
            denoiser, noise * sigmas[0], sigmas, disable=True, noise_sampler=lambda sigma, sigma_next: draws(noise))
    got = sample("dpm2_a", eps_model, schedule, noise, steps, noise_sampler=Recorder(9), schedule_type="uniform")
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-4 * max(1.0, expected.abs().max().item()))
