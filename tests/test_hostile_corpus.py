"""A corpus of hostile checkpoints and configs (built by tests/hostile_corpus.py, no binaries).

Each case must be refused in exactly one line, within 20 s and 1 GB of RSS, and no payload may create
its marker. The reader check runs every case in one child process (a crash there cannot take pytest
with it, and names its case); the command-line check runs cases exactly as a user would
(``optimizedSD/optimized_txt2img.py ... --device cpu``): a few in the default suite, and in the slow
suite every non-gadget case plus every gadget once (its protocol and container rotating; the full
gadget cross-product, which the reader check covers in-process, runs through the CLI with
``HOSTILE_CLI_ALL=1``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hostile_corpus  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "optimizedSD" / "optimized_txt2img.py"
MAX_SECONDS = 20
MAX_RSS_GROWTH = 2**30
WATCHDOG_SECONDS = 300  # wall-clock: only a hang gets near it, even on a loaded machine
CLI_SAMPLES = ("gadget_posix.system_p2_zip", "config_num_heads_0")  # each run imports torch: ~4 s


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    directory = tmp_path_factory.mktemp("hostile")
    cases = hostile_corpus.build_corpus(directory)
    manifest = directory / "manifest.jsonl"
    hostile_corpus.write_manifest(cases, manifest)
    return cases, manifest


def _check_in_child(manifest: Path, names: list[str]) -> dict[str, dict]:
    command = [sys.executable, str(Path(hostile_corpus.__file__)), "--check-manifest", str(manifest), *names]
    run = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=REPO)
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    started = [row["start"] for row in rows if "start" in row]
    results = {row["name"]: row for row in rows if "name" in row}
    crashed_in = [name for name in started if name not in results]
    assert run.returncode == 0 and not crashed_in, f"reader died in {crashed_in}: rc {run.returncode} {run.stderr[-2000:]}"
    return results


def _assert_refused_in_one_line(case, message: str, expect: str | None = None) -> None:
    expect = expect or case.expect
    assert message and "\n" not in message and "\r" not in message and "\x1b" not in message, (case.name, message)
    assert expect in message, (case.name, expect, message)


def _assert_reader_results(cases, results) -> None:
    failures = []
    for case in cases:
        row = results[case.name]
        if row["outcome"] != "refused":
            failures.append(f"{case.name}: {row['outcome']} {row['message'][:200]}")
            continue
        try:
            _assert_refused_in_one_line(case, row["message"])
        except AssertionError as error:
            failures.append(f"{case.name}: {error}")
        if row["seconds"] > MAX_SECONDS or row["rss_growth"] > MAX_RSS_GROWTH or row["marker_created"]:
            failures.append(f"{case.name}: {row['seconds']:.1f} s, +{row['rss_growth'] >> 20} MiB, marker {row['marker_created']}")
    assert not failures, "\n".join(failures)


def test_reader_refuses_every_fast_case_in_one_line(corpus):
    cases, manifest = corpus
    fast = [case for case in cases if not case.slow]
    assert len(fast) > 1000
    results = _check_in_child(manifest, ["--skip-slow"])
    _assert_reader_results(fast, results)


@pytest.mark.slow
def test_reader_refuses_the_slow_cases_in_one_line(corpus):
    cases, manifest = corpus
    slow = [case for case in cases if case.slow]
    _assert_reader_results(slow, _check_in_child(manifest, [case.name for case in slow]))


def test_the_payloads_are_live(corpus, tmp_path):
    """What the corpus guards against: an unrestricted torch.load runs these payloads."""
    cases, _ = corpus
    live = [case for case in cases if case.name in ("gadget_posix.system_p2_legacy", "gadget_builtins.exec_p4_zip")]
    assert len(live) == 2
    code = "import sys, torch\nfor path in sys.argv[1:]:\n    try:\n        torch.load(path, weights_only=False)\n" \
           "    except Exception:\n        pass\n"
    subprocess.run([sys.executable, "-c", code, *(case.path for case in live)], capture_output=True, timeout=300, cwd=tmp_path)
    for case in live:
        assert Path(case.marker).exists(), case.name
        Path(case.marker).unlink()


def test_picklescan_agrees_the_clean_file_is_clean_and_the_gadgets_are_not(corpus):
    picklescan = pytest.importorskip("picklescan.scanner")
    cases, manifest = corpus
    clean = manifest.parent / "clean_tiny.ckpt"
    assert picklescan.scan_file_path(str(clean)).infected_files == 0
    from ldm.checkpoints.reader import read_checkpoint

    assert read_checkpoint(clean)  # and we load it
    flagged = [case for case in cases if case.name.startswith("gadget_posix.system_p2")]
    assert flagged and all(picklescan.scan_file_path(case.path).infected_files == 1 for case in flagged)


# ---------------------------------------------------------------------------------------------------
# through the command line
# ---------------------------------------------------------------------------------------------------


def _cli(case, tmp: Path, clean: Path) -> tuple[int, str, float, int]:
    """Run the script on ``case`` as a user would; (exit code, stderr, CPU seconds, peak RSS in bytes).

    CPU seconds, not wall-clock: on a shared machine the wall-clock time of the same run varies 2x; a hang
    (which costs no CPU) is caught by the watchdog instead, which kills the run and fails the exit-code check."""
    checkpoint = case.path if case.flag == "--ckpt" else str(clean)
    config = case.path if case.flag == "--config" else str(hostile_corpus.TINY_CONFIG)
    argv = [sys.executable, str(SCRIPT), "--prompt", "a photo", "--ckpt", checkpoint, "--config", config,
            "--device", "cpu", "--outdir", str(tmp / "out"), "--H", "64", "--W", "64", "--ddim_steps", "1",
            "--n_samples", "1"]
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=tmp)
    exited, lock = threading.Event(), threading.Lock()
    watchdog = threading.Thread(target=_kill_after, args=(process.pid, exited, lock, WATCHDOG_SECONDS), daemon=True)
    watchdog.start()
    with process.stderr:
        stderr = process.stderr.read().decode("utf-8", "replace")
    os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: its pid cannot be reused yet
    with lock:
        exited.set()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    watchdog.join()
    return process.returncode, stderr, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024


def _kill_after(pid: int, exited: threading.Event, lock: threading.Lock, seconds: float) -> None:
    """SIGKILL ``pid`` unless it exits within ``seconds``. Never reaps it (``Popen.poll`` would, and the
    caller's ``wait4`` then fails with ECHILD: the slow test's two workers hit that race)."""
    if exited.wait(seconds):
        return
    with lock:
        if not exited.is_set():
            os.kill(pid, signal.SIGKILL)


def _baseline(tmp: Path, clean: Path) -> tuple[float, int]:
    """CPU seconds and peak RSS of a run refused at once (a missing file): Python, torch and the imports."""
    missing = hostile_corpus.Case("baseline", str(tmp / "missing.ckpt"), "--ckpt", "not found")
    code, stderr, seconds, rss = _cli(missing, tmp, clean)
    assert code == 2, stderr
    return seconds, rss


def _assert_cli_cases(cases, manifest: Path, tmp_path: Path, workers: int = 1) -> None:
    clean = manifest.parent / "clean_tiny.ckpt"
    # Limits count above the baseline: starting Python and importing torch and transformers is not the case's.
    base_seconds, base_rss = _baseline(tmp_path, clean)

    def run(case):
        work = tmp_path / case.name
        work.mkdir()
        return case, *_cli(case, work, clean)

    failures, worst_seconds, worst_rss = [], 0.0, 0
    with ThreadPoolExecutor(workers) as pool:
        for case, code, stderr, seconds, rss in pool.map(run, cases):
            worst_seconds, worst_rss = max(worst_seconds, seconds - base_seconds), max(worst_rss, rss - base_rss)
            lines = stderr.strip().splitlines()
            problems = []
            if code != 2 or len(lines) != 1 or "Traceback" in stderr:
                problems.append(f"exit {code}, stderr {stderr[-300:]!r}")
            else:
                try:
                    _assert_refused_in_one_line(case, lines[0], case.cli_expect)
                except AssertionError as error:
                    problems.append(str(error))
            if seconds - base_seconds > MAX_SECONDS or rss - base_rss > MAX_RSS_GROWTH:
                problems.append(f"{seconds:.1f} s, RSS {rss >> 20} MiB vs baseline {base_seconds:.1f} s, {base_rss >> 20} MiB")
            if case.marker and Path(case.marker).exists():
                problems.append("the payload ran")
            if problems:
                failures.append(f"{case.name}: {'; '.join(problems)}")
    print(f"{len(cases)} cases through the CLI: at most {worst_seconds:.1f} CPU s and {worst_rss / 2**20:+.0f} MiB RSS "
          f"above the baseline ({base_seconds:.1f} s, {base_rss / 2**20:.0f} MiB)")
    assert not failures, "\n".join(failures)


def test_cli_refuses_representative_cases_in_one_line(corpus, tmp_path):
    cases, manifest = corpus
    chosen = [case for case in cases if case.name in CLI_SAMPLES]
    assert len(chosen) == len(CLI_SAMPLES)
    _assert_cli_cases(chosen, manifest, tmp_path)


@pytest.mark.slow
def test_cli_refuses_the_whole_corpus_in_one_line(corpus, tmp_path):
    cases, manifest = corpus
    if os.environ.get("HOSTILE_CLI_ALL") == "1":
        chosen = cases
    else:
        seen: set[str] = set()
        chosen = []
        for index, case in enumerate(cases):
            if not case.name.startswith("gadget_"):
                chosen.append(case)
                continue
            gadget = case.name.rsplit("_p", 1)[0]
            rotation = ("_p0_legacy", "_p2_zip", "_p4_bare", "_p2_legacy", "_p4_zip")
            if gadget not in seen and case.name.endswith(rotation[len(seen) % len(rotation)]):
                seen.add(gadget)
                chosen.append(case)
    _assert_cli_cases(chosen, manifest, tmp_path, workers=2)
