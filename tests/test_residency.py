"""The memory modes (ldm/memory/residency.py): same numbers in every mode, and the residency protocol observed.

The protocol tests run on the CPU with ``track_cpu_copies=True``: every onload makes a real, separate copy
of the weights, so a tensor is "on the device" exactly when its storage is not its home (CPU) storage. The
tests look at that from outside the manager, through forward pre-hooks registered by the test itself.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from ldm import samplers
from ldm.config import load_model_config
from ldm.samplers.guidance import GuidedDenoiser
from ldm.loading.stable_diffusion import load_stable_diffusion
from ldm.samplers.noise import SeededNoise
from ldm.memory.estimates import model_bytes
from ldm.memory.mode_choice import auto_budget_bytes, resolve_mode, streaming_window_bytes
from ldm.memory.module_groups import pin_together
from ldm.memory.out_of_memory import is_out_of_memory
from ldm.memory.residency import MODES, Residency, next_lower_mode, unet_parts
from ldm.memory.streaming import plan_streaming, unet_group_layout
from ldm.models.unet import UNetModel


@pytest.fixture()
def sd(tiny_checkpoint, tiny_config):
    return load_stable_diffusion(tiny_checkpoint, tiny_config)


def unet_inputs(sd, batch=2, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, size, size, generator=g)
    t = torch.tensor([981.0, 3.5])[:batch]
    context = torch.randn(batch, 77, sd.config.unet.context_dim, generator=g)
    return x, t, context


def group_sizes(residency):
    return [g.nbytes for g in residency.unet_groups]


# (mode, budget as a function of the group sizes)
LOW_VARIANTS = [
    ("low", lambda s: None),
    ("low", lambda s: sorted(s)[-1]),  # largest group only: no prefetch
    ("low", lambda s: sum(sorted(s)[-2:]) + s[0] + s[-1]),  # window + a few resident groups
    ("low", lambda s: sum(s)),  # everything fits: all resident
]
VARIANTS = [("full", lambda s: None), ("medium", lambda s: None)] + LOW_VARIANTS


def make_residency(sd, mode, budget_fn, **kwargs):
    probe = Residency(sd, "cpu", "full")
    budget = budget_fn(group_sizes(probe))
    return Residency(sd, "cpu", mode, budget, **kwargs)


# ---- same numbers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("mode,budget_fn", VARIANTS)
def test_unet_output_identical_in_every_mode(sd, mode, budget_fn, track):
    x, t, context = unet_inputs(sd)
    with torch.no_grad():
        expected = sd.unet(x, t, context)
    residency = make_residency(sd, mode, budget_fn, track_cpu_copies=track)
    with residency.use("unet") as unet:
        for _ in range(2):  # the second call runs on the state the first left (resident groups, prefetch)
            assert torch.equal(unet(x, t, context), expected)
    residency.release()
    assert residency.on_device() == []


def run_pipeline(sd, residency, steps=4, sampler="ddim"):
    """Text encoder -> guided sampler -> VAE decode, as the generation loop calls them."""
    with residency.use("text_encoder") as text_encoder:
        cond = text_encoder.encode(["a red cube", "a blue ball"])
        uncond = text_encoder.encode(["", ""])
    noise = SeededNoise([7, 8])
    x_T = noise.initial((4, 8, 8))
    schedule = sd.schedule
    with residency.use("unet") as unet, torch.no_grad():
        latents = samplers.sample(sampler, GuidedDenoiser(unet, cond, uncond, 7.5), schedule, x_T, steps)
    with residency.use("vae.decoder") as vae, torch.no_grad():
        images = vae.decode(latents / sd.scale_factor)
    residency.release()
    return latents, images


@pytest.mark.parametrize("mode,budget_fn", VARIANTS[1:])
def test_final_latents_and_images_identical_to_full(sd, mode, budget_fn):
    ref_latents, ref_images = run_pipeline(sd, Residency(sd, "cpu", "full", track_cpu_copies=True))
    latents, images = run_pipeline(sd, make_residency(sd, mode, budget_fn, track_cpu_copies=True))
    assert torch.equal(latents, ref_latents)
    assert torch.equal(images, ref_images)


# ---- the protocol, observed -------------------------------------------------------------------------------
class DeviceWatch:
    """What is on the stand-in device: tensors whose storage is not the home storage seen at the start."""

    def __init__(self, sd):
        self.models = {"text_encoder": sd.text_encoder, "unet": sd.unet, "vae": sd.vae}
        self.home = {
            id(t): t.data_ptr() for m in self.models.values() for t in list(m.parameters()) + list(m.buffers())
        }

    @staticmethod
    def tensors(module):
        return list(module.parameters()) + list(module.buffers())

    def on_device(self, module) -> list[bool]:
        return [t.data_ptr() != self.home[id(t)] for t in self.tensors(module)]

    def device_bytes(self, module) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors(module) if t.data_ptr() != self.home[id(t)])

    def nothing_on_device(self) -> bool:
        return not any(any(self.on_device(m)) for m in self.models.values())


def test_low_mode_protocol_budget_order_and_cleanup(sd):
    probe = Residency(sd, "cpu", "full")
    sizes = group_sizes(probe)
    budget = sum(sorted(sizes)[-2:]) + sizes[-1]  # the streaming window + room for one more group
    events = []
    residency = Residency(sd, "cpu", "low", budget, track_cpu_copies=True, on_transfer=events.append)
    watch = DeviceWatch(sd)
    assert watch.nothing_on_device()
    layout = unet_group_layout(sd.unet)
    group_names = ["unet." + "+".join(names) for names in layout]
    resident = {group_names[i] for i in residency.plan.resident}
    assert resident, "the budget should leave room for a resident group"

    peaks, ran = [], []

    def check(name):
        def hook(module, args):
            ran.append(name)
            # The part about to run is entirely on the device, and so is nothing outside the UNet.
            assert all(watch.on_device(module)), name
            assert not any(watch.on_device(sd.text_encoder)) and not any(watch.on_device(sd.vae))
            peaks.append(watch.device_bytes(sd.unet))

        return hook

    handles = [module.register_forward_pre_hook(check(name)) for name, module in unet_parts(sd.unet)]
    x, t, context = unet_inputs(sd)
    steps = 3
    try:
        with residency.use("unet") as unet:
            for _ in range(steps):
                unet(x, t, context)
    finally:
        for handle in handles:
            handle.remove()
    residency.release()

    assert len(ran) == steps * len(unet_parts(sd.unet))
    assert max(peaks) <= budget
    # The log agrees with what was observed: bytes on the device never exceeded the budget either.
    on, worst = 0, 0
    for event, _, nbytes in events:
        on += nbytes if event == "onload" else -nbytes
        worst = max(worst, on)
    assert worst <= budget and on == 0
    # Streamed groups arrive in execution order at every step; resident ones arrive once.
    onloads = [group for event, group, _ in events if event == "onload"]
    streamed = [g for g in group_names if g not in resident]
    assert [g for g in onloads if g in resident] == sorted(resident, key=group_names.index)
    streamed_onloads = [g for g in onloads if g not in resident]
    # Prefetch wraps: the first streamed group of step k+1 is copied during step k's last group.
    assert streamed_onloads == streamed * steps + streamed[:1]
    # Nothing is left on the device, and every tensor is back on its home storage.
    assert watch.nothing_on_device()
    assert residency.on_device() == [] and residency.resident_bytes == 0


def test_low_mode_without_budget_keeps_two_groups_at_most(sd):
    events = []
    residency = Residency(sd, "cpu", "low", track_cpu_copies=True, on_transfer=events.append)
    sizes = group_sizes(residency)
    with residency.use("unet") as unet:
        unet(*unet_inputs(sd))
    residency.release()
    on, worst, live, most_live = 0, 0, set(), 0
    for event, group, nbytes in events:
        on += nbytes if event == "onload" else -nbytes
        live = live | {group} if event == "onload" else live - {group}
        worst, most_live = max(worst, on), max(most_live, len(live))
    assert most_live == 2 and worst <= sum(sorted(sizes)[-2:])
    assert not live


def test_unet_bs_chunks_inside_one_streamed_pass(sd):
    """``--unet_bs 1`` in low mode: the same numbers as calling the streamed UNet once per chunk, with the
    weights streamed once per call instead of once per chunk."""
    x, t, context = unet_inputs(sd)
    events = []
    residency = Residency(sd, "cpu", "low", track_cpu_copies=True, on_transfer=events.append)
    passes = {}
    with residency.use("unet") as unet:
        before = len(events)
        per_chunk = torch.cat([unet(x[i : i + 1], t[i : i + 1], context[i : i + 1]) for i in range(2)])
        passes["call per chunk"] = sum(e.event == "onload" for e in events[before:])
        before = len(events)
        chunked = unet(x, t, context, 1)
        passes["chunk argument"] = sum(e.event == "onload" for e in events[before:])
    residency.release()
    torch.testing.assert_close(chunked, per_chunk, rtol=0, atol=0)
    groups = len(unet_group_layout(sd.unet))
    # A pass copies every group once (the first group of the next pass is prefetched at the end of the
    # last one); the first pass of all also copies its own first group.
    assert passes == {"call per chunk": 2 * groups + 1, "chunk argument": groups}, passes
    assert residency.on_device() == []


def test_medium_mode_one_model_at_a_time_unet_kept_for_all_steps(sd):
    events = []
    residency = Residency(sd, "cpu", "medium", track_cpu_copies=True, on_transfer=events.append)
    watch = DeviceWatch(sd)
    calls = []

    def check(module, args):
        calls.append(1)
        assert all(watch.on_device(sd.unet))
        assert not any(watch.on_device(sd.text_encoder)) and not any(watch.on_device(sd.vae))

    handle = sd.unet.register_forward_pre_hook(check)
    try:
        run_pipeline(sd, residency, steps=4)
        run_pipeline(sd, residency, steps=4)  # a second batch
    finally:
        handle.remove()
    assert len(calls) == 8  # 4 steps x 2 batches
    onloads = [group for event, group, _ in events if event == "onload"]
    assert onloads == ["text_encoder", "unet", "vae.decoder"] * 2  # the UNet once per batch, not per step
    on = set()
    for event, group, _ in events:
        on = on | {group} if event == "onload" else on - {group}
        assert len(on) <= 1
    assert watch.nothing_on_device()


def test_full_mode_loads_each_model_once(sd):
    events = []
    residency = Residency(sd, "cpu", "full", track_cpu_copies=True, on_transfer=events.append)
    watch = DeviceWatch(sd)
    with residency.use("text_encoder"):
        pass
    with residency.use("unet"), residency.use("vae"):
        assert all(watch.on_device(sd.text_encoder)) and all(watch.on_device(sd.unet)) and all(watch.on_device(sd.vae))
    with residency.use("unet"), residency.use("vae.decoder"):
        pass
    assert [e.event for e in events] == ["onload"] * 4  # the VAE is two groups: encoder and decoder
    residency.release()
    assert [e.group for e in events if e.event == "offload"] == ["text_encoder", "unet", "vae.encoder", "vae.decoder"]
    assert watch.nothing_on_device()


def test_release_after_an_error_mid_step_leaves_nothing(sd):
    residency = Residency(sd, "cpu", "low", track_cpu_copies=True)
    watch = DeviceWatch(sd)
    x, t, context = unet_inputs(sd)
    with pytest.raises(RuntimeError):
        with residency.use("unet") as unet:
            unet(x, t, context[:, :, :-1])  # wrong context width: fails inside the first transformer
    residency.release()
    assert watch.nothing_on_device()


def test_an_onload_that_fails_halfway_leaves_nothing_on_the_device(sd, monkeypatch):
    residency = Residency(sd, "cpu", "medium", track_cpu_copies=True)
    watch = DeviceWatch(sd)
    real_clone, calls = torch.Tensor.clone, {"n": 0}

    def clone_until_memory_runs_out(tensor, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return real_clone(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", clone_until_memory_runs_out)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        with residency.use("unet"):
            pass
    monkeypatch.setattr(torch.Tensor, "clone", real_clone)
    assert calls["n"] == 5  # four tensors had been copied when the fifth failed
    assert watch.nothing_on_device()
    assert residency.on_device() == [] and residency.resident_bytes == 0
    with residency.use("unet"):  # and the manager still works
        assert all(watch.on_device(sd.unet))


def test_prefetch_starts_after_the_running_group_is_queued(sd):
    """The next group is copied while the current one computes: its copy is issued after the current
    group's kernels (here: its forward) and before the current group is offloaded."""
    log = []
    residency = Residency(sd, "cpu", "low", track_cpu_copies=True,
                          on_transfer=lambda e: log.append((e.event, e.group)))
    names = ["unet." + "+".join(group) for group in unet_group_layout(sd.unet)]
    first_part = {group[0]: i for i, group in enumerate(unet_group_layout(sd.unet))}
    handles = [module.register_forward_hook(lambda m, a, o, name=name: log.append(("ran", name)))
               for name, module in unet_parts(sd.unet) if name in first_part]
    try:
        with residency.use("unet") as unet:
            unet(*unet_inputs(sd))
    finally:
        for handle in handles:
            handle.remove()
    by_part = {part: names[i] for part, i in first_part.items()}
    ran = [(event, by_part[name]) if event == "ran" else (event, name) for event, name in log]
    for i, group in enumerate(names[:-1]):
        done = ran.index(("ran", group))
        prefetched = ran.index(("onload", names[i + 1]))
        offloaded = ran.index(("offload", group))
        assert done < prefetched < offloaded, (group, ran[max(done - 2, 0): offloaded + 2])


