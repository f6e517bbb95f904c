"""``optimized_server.py``: parse, load nothing yet (the first request loads its checkpoint), serve until SIGTERM
or Ctrl-C. On SIGTERM the running generation stops at its next step and answers with its finished images, waiting
requests get 503, the model is released, and the process exits 0 (uvicorn's graceful shutdown)."""

from __future__ import annotations

import logging
import socket
import sys
from typing import Sequence

import uvicorn

from ldm.errors import UserError
from ldm.messages import one_line
from optimizedSD.server.app import build_app
from optimizedSD.server.flags import parse_server_args
from optimizedSD.server.service import Service
from optimizedSD.server.worker import Worker

PROG = "optimized_server.py"
EXIT_USAGE = 2


class Server(uvicorn.Server):
    """uvicorn's server, which on SIGTERM/SIGINT first tells the worker to stop taking and finishing jobs."""

    def __init__(self, config: uvicorn.Config, worker: Worker) -> None:
        super().__init__(config)
        self.worker = worker

    def handle_exit(self, sig: int, frame) -> None:  # type: ignore[override]
        self.worker.closing = True
        super().handle_exit(sig, frame)


def make_server(service: Service, host: str, port: int) -> Server:
    """The uvicorn server of ``service`` (logs through this process's logging; no access log)."""
    config = uvicorn.Config(build_app(service), host=host, port=port, log_config=None, access_log=False,
                            lifespan="off", timeout_keep_alive=30)
    return Server(config, service.worker)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the server; returns the exit code (2 for a bad command line)."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format=f"{PROG}: %(levelname)s %(message)s")
    try:
        config = parse_server_args(argv)
        service = Service(config)
    except UserError as error:
        print(f"{PROG}: error: {one_line(error)}", file=sys.stderr)
        return EXIT_USAGE
    server = make_server(service, config.host, config.port)
    try:
        server.run()
    except (OSError, socket.error) as error:  # the port is taken, the address is not this machine's
        print(f"{PROG}: error: cannot listen on {config.host}:{config.port} ({error})", file=sys.stderr)
        return EXIT_USAGE
    finally:
        service.worker.close()
    return 0 if server.started or not server.should_exit else EXIT_USAGE
