"""The server under load (slow suite): 200 small requests from 4 clients, every one answered with its image,
host memory after them within 10 % of what it was after the first 20, and no error in the log."""

from __future__ import annotations

import json
import logging
import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from optimizedSD.server.listings import process_rss
from tests.server_helpers import running_server, tiny_server_argv

REQUESTS, CLIENTS, WARM_UP = 200, 4, 20
SAMPLERS = ("Euler a", "Euler", "DDIM", "DPM++ 2M", "UniPC", "LMS")


def ask(url: str, k: int) -> tuple[int, int, int]:
    """Request ``k``: (status, images, the seed in its info)."""
    rng = random.Random(k)
    body = {"prompt": f"request {k}: a {rng.choice(['red', 'blue', 'green'])} (bird:1.1)", "seed": 1000 + k,
            "steps": rng.choice((1, 2)), "width": 64, "height": 64, "sampler_name": rng.choice(SAMPLERS),
            "batch_size": rng.choice((1, 1, 2)), "cfg_scale": rng.choice((1.0, 7.0))}
    answer = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=600)
    if answer.status_code != 200:
        return answer.status_code, 0, -1
    data = answer.json()
    images = len(data["images"]) - (1 if len(data["images"]) > 1 else 0)  # the grid apart
    return 200, images, json.loads(data["info"])["seed"]


@pytest.mark.slow  # about 2-4 minutes on 2 cores
def test_200_requests_from_4_clients(tiny_checkpoint, caplog):
    caplog.set_level(logging.WARNING)
    with running_server(tiny_server_argv(tiny_checkpoint, "--no-watermark")) as server:
        with ThreadPoolExecutor(CLIENTS) as pool:
            first = list(pool.map(lambda k: ask(server.url, k), range(WARM_UP)))
            after_warm_up = process_rss()
            rest = list(pool.map(lambda k: ask(server.url, k), range(WARM_UP, REQUESTS)))
        after = process_rss()
    answers = first + rest
    print(f"host RSS after {WARM_UP} requests {after_warm_up / 2**20:.0f} MiB, after {REQUESTS} {after / 2**20:.0f} MiB")
    assert [status for status, _, _ in answers] == [200] * REQUESTS
    assert [seed for _, _, seed in answers] == [1000 + k for k in range(REQUESTS)]
    assert all(images >= 1 for _, images, _ in answers)
    assert abs(after - after_warm_up) <= 0.10 * after_warm_up, (after_warm_up, after)
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert not errors, errors