def all_tensors(sd):
    return list({id(t): t for m in (sd.text_encoder, sd.unet, sd.vae) for t in list(m.parameters()) + list(m.buffers())}.values())


def test_pinning_moves_every_home_into_pinned_slabs_in_medium_and_low_only(sd, monkeypatch):
    import ldm.memory.module_groups as module_groups

    buffers = []
    residency = None

    def plain_buffer(nbytes):  # page-locked memory needs CUDA; the packing is the same
        # No group may still hold the old storage while tensors move, or it could not be freed.
        assert all(group.home == [] for group in residency.groups())
        buffers.append(torch.empty(nbytes, dtype=torch.uint8))
        return buffers[-1]

    monkeypatch.setattr(module_groups, "pinned_buffer", plain_buffer)
    x, t, context = unet_inputs(sd)
    with torch.no_grad():
        expected = sd.unet(x, t, context)
    residency = Residency(sd, "cpu", "full", track_cpu_copies=True, pin=True)
    assert buffers == []  # full mode copies each model once: no pinned copy
    residency.set_mode("low")
    (buffer,) = buffers  # the tiny models fit one slab
    start, end = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
    for group in residency.groups():  # every group's home is in the slab
        assert all(start <= h.data_ptr() and h.data_ptr() + h.numel() * h.element_size() <= end for h in group.home)
    watch = DeviceWatch(sd)  # homes are the slab now: onloads copy out of it and offloads come back to it
    with residency.use("unet") as unet:
        out = unet(x, t, context)
    residency.set_mode("medium")
    with residency.use("unet") as unet:
        assert all(watch.on_device(sd.unet))
        torch.testing.assert_close(unet(x, t, context), expected, rtol=0, atol=0)
    residency.release()
    assert watch.nothing_on_device() and len(buffers) == 1  # pinned once
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_pin_together_packs_tensors_into_power_of_two_slabs():
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(200, generator=g), torch.randn(3, 5, generator=g).t(), torch.tensor(2.5),
               torch.zeros(0), torch.arange(7), torch.randn(40, generator=g).half(), torch.ones(3, dtype=torch.bool),
               torch.randn(200, generator=g), torch.randn(200, generator=g),
               torch.randn(700, generator=g)]  # 2800 bytes: larger than a slab, gets a 4096-byte one
    values = [t.clone() for t in tensors]
    slabs = []

    def allocate(nbytes):
        slabs.append(torch.empty(nbytes, dtype=torch.uint8))
        return slabs[-1]

    allocated = pin_together(tensors, allocate, slab_bytes=1024)
    # Largest first, each into the first slab with room: 2800 + 800 + the small ones share the 4096-byte
    # slab; the other two 800-byte tensors get a 1024-byte slab each.
    assert sorted(s.numel() for s in slabs) == [1024, 1024, 4096] and allocated == 6144
    for tensor, value in zip(tensors, values):
        assert torch.equal(tensor, value) and tensor.dtype == value.dtype and tensor.shape == value.shape
        if tensor.numel():  # an empty tensor has no address
            assert any(s.data_ptr() <= tensor.data_ptr() < s.data_ptr() + s.numel() for s in slabs)
            assert tensor.data_ptr() % 64 == 0


