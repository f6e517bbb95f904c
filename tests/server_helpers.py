"""Starting the HTTP server in tests: on 127.0.0.1 only, on a free port, always shut down (even when a test fails)."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from optimizedSD.server.flags import parse_server_args
from optimizedSD.server.main import make_server
from optimizedSD.server.service import Service

REPO = Path(__file__).resolve().parent.parent
TINY_CONFIG = REPO / "configs" / "tiny-random.yaml"


@dataclass
class Running:
    url: str  # http://127.0.0.1:PORT
    port: int
    service: Service


def tiny_server_argv(ckpt: Path, *extra: str) -> list[str]:
    return ["--ckpt", str(ckpt), "--config", str(TINY_CONFIG), "--device", "cpu", *extra]


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def free_port() -> int:
    with free_socket() as sock:
        return sock.getsockname()[1]


@contextmanager
def running_server(argv: Sequence[str]) -> Iterator[Running]:
    """The server of ``argv`` in a thread of this process, listening on a free loopback port."""
    service = Service(parse_server_args(list(argv)))
    server = make_server(service, "127.0.0.1", 0)
    sock = free_socket()
    port = sock.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)
        yield Running(f"http://127.0.0.1:{port}", port, service)
    finally:
        server.should_exit = True
        thread.join(60)
        service.worker.close()
        sock.close()
