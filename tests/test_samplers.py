"""Samplers, guidance and seeded noise against diffusers' schedulers driven by hand with the same tiny UNet.

The oracle UNet is diffusers' ``UNet2DConditionModel`` (tiny, random fan-in-scaled weights so that eps
depends visibly on x, t and the context); the comparison only needs the same model on both sides.
"""

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    KDPM2AncestralDiscreteScheduler,
    KDPM2DiscreteScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UNet2DConditionModel,
)

from ldm.config import ScheduleConfig
from ldm.samplers.guidance import GuidedDenoiser
from ldm.samplers.noise import SeededNoise
from ldm.samplers import SAMPLER_NAMES, SAMPLERS, sample, walk_levels
from ldm.samplers.common import ScheduledEps
from ldm.samplers.grids import SIGMAS
from ldm.samplers.k_diffusion import lms_coefficients
from ldm.samplers.schedule import DiffusionSchedule

SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (4, 8, 8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny UNet gains nothing from threads, and on a shared 2-core machine two threads run ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    ).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:  # biases, and norm scales around 1
                scale_around_1 = "norm" in name and name.endswith("weight")
                p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if scale_around_1 else 0.0))

    def call(x, t, context):
        return model(x, t, encoder_hidden_states=context).sample

    return call


@pytest.fixture(scope="module")
def schedule():
    return DiffusionSchedule.from_config(ScheduleConfig())


@pytest.fixture(scope="module")
def cond():
    g = torch.Generator().manual_seed(2)
    return torch.randn(2, 77, 32, generator=g), torch.randn(2, 77, 32, generator=g)


@pytest.fixture(scope="module")
def eps_model(unet, cond):
    return GuidedDenoiser(unet, cond[0], cond[1], scale=7.5)


@pytest.fixture(scope="module")
def noise():
    return SeededNoise([11, 12]).initial(SHAPE)


class Recorder:
    """A noise sampler that draws from one generator and keeps what it drew."""

    def __init__(self, seed):
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn = []

    def __call__(self, like):
        self.drawn.append(torch.randn(like.shape, generator=self.generator, dtype=like.dtype))
        return self.drawn[-1]


@torch.no_grad()
def drive(scheduler, eps_model, x, timesteps=None, step_kwargs=lambda i: {}):
    """The diffusers pipeline's denoising loop."""
    for i, t in enumerate(scheduler.timesteps if timesteps is None else timesteps):
        model_in = scheduler.scale_model_input(x, t)
        eps = eps_model(model_in, t.float().expand(x.shape[0]))
        x = scheduler.step(eps, t, x, **step_kwargs(i)).prev_sample
    return x


def assert_close(ours, ref, tol=1e-4):
    """Equal within ``tol`` of the latents' scale: a random UNet is no denoiser, so its x0 predictions (and the
    final latents) reach tens, and float32 rounding grows with them (guidance multiplies the UNet's own
    batch-size-dependent rounding, ~1e-6, by the scale)."""
    scale = ref.abs().max().item()
    assert scale > 0.1  # non-trivial output
    torch.testing.assert_close(ours, ref, rtol=0, atol=tol * max(1.0, scale))


# ---- against diffusers -----------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [10, 20])
def test_ddim_equals_diffusers(eps_model, schedule, noise, steps):
    ref = DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    ref.set_timesteps(steps)
    assert_close(sample("ddim", eps_model, schedule, noise, steps), drive(ref, eps_model, noise))


def test_ddim_with_eta_equals_diffusers_given_the_same_noise(eps_model, schedule, noise):
    recorder = Recorder(5)
    ours = sample("ddim", eps_model, schedule, noise, 10, eta=0.7, noise_sampler=recorder)
    assert len(recorder.drawn) == 10
    ref = DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    ref.set_timesteps(10)
    expected = drive(ref, eps_model, noise, step_kwargs=lambda i: dict(eta=0.7, variance_noise=recorder.drawn[i]))
    assert_close(ours, expected)