def test_a_host_that_cannot_pin_keeps_pageable_copies(sd, monkeypatch, caplog):
    import ldm.memory.module_groups as module_groups

    calls = []

    def refused(nbytes):
        calls.append(nbytes)
        if len(calls) > 1:  # the first slab is granted, the second refused: some weights moved, some not
            raise RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be reported later")
        return torch.empty(nbytes, dtype=torch.uint8)

    monkeypatch.setattr(module_groups, "pinned_buffer", refused)
    monkeypatch.setattr(module_groups, "PIN_SLAB_BYTES", 4096)
    x, t, context = unet_inputs(sd)
    with torch.no_grad():
        expected = sd.unet(x, t, context)
    residency = Residency(sd, "cpu", "full", track_cpu_copies=True, pin=True)
    with caplog.at_level("WARNING", logger="ldm.memory.residency"):
        residency.set_mode("low")
    assert len(calls) == 2 and not residency.pin
    assert any("could not pin host memory" in r.getMessage() for r in caplog.records)
    watch = DeviceWatch(sd)
    with residency.use("unet") as unet:
        torch.testing.assert_close(unet(x, t, context), expected, rtol=0, atol=0)
    residency.release()
    assert watch.nothing_on_device()
    residency.set_mode("medium")  # no second attempt
    assert len(calls) == 2


