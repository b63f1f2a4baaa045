"""python -m broker: run the broker until SIGTERM or Ctrl-C."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from broker import defaults, logs
from broker.broker import Broker, BrokerConfig
from launcher import environment


def add_broker_arguments(parser: argparse.ArgumentParser) -> None:
    """The broker's flags; launch.py composes them with the worker's and the frontend's."""
    parser.add_argument("--clients", default=defaults.CLIENTS_ENDPOINT,
                        help="endpoint the HTTP frontends connect to")
    parser.add_argument("--workers", default=defaults.WORKERS_ENDPOINT,
                        help="endpoint the GPU workers connect to (bind 0.0.0.0 to let other "
                             "hosts join)")
    parser.add_argument("--heartbeat", type=float, default=defaults.HEARTBEAT_INTERVAL,
                        help="seconds between heartbeats; a peer is dead after "
                             f"{defaults.HEARTBEAT_LIVENESS} missed")
    parser.add_argument("--max-queue", type=int, default=defaults.MAX_QUEUE,
                        help="queued jobs per model before submissions get 429")
    parser.add_argument("--max-client-frame-mb", type=float,
                        default=defaults.MAX_CLIENT_FRAME / (1 << 20),
                        help="largest frame a frontend may send, in MiB: an edit's input "
                             "images travel one a frame, re-encoded at the size they run at")
    parser.add_argument("--max-input-mb", type=float,
                        default=defaults.MAX_INPUT_BYTES / (1 << 20),
                        help="edit images, in MiB, the broker holds for its queued and running "
                             "jobs together; past it, edits are refused as queue_full")
    parser.add_argument("--curve", metavar="DIR", default=None,
                        help="CURVE keys from `launch.py keys DIR`: both endpoints encrypt, "
                             "workers must hold a key listed in DIR/workers/ and frontends one "
                             "in DIR/frontends/ (reloaded on SIGHUP and when a folder changes)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a plain-TCP worker or client endpoint beyond loopback")
    logs.add_log_arguments(parser)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m broker",
        description="Route image-generation jobs from HTTP frontends to GPU workers.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_broker_arguments(parser)
    return environment.parse_args(parser, argv, "broker")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.configure("broker", args.log_level, args.log_format)
    try:
        broker = Broker(BrokerConfig(clients=args.clients, workers=args.workers,
                                     heartbeat_interval=args.heartbeat,
                                     max_queue=args.max_queue, curve_dir=args.curve,
                                     max_client_frame=int(args.max_client_frame_mb * (1 << 20)),
                                     max_input_bytes=int(args.max_input_mb * (1 << 20)),
                                     insecure=args.insecure))
        broker.bind()
    except Exception as exc:  # e.g. address in use, missing keys: one line, no traceback
        logging.error("cannot start: %s", exc)
        # sysexits' EX_CONFIG (launcher.supervisor.EXIT_CONFIG): a restart would fail the
        # same way, so launch.py stops the cluster instead of restarting the broker.
        return os.EX_CONFIG
    try:
        broker.self_test()
    except Exception as exc:  # may be a slow probe on a loaded host: worth a restart
        logging.error("cannot start: %s", exc)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: broker.stop())
    signal.signal(signal.SIGHUP, lambda *_: broker.request_reload())
    broker.run()
    logging.info("broker stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
