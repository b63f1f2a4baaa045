"""python -m http_frontend: serve the API and web UI on waitress."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time

import waitress

from http_frontend.app import FrontendConfig, create_app
from http_frontend.auth import load_keys
from http_frontend.broker_client import BrokerClient
from http_frontend.service import ImageService, ServiceConfig

log = logging.getLogger("http_frontend")

# The last answers are written by waitress after the app returned; give them time to go out.
RESPONSE_FLUSH_S = 0.3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m http_frontend",
        description="Serve the OpenAI-compatible Images API and the web UI.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--broker", default="tcp://127.0.0.1:5555",
                        help="the broker's client endpoint")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument("--default-model", default=None,
                        help="model for requests that name none; default: one the workers serve")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds a request may take, queueing included (then 504)")
    parser.add_argument("--threads", type=int, default=32,
                        help="waitress threads: requests served at once")
    parser.add_argument("--max-streams", type=int, default=None,
                        help="event streams open at once (each holds a thread while it "
                             "lasts); default: half the threads, so streams never starve "
                             "plain requests")
    parser.add_argument("--keepalive", type=float, default=10.0,
                        help="seconds between keep-alive comments on an idle event stream")
    parser.add_argument("--max-body", type=int, default=1 << 20,
                        help="largest request body in bytes (then 413)")
    parser.add_argument("--drain-timeout", type=float, default=5.0,
                        help="on SIGTERM, seconds waiting requests get to finish (then 503)")
    parser.add_argument("--api-key", action="append", default=None, metavar="KEY",
                        help="require `Authorization: Bearer KEY` on /v1/* (repeatable; "
                             "prefer --api-keys-file: command lines are visible to `ps`)")
    parser.add_argument("--api-keys-file", default=None, metavar="FILE",
                        help="API keys, one per line (# comments)")
    parser.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                        help="allow browser calls from this origin (repeatable); off by "
                             "default")
    parser.add_argument("--heartbeat", type=float, default=1.0,
                        help="seconds between status polls of the broker")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    return parser.parse_args(argv)


def drain_then_close(service: ImageService, seconds: float) -> None:
    """Refuse new work, let waiting requests finish for ``seconds``, then close the server."""
    if service.draining:
        return
    log.info("stopping: draining %d request(s) for up to %.0f s", service.in_flight, seconds)
    service.begin_drain(seconds)

    def wait_then_close() -> None:
        deadline = time.monotonic() + seconds + 1.0
        while service.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(RESPONSE_FLUSH_S)
        os.kill(os.getpid(), signal.SIGUSR1)

    threading.Thread(target=wait_then_close, name="drain", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s frontend %(levelname)s %(message)s")
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    try:
        api_keys = load_keys(args.api_key, args.api_keys_file)
    except OSError as exc:
        log.error("cannot read the API keys: %s", exc)
        return 2
    broker = BrokerClient(args.broker, heartbeat=args.heartbeat)
    broker.start()
    config = FrontendConfig(
        service=ServiceConfig(default_model=args.default_model, default_timeout=args.timeout,
                              max_streams=args.max_streams or max(1, args.threads // 2),
                              keepalive=args.keepalive),
        max_body=args.max_body, api_keys=tuple(api_keys),
        cors_origins=tuple(args.cors_origin or ()),
    )
    service = ImageService(broker, config.service)
    app = create_app(config, broker, service=service)
    server = waitress.create_server(app, host=args.host, port=args.port, threads=args.threads,
                                    # A backstop only: the app answers 413 in OpenAI's shape
                                    # first; waitress's own 413 is plain text.
                                    max_request_body_size=4 * args.max_body + 1,
                                    ident="diffusion-cluster",
                                    # Lets a waiting request notice its client hung up.
                                    channel_request_lookahead=1)
    # waitress must be closed on the main thread: the drain thread asks for it with SIGUSR1.
    signal.signal(signal.SIGUSR1, lambda *_: server.close())
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: drain_then_close(service, args.drain_timeout))
    log.info("serving on http://%s:%s (broker %s; %s)", args.host, server.effective_port,
             args.broker, f"{len(api_keys)} API key(s)" if api_keys else "no API keys")
    try:
        server.run()
    except OSError:
        pass  # closing the server from the signal handler ends run() this way
    finally:
        broker.close()
    log.info("frontend stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