def test_cpu_device_without_tracking_moves_nothing(sd):
    watch = DeviceWatch(sd)
    residency = Residency(sd, "cpu", "medium")
    with residency.use("unet"):
        assert watch.nothing_on_device()


# ---- out of memory: going down ----------------------------------------------------------------------------
def test_next_lower_mode():
    assert [next_lower_mode(m) for m in MODES] == ["medium", "low", None]
    with pytest.raises(ValueError, match="unknown vram mode"):
        next_lower_mode("auto")


def test_is_out_of_memory():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(ValueError("out of memory"))


def test_step_down_walks_to_low_then_drops_the_budget(sd):
    residency = Residency(sd, "cpu", "full", track_cpu_copies=True)
    with residency.use("unet"):
        pass
    assert residency.step_down() and residency.mode == "medium" and residency.on_device() == []
    assert residency.step_down() and residency.mode == "low"
    residency.set_mode("low", sum(group_sizes(residency)))
    assert residency.step_down() and residency.mode == "low" and residency.budget_bytes is None
    assert not residency.step_down()


def test_bad_arguments(sd):
    with pytest.raises(ValueError, match="unknown vram mode"):
        Residency(sd, "cpu", "auto")
    with pytest.raises(ValueError, match="smaller than the largest UNet group"):
        Residency(sd, "cpu", "low", budget_bytes=16)
    with pytest.raises(ValueError, match="unknown model"):
        with Residency(sd, "cpu").use("clip"):
            pass
    sd.vae.to("meta")  # a model already somewhere else: the manager cannot own its home copy
    with pytest.raises(ValueError, match="must be on the CPU"):
        Residency(sd, "cpu")


