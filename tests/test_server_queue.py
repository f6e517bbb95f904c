"""The server's queue: one generation at a time, concurrent clients get the images they would get alone,
``/progress`` moves while a request runs, ``/interrupt`` and ``/skip`` stop it as the webui's do (the finished
images are answered), and SIGTERM ends the process with exit code 0 and nothing half-written."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import webuiapi
from PIL import Image

from tests.server_helpers import REPO, free_port, running_server, tiny_server_argv


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    with running_server(tiny_server_argv(tiny_checkpoint, "--no-watermark")) as running:
        yield running


def small(api: webuiapi.WebUIApi, prompt: str, seed: int, **extra) -> webuiapi.WebUIApiResult:
    return api.txt2img(prompt=prompt, seed=seed, steps=2, width=64, height=64, sampler_name="Euler a", **extra)


def test_three_concurrent_clients_get_what_they_get_alone(server):
    asks = [("a red car", 1), ("a green field", 2), ("a blue sea", 3)]
    alone = [np.asarray(small(webuiapi.WebUIApi(port=server.port), p, s).image) for p, s in asks]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda ask: small(webuiapi.WebUIApi(port=server.port), *ask), asks))
    for image, result, (prompt, seed) in zip(alone, together, asks):
        assert result.info["seed"] == seed and result.info["prompt"] == prompt
        assert np.array_equal(image, np.asarray(result.image))


def wait_for(condition, seconds: float = 120.0, what: str = "a state") -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def long_request(url: str, answers: list, **fields) -> threading.Thread:
    body = {"prompt": "a long walk", "seed": 40, "steps": 40, "width": 64, "height": 64, "sampler_name": "Euler",
            **fields}
    thread = threading.Thread(target=lambda: answers.append(requests.post(f"{url}/sdapi/v1/txt2img", json=body,
                                                                           timeout=600)))
    thread.start()
    return thread


def test_progress_moves_and_interrupt_returns_the_finished_images(server):
    url, answers, seen = server.url, [], []
    thread = long_request(url, answers, n_iter=3)

    def first_batch_done() -> bool:
        seen.append(requests.get(f"{url}/sdapi/v1/progress", timeout=10).json())
        without = requests.get(f"{url}/sdapi/v1/progress", params={"skip_current_image": "true"}, timeout=10).json()
        assert without["current_image"] is None
        return seen[-1]["state"]["job_no"] >= 1 and seen[-1]["state"]["sampling_step"] >= 2

    wait_for(first_batch_done, what="the second batch")
    requests.post(f"{url}/sdapi/v1/interrupt", timeout=10)
    thread.join(120)
    fractions = [report["progress"] for report in seen if report["state"]["job"]]
    assert len(set(fractions)) >= 3 and fractions == sorted(fractions)  # it moved, forward
    assert all(0 < report["eta_relative"] for report in seen if report["progress"] > 0)
    assert seen[-1]["state"]["sampling_steps"] == 40 and seen[-1]["state"]["job_count"] == 3
    running = Image.open(io.BytesIO(base64.b64decode(seen[-1]["current_image"])))  # Approx cheap: 1/8 of the side
    assert running.size == (8, 8) and np.asarray(running).std() > 0
    answer = answers[0].json()
    assert answers[0].status_code == 200 and len(answer["images"]) == 1  # the first batch, not the grid
    assert "Seed: 40," in json.loads(answer["info"])["infotexts"][0]
    idle = requests.get(f"{url}/sdapi/v1/progress", timeout=10).json()
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0


def test_skip_stops_the_batch_under_way_and_goes_on(server):
    url, answers = server.url, []
    thread = long_request(url, answers, n_iter=2, steps=30)
    wait_for(lambda: requests.get(f"{url}/sdapi/v1/progress", timeout=10).json()["state"]["sampling_step"] >= 2,
             what="sampling")
    requests.post(f"{url}/sdapi/v1/skip", timeout=10)
    thread.join(300)
    answer = answers[0].json()
    texts = json.loads(answer["info"])["infotexts"]
    assert len(answer["images"]) == 1 and len(texts) == 1 and "Seed: 41," in texts[0]  # the second batch's


def test_sigterm_answers_the_running_request_and_exits_0(tiny_checkpoint, tmp_path):
    port = free_port()
    outdir = tmp_path / "saved"
    argv = [sys.executable, str(REPO / "optimizedSD" / "optimized_server.py"), "--port", str(port), "--save_images",
            "--outdir", str(outdir), *tiny_server_argv(tiny_checkpoint, "--no-watermark")]
    process = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    url, answers = f"http://127.0.0.1:{port}", []
    try:
        def ready() -> bool:
            assert process.poll() is None, process.stdout.read()
            try:
                return requests.get(f"{url}/sdapi/v1/progress", timeout=2).ok
            except requests.ConnectionError:
                return False

        wait_for(ready, what="the server to start")
        thread = long_request(url, answers, n_iter=3, steps=20)
        wait_for(lambda: requests.get(f"{url}/sdapi/v1/progress", timeout=10).json()["state"]["job_no"] >= 1,
                 what="the first image")
        process.send_signal(signal.SIGTERM)
        thread.join(120)
        assert process.wait(120) == 0
    finally:
        if process.poll() is None:
            process.kill()
    log = process.stdout.read()
    assert answers and answers[0].status_code == 200, log
    assert 1 <= len(answers[0].json()["images"]) <= 3 and "Traceback" not in log
    written = [p for p in outdir.rglob("*") if p.is_file()]
    assert written and all(p.name.startswith(("seed_", "grid")) and p.suffix == ".png" for p in written), written
    for path in written:
        with Image.open(path) as image:
            image.load()  # whole files only