@pytest.mark.parametrize("steps", [10, 20])
def test_plms_equals_diffusers_pndm(eps_model, schedule, noise, steps):
    ref = PNDMScheduler(**SD, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    ref.set_timesteps(steps)
    assert_close(sample("plms", eps_model, schedule, noise, steps), drive(ref, eps_model, noise))


def test_dpm_solver_equals_diffusers_dpmsolver_plus_plus_2m(eps_model, schedule, noise):
    # Our grid, get_sigmas(10), sits on t = 999, 888, ..., 111, 0 and then sigma 0. diffusers reaches it with
    # custom integer timesteps and final_sigmas_type="zero" (which forces the first-order final step); none of
    # its timestep_spacing options gives it: "linspace" with K steps walks linspace(999, 0, K + 1) minus t=0.
    ref = DPMSolverMultistepScheduler(
        **SD, algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True, final_sigmas_type="zero",
        use_karras_sigmas=False,
    )
    ref.set_timesteps(timesteps=list(range(999, -1, -111)))
    # diffusers works on x_t = alpha x0 + sigma_vp eps; the k-diffusion start sigma_max * noise is, in that
    # form, noise / sqrt(1 + 1 / sigma_max^2) (diffusers itself would start at exactly `noise`).
    sigma_max = schedule.get_sigmas(10)[0].item()
    start = noise * sigma_max / (1 + sigma_max**2) ** 0.5
    ours = sample("dpm_solver", eps_model, schedule, noise, 10, schedule_type="uniform")  # its grid before Karras
    assert_close(ours, drive(ref, eps_model, start))


@pytest.mark.parametrize(
    "name, scheduler",
    [("euler", EulerDiscreteScheduler), ("heun", HeunDiscreteScheduler), ("dpm2", KDPM2DiscreteScheduler),
     ("lms", LMSDiscreteScheduler)],
)
def test_k_samplers_equal_diffusers(eps_model, schedule, noise, name, scheduler):
    # timestep_spacing="linspace" is k-diffusion's linspace(999, 0, n); with n = 10 the timesteps are integers,
    # so diffusers' linear-in-sigma interpolation gives the same sigmas as the log-sigma one.
    ref = scheduler(**SD, timestep_spacing="linspace")
    ref.set_timesteps(10)
    assert_close(on_the_plain_grid(name, eps_model, schedule, noise, 10), drive(ref, eps_model, noise * ref.init_noise_sigma))


def on_the_plain_grid(name, eps_model, schedule, noise, steps, noise_sampler=None):
    """The sampler's function over k-diffusion's ``get_sigmas(steps)`` (what diffusers walks): ``dpm2`` and
    ``dpm2_a`` themselves walk the webui's grid (tests/test_dpm2_webui_grid.py holds them to k-diffusion)."""
    spec = SAMPLERS[name]
    levels = SIGMAS.levels(schedule, steps)
    options = dict(spec.options)
    if options.get("eta", 0) > 0:
        options["noise_sampler"] = noise_sampler
    return spec.function(ScheduledEps(eps_model, schedule), SIGMAS.start(noise, levels[0]), levels, **options)


def test_euler_equals_diffusers_on_fractional_timesteps(eps_model, schedule, noise):
    ref = EulerDiscreteScheduler(**SD)
    ref.set_timesteps(sigmas=schedule.get_sigmas(25).tolist())
    assert_close(sample("euler", eps_model, schedule, noise, 25), drive(ref, eps_model, noise * ref.sigmas[0]))


@pytest.mark.parametrize(
    "name, scheduler", [("euler_a", EulerAncestralDiscreteScheduler), ("dpm2_a", KDPM2AncestralDiscreteScheduler)]
)
def test_ancestral_samplers_equal_diffusers_given_the_same_noise(eps_model, schedule, noise, name, scheduler):
    ours = on_the_plain_grid(name, eps_model, schedule, noise, 10, noise_sampler=Recorder(7))
    ref = scheduler(**SD, timestep_spacing="linspace")
    ref.set_timesteps(10)
    generator = torch.Generator().manual_seed(7)
    expected = drive(ref, eps_model, noise * ref.init_noise_sigma, step_kwargs=lambda i: dict(generator=generator))
    assert_close(ours, expected)


def test_img2img_equals_diffusers(eps_model, schedule, noise):
    init = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(3))
    steps, strength = 10, 0.6
    t_start = steps - int(steps * strength)  # diffusers' img2img pipeline
    ddim = DDIMScheduler(**SD, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    ddim.set_timesteps(steps)
    timesteps = ddim.timesteps[t_start:]
    expected = drive(ddim, eps_model, ddim.add_noise(init, noise, timesteps[:1]), timesteps)
    ours = sample("ddim", eps_model, schedule, noise, steps, init_latent=init, strength=strength)
    assert_close(ours, expected)

    euler = EulerDiscreteScheduler(**SD, timestep_spacing="linspace")
    euler.set_timesteps(steps)
    euler.set_begin_index(t_start)
    timesteps = euler.timesteps[t_start:]
    expected = drive(euler, eps_model, euler.add_noise(init, noise, timesteps[:1]), timesteps)
    ours = sample("euler", eps_model, schedule, noise, steps, init_latent=init, strength=strength)
    assert_close(ours, expected)


def test_lms_coefficients_are_the_integrated_lagrange_basis():
    sigmas = [14.6, 7.8, 4.6, 2.9, 1.9, 0.0]
    # First order: the whole step.
    assert lms_coefficients(sigmas, 0, 1) == pytest.approx([sigmas[1] - sigmas[0]])
    # The weights of any order integrate the constant 1 exactly, and t exactly from order 2 on.
    for i, order in [(1, 2), (2, 3), (4, 4)]:
        w = lms_coefficients(sigmas, i, order)
        nodes = [sigmas[i - k] for k in range(order)]
        assert sum(w) == pytest.approx(sigmas[i + 1] - sigmas[i])
        assert sum(wj * n for wj, n in zip(w, nodes)) == pytest.approx((sigmas[i + 1] ** 2 - sigmas[i] ** 2) / 2)
    with pytest.raises(ValueError):
        lms_coefficients(sigmas, 1, 3)


# ---- determinism, seeds, batches -------------------------------------------------------------------------


@pytest.mark.parametrize("name, eta", [("euler_a", 0.0), ("dpm2_a", 0.0), ("ddim", 1.0)])
def test_ancestral_samplers_are_deterministic_for_a_seed(eps_model, schedule, name, eta):
    def run(seeds):
        noise = SeededNoise(seeds)
        return sample(name, eps_model, schedule, noise.initial(SHAPE), 6, eta=eta, noise_sampler=noise)

    first = run([1, 2])
    assert torch.equal(first, run([1, 2]))
    # Different fresh noise alone (same start) changes the result too.
    noise = SeededNoise([1, 2])
    other = sample(name, eps_model, schedule, noise.initial(SHAPE), 6, eta=eta, noise_sampler=SeededNoise([3, 4]))
    assert (first - other).abs().max() > 1e-2
    assert (first - run([3, 4])).abs().max() > 1e-2


def test_seeded_noise_draws_per_image():
    batch = SeededNoise([3, 5])
    start = batch.initial(SHAPE, dtype=torch.float64)
    assert start.shape == (2, *SHAPE) and start.dtype == torch.float64
    assert torch.equal(start[1:].float(), torch.randn((1, *SHAPE), generator=torch.Generator().manual_seed(5)))
    nxt = batch(start)
    assert nxt.dtype == torch.float64 and not torch.equal(nxt, start)
    single = SeededNoise([5])
    single.initial(SHAPE)
    assert torch.equal(nxt[1:], single(start[1:]))
    with pytest.raises(ValueError, match="3 asked from 2 seeds"):
        batch(torch.zeros(3, *SHAPE))


@pytest.mark.parametrize("name", ["ddim", "euler_a"])
def test_image_k_of_a_batch_equals_a_single_run_with_seed_k(unet, cond, schedule, name):
    seeds = [3, 5]
    eta = 1.0 if name == "ddim" else 0.0

    def run(idx):
        noise = SeededNoise([seeds[k] for k in idx])
        eps_model = GuidedDenoiser(unet, cond[0][idx], cond[1][idx], scale=7.5)
        return sample(name, eps_model, schedule, noise.initial(SHAPE), 5, eta=eta, noise_sampler=noise)

    batch = run([0, 1])
    for k in range(2):
        assert_close(batch[k : k + 1], run([k]), tol=1e-5)


# ---- guidance --------------------------------------------------------------------------------------------


def test_batched_and_sequential_guidance_agree(unet, cond, schedule, noise):
    batched = GuidedDenoiser(unet, cond[0], cond[1], scale=7.5)
    sequential = GuidedDenoiser(unet, cond[0], cond[1], scale=7.5, batched=False)
    t = torch.tensor([500.0, 500.0])
    assert_close(batched(noise, t), sequential(noise, t), tol=1e-5)
    run = lambda eps_model: sample("dpm_solver", eps_model, schedule, noise, 8)  # noqa: E731
    assert_close(run(batched), run(sequential), tol=1e-5)


def test_guidance_formula_and_call_pattern():
    calls = []

    def toy_unet(x, t, context):
        calls.append(x.shape[0])
        return x * context.mean(dim=(1, 2)).view(-1, 1, 1, 1) + t.view(-1, 1, 1, 1)

    x, t = torch.ones(2, *SHAPE), torch.tensor([10.0, 10.0])
    cond, uncond = torch.full((2, 77, 32), 3.0), torch.full((2, 77, 32), 1.0)
    eps = GuidedDenoiser(toy_unet, cond, uncond, scale=7.5)(x, t)
    torch.testing.assert_close(eps, torch.full_like(x, 11.0 + 7.5 * (13.0 - 11.0)))
    assert calls == [4]
    calls.clear()
    assert torch.equal(GuidedDenoiser(toy_unet, cond, uncond, scale=7.5, batched=False)(x, t), eps)
    assert calls == [2, 2]
    calls.clear()
    # Scale 1 is eps_cond: one pass, no uncond needed.
    torch.testing.assert_close(GuidedDenoiser(toy_unet, cond, None, scale=1.0)(x, t), torch.full_like(x, 13.0))
    assert calls == [2]
    with pytest.raises(ValueError, match="unconditional"):
        GuidedDenoiser(toy_unet, cond, None, scale=7.5)


def test_guidance_runs_the_unet_in_the_conditioning_dtype():
    seen = []

    def toy_unet(x, t, context):
        seen.append(x.dtype)
        return x * 2

    guided = GuidedDenoiser(toy_unet, torch.zeros(1, 77, 8, dtype=torch.float64), scale=1.0)
    eps = guided(torch.ones(1, *SHAPE), torch.zeros(1))
    assert seen == [torch.float64] and eps.dtype == torch.float32


# ---- img2img, progress, interruption, errors ---------------------------------------------------------------


@pytest.fixture(scope="module")
def init_latent():
    return torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(4))