# ---- planning ---------------------------------------------------------------------------------------------
def test_plan_streaming():
    sizes = [10, 40, 30, 20, 50]
    assert plan_streaming(sizes, None).resident == frozenset() and plan_streaming(sizes, None).limit_bytes == 90
    everything = plan_streaming(sizes, 150)
    assert everything.resident == frozenset(range(5)) and not everything.prefetch
    no_prefetch = plan_streaming(sizes, 60)  # fits the largest group but not the two largest
    assert not no_prefetch.prefetch and no_prefetch.resident == frozenset({0})  # 60 - 50 = 10 left
    plan = plan_streaming(sizes, 135)  # window 90, 45 left: the 40 group, then nothing else fits
    assert plan.prefetch and plan.resident == frozenset({1}) and plan.limit_bytes == 130
    with pytest.raises(ValueError):
        plan_streaming(sizes, 49)


def test_group_layout_covers_the_unet_in_order(sd):
    names = [name for name, _ in unet_parts(sd.unet)]
    layout = unet_group_layout(sd.unet)
    assert [n for group in layout for n in group] == names
    assert len(layout) == len(names) - 2


# ---- choosing a mode --------------------------------------------------------------------------------------
def test_resolve_mode():
    assert resolve_mode("low", "cuda", 512, 512, 1) == "low"
    assert resolve_mode("auto", "cpu", 512, 512, 1) == "full"
    gib = 2**30
    assert resolve_mode("auto", "cuda", 512, 512, 1, free_bytes=24 * gib) == "full"
    assert resolve_mode("auto", "cuda", 512, 512, 1, free_bytes=4 * gib) == "medium"
    assert resolve_mode("auto", "cuda", 512, 512, 1, free_bytes=2 * gib) == "low"
    # Bigger images and batches need more memory: the choice never gets faster.
    order = {m: i for i, m in enumerate(MODES)}
    last = "full"
    for size, batch in ((512, 1), (512, 4), (768, 4), (1024, 8)):
        mode = resolve_mode("auto", "cuda", size, size, batch, free_bytes=6 * gib)
        assert order[mode] >= order[last]
        last = mode
    assert last == "low"
    # A large image decoded in tiles needs a tile's VAE memory, not the whole image's.
    assert resolve_mode("auto", "cuda", 1536, 1536, 1, free_bytes=12 * gib) == "medium"
    assert resolve_mode("auto", "cuda", 1536, 1536, 1, free_bytes=12 * gib, tiled=True) == "full"
    with pytest.raises(ValueError):
        resolve_mode("turbo", "cpu", 512, 512, 1)


