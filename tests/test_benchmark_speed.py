"""scripts/benchmark.py's DeepCache / LCM + TAESD rows: the plan they add and the ratios computed from what ran."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
benchmark = sys.modules.get("benchmark") or importlib.util.module_from_spec(spec)
if "benchmark" not in sys.modules:
    sys.modules["benchmark"] = benchmark
    spec.loader.exec_module(benchmark)


def test_plan_adds_deepcache_per_step_and_lcm_rows():
    args = benchmark.parse(["--deepcache", "3", "--per_step", "--lcm_taesd", "/x/taesd", "--skip_diffusers"])
    plan = benchmark.build_plan(args)
    names = [benchmark.setup_name(s) for s in plan]
    assert [(n, s["steps"]) for n, s in zip(names, plan)] == [
        ("full", 10), ("full deepcache 3", 10), ("full lcm4 taesd", 10), ("full", 1), ("full deepcache 3", 1)]
    assert plan[2]["flags"] == ["--sampler", "lcm", "--ddim_steps", "4", "--scale", "1", "--vae", "/x/taesd"]


def test_speed_lines_from_measured_rows():
    args = benchmark.parse(["--deepcache", "3", "--per_step", "--lcm_taesd", "/x/taesd", "--skip_diffusers"])
    plan = benchmark.build_plan(args)
    generate = {("full", 10): 50.0, ("full deepcache 3", 10): 23.0, ("full lcm4 taesd", 10): 4.0, ("full", 1): 5.0,
                ("full deepcache 3", 1): 5.0}
    rows = [(s, {"generate_s": generate[(benchmark.setup_name(s), s["steps"])], "total_s": 1.0, "images": 1,
                 "peak_rss": 1, "cpu_s": 2 * generate[(benchmark.setup_name(s), s["steps"])]}) for s in plan]
    lines = benchmark.speed_lines(rows)
    assert "ours full deepcache 3 / plain, batch 1: 0.40x per step (CPU time) (target at most 0.60x): met" in lines
    assert "ours full deepcache 3 / plain, batch 1: 0.40x per step (target at most 0.60x): met" in lines
    assert "ours full lcm4 taesd / plain, batch 1: generate 0.08x (target at most 0.10x): met" in lines


def test_plan_with_openvino_and_lcm_converts_with_the_backends_flags_and_adds_lcm_on_openvino():
    args = benchmark.parse(["--backend", "openvino", "--backend_cache", "/x/cache", "--lcm_taesd", "/x/taesd",
                            "--per_step", "--skip_diffusers"])
    plan = benchmark.build_plan(args)
    names = [(benchmark.setup_name(s), s["steps"]) for s in plan]
    assert names == [("full openvino convert", 10), ("full", 10), ("full openvino", 10), ("full lcm4 taesd", 10),
                     ("full openvino lcm4 taesd", 10), ("full", 1), ("full openvino", 1)]
    openvino = ["--backend", "openvino", "--backend_cache", "/x/cache"]
    assert plan[0]["flags"] == openvino and plan[0]["fresh_cache"] == "/x/cache"
    assert plan[4]["flags"] == openvino + ["--sampler", "lcm", "--ddim_steps", "4", "--scale", "1", "--vae", "/x/taesd"]
    assert [benchmark.steps_run(spec) for spec in plan[3:5]] == [4, 4] and benchmark.steps_run(plan[1]) == 10