@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_img2img_runs_int_strength_times_steps(eps_model, schedule, noise, init_latent, name):
    seen = []
    callback = lambda step, total, x: seen.append((step, total))  # noqa: E731
    ns = SeededNoise([1, 2])
    out = sample(name, eps_model, schedule, noise, 10, init_latent=init_latent, strength=0.35, noise_sampler=ns,
                 callback=callback)
    record = SAMPLERS[name]  # dpm_fast spends its 3 model calls in 2 steps
    walk = [0.0] * 4 if record.step_levels is None else record.step_levels(walk_levels(name, schedule, 10, 0.35))
    if record.adaptive:  # its steps are not known in advance: total 0
        assert seen == [(i, 0) for i in range(len(seen))] and seen
    else:
        assert seen == [(i, len(walk) - 1) for i in range(len(walk) - 1)]
    again = sample(name, eps_model, schedule, noise, 10, init_latent=init_latent, strength=0.35,
                   noise_sampler=SeededNoise([1, 2]))
    assert torch.equal(out, again)
    assert not torch.allclose(out, init_latent, atol=1e-3)


@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_img2img_strength_0_returns_the_init_latent_and_1_is_txt2img(eps_model, schedule, noise, init_latent, name):
    calls = []
    counting = lambda x, t: calls.append(1) or eps_model(x, t)  # noqa: E731
    assert torch.equal(sample(name, counting, schedule, noise, 10, init_latent=init_latent, strength=0.0), init_latent)
    assert torch.equal(sample(name, counting, schedule, noise, 10, init_latent=init_latent, strength=0.05), init_latent)
    assert calls == []
    full = sample(name, eps_model, schedule, noise, 10, init_latent=init_latent, strength=1.0)
    assert torch.equal(full, sample(name, eps_model, schedule, noise, 10))