def test_model_bytes_and_auto_budget(sd):
    measured = model_bytes(sd)
    assert measured["unet"] == sum(p.numel() * 4 for p in sd.unet.parameters())
    assert model_bytes(None, torch.float16)["unet"] == 859_520_964 * 2
    assert auto_budget_bytes("cpu", 512, 512, 1) is None
    assert auto_budget_bytes("cuda", 512, 512, 1, free_bytes=2**30) is None
    assert auto_budget_bytes("cuda", 512, 512, 1, free_bytes=3 * 2**30) > 0
    # A budget too small for the streaming window would only switch prefetching off: none instead.
    window = streaming_window_bytes(None)
    with torch.device("meta"):  # the real SD v1 UNet's shapes, no memory
        sd_v1_unet = UNetModel(load_model_config().unet).half()
    measured = streaming_window_bytes(SimpleNamespace(unet=sd_v1_unet))
    assert abs(window - measured) < 0.02 * measured  # the estimate without a model is SD v1's window
    budgets = {free: auto_budget_bytes("cuda", 512, 512, 1, free_bytes=int(free * 2**30)) for free in (1.0, 1.2, 1.5, 2.0)}
    assert budgets[1.0] is None and budgets[1.2] is None  # 0.13 and 0.29 GiB would be below the window
    assert window < budgets[1.5] < budgets[2.0] < 2 * 2**30
    probe = Residency(sd, "cpu", "full")
    assert streaming_window_bytes(sd) == sum(sorted(group_sizes(probe))[-2:])


