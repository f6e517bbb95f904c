"""``optimized_server.py``: parse, load nothing yet (the first request loads its checkpoint), serve until SIGTERM
or Ctrl-C. On SIGTERM the running generation stops at its next step and answers with its finished images, waiting
requests get 503, the model is released, and the process exits 0 (uvicorn's graceful shutdown)."""

from __future__ import annotations

import logging
import signal
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
EXIT_INTERRUPTED = 130


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
    # uvicorn raises the signal it caught again once it has shut down; SIGTERM's then does nothing: exit 0.
    signal.signal(signal.SIGTERM, lambda number, frame: None)
    try:
        server.run()
    except KeyboardInterrupt:  # Ctrl-C, raised again by uvicorn after its graceful shutdown
        return EXIT_INTERRUPTED
    except SystemExit:  # uvicorn's exit when it cannot listen (it logged why)
        pass
    finally:
        service.worker.close()
    if not server.started:  # the port is taken, or the address is not this machine's (uvicorn logged why)
        print(f"{PROG}: error: cannot listen on {config.host}:{config.port}", file=sys.stderr)
        return EXIT_USAGE
    return 0