def test_txt2img_reports_every_step_and_ddim_walks_compvis_timesteps(schedule, noise):
    timesteps, seen = [], []
    eps_model = lambda x, t: timesteps.append(t[0].item()) or torch.zeros_like(x)  # noqa: E731
    sample("ddim", eps_model, schedule, noise, 6, callback=lambda step, total, x: seen.append((step, total)))
    assert timesteps == [997, 831, 665, 499, 333, 167, 1]
    assert seen == [(i, 7) for i in range(7)]


def test_a_raising_callback_stops_the_run(eps_model, schedule, noise):
    calls = []

    def callback(step, total, x):
        if step == 2:
            raise KeyboardInterrupt

    counting = lambda x, t: calls.append(1) or eps_model(x, t)  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        sample("euler", counting, schedule, noise, 10, callback=callback)
    assert len(calls) == 3


def test_sample_rejects_bad_arguments(eps_model, schedule, noise):
    with pytest.raises(ValueError, match="ddim, plms, unipc, dpmpp_2m, euler, euler_a, heun, dpm2, dpm2_a, lms"):
        sample("k_euler_x", eps_model, schedule, noise, 10)
    with pytest.raises(ValueError, match="eta"):
        sample("plms", eps_model, schedule, noise, 10, eta=0.5)
    with pytest.raises(ValueError, match="strength"):
        sample("ddim", eps_model, schedule, noise, 10, init_latent=noise, strength=1.5)
    with pytest.raises(ValueError, match="init_latent"):
        sample("ddim", eps_model, schedule, noise, 10, strength=0.5)


def test_the_dispatch_table_covers_the_public_names():
    assert SAMPLER_NAMES == ("ddim", "plms", "unipc", "dpmpp_2m", "euler", "euler_a", "heun", "dpm2", "dpm2_a", "lms",
                             "dpmpp_2s_a", "dpm_fast", "dpm_adaptive", "restart", "dpmpp_sde", "dpmpp_2m_sde",
                             "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "lcm")
    assert tuple(SAMPLERS) == SAMPLER_NAMES