# ---- real device memory (CUDA only) -----------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_memory_low_below_medium_below_full(sd):
    device = torch.device("cuda")
    x, t, context = (v.to(device) for v in unet_inputs(sd))
    with torch.no_grad():
        expected = sd.unet(*(v.cpu() for v in (x, t, context)))
    peaks = {}
    for mode in MODES:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        residency = Residency(sd, device, mode)
        with residency.use("text_encoder") as text_encoder:
            text_encoder.encode(["a"])
        with residency.use("unet") as unet:
            for _ in range(2):
                out = unet(x, t, context)
        with residency.use("vae") as vae, torch.no_grad():
            vae.decode(torch.zeros(1, 4, 8, 8, device=device))
        residency.release()
        torch.cuda.synchronize()
        peaks[mode] = torch.cuda.max_memory_allocated(device) - base
        torch.testing.assert_close(out.cpu(), expected, rtol=1e-4, atol=1e-4)
        assert torch.cuda.memory_allocated(device) - base <= out.numel() * out.element_size()
        del out
    assert peaks["low"] < peaks["medium"] < peaks["full"], peaks


# ---- low mode's decode: the decoder streamed level by level -----------------------------------------------
def test_low_mode_decode_streams_the_decoder_one_level_at_a_time(sd):
    from ldm.memory.streaming import decoder_group_layout

    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = sd.vae.decode(z)
    events = []
    residency = Residency(sd, "cpu", "low", track_cpu_copies=True, on_transfer=events.append)
    watch = DeviceWatch(sd)
    seen = []

    def check(module, args):
        # The encoder never comes; of the decoder, only the running part's group.
        assert not any(watch.on_device(sd.vae.encoder)) and not any(watch.on_device(sd.vae.quant_conv))
        assert all(watch.on_device(module))
        seen.append(watch.device_bytes(sd.vae))

    parts = dict(sd.vae.decoder_parts())
    handles = [module.register_forward_pre_hook(check) for module in parts.values()]
    try:
        with residency.use("vae.decoder") as vae, torch.no_grad():
            images = vae.decode(z)
    finally:
        for handle in handles:
            handle.remove()
    residency.release()
    assert torch.equal(images, expected)
    layout = decoder_group_layout(sd.vae)
    assert [e.group for e in events if e.event == "onload"] == ["vae." + "+".join(names) for names in layout]
    on = 0
    for event in events:  # one group at a time: no prefetch in a decode
        on += event.nbytes if event.event == "onload" else -event.nbytes
        assert on <= max(g.nbytes for g in residency.decoder_groups)
    assert len(seen) == len(parts) and watch.nothing_on_device()


def test_the_unet_runs_its_own_forward_through_the_part_hook(sd):
    x, t, context = unet_inputs(sd)
    calls = []

    def hook(name, module, *args):
        calls.append(name)
        return module(*args)

    with torch.no_grad():
        assert torch.equal(sd.unet(x, t, context, hook=hook), sd.unet(x, t, context))
    assert calls == [name for name, _ in unet_parts(sd.unet)]
