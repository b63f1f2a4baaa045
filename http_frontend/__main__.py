"""python -m http_frontend: serve the API and web UI on waitress."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from broker import defaults, logs
from broker.connection import CurveKeys
from http_frontend import request_ids
from http_frontend import server as http_server
from http_frontend.app import UPLOAD_PATHS, FrontendConfig, create_app
from http_frontend.auth import load_keys
from http_frontend.broker_client import BrokerClient
from http_frontend.database import DatabaseError, open_database
from http_frontend.history import History
from http_frontend.image_fetch import ImageFetcher
from http_frontend.image_store import (
    ImageStore,
    Retention,
    StoreError,
    Sweeper,
    open_store,
    parse_duration,
    parse_size,
)
from http_frontend.jobs_api import JobsAPI
from http_frontend.keeper import Keeper
from http_frontend.model_resolver import parse_alias
from http_frontend.records import JobRecords
from http_frontend.service import ImageService, ServiceConfig
from launcher import environment

log = logging.getLogger("http_frontend")

# The last answers are written by waitress after the app returned; give them time to go out.
RESPONSE_FLUSH_S = 0.3
EXIT_BROKER_THREAD_DIED = 70  # EX_SOFTWARE: the supervisor restarts the frontend


def add_frontend_arguments(parser: argparse.ArgumentParser) -> None:
    """The frontend's flags; launch.py composes them with the broker's and the worker's."""
    parser.add_argument("--broker", default=defaults.CLIENTS_ENDPOINT,
                        help="the broker's client endpoint")
    parser.add_argument("--broker-key", default=None, metavar="FILE",
                        help="the broker's public key (broker.key from `launch.py keys`), for "
                             "a broker run with --curve; with --key, the link is "
                             "CURVE-encrypted and authenticated")
    parser.add_argument("--key", default=None, metavar="FILE",
                        help="this frontend's secret key file (frontends/NAME.key_secret from "
                             "`launch.py keys DIR --frontend NAME`, mode 0600)")
    parser.add_argument("--host", default=defaults.HTTP_HOST,
                        help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=defaults.HTTP_PORT, help="port to listen on")
    parser.add_argument("--frontend-id", default=None,
                        help="this frontend's stable id: the broker lets only it re-attach to "
                             "or cancel its jobs, also after a restart; default HOST:PORT")
    parser.add_argument("--default-model", default=None,
                        help="model for requests that name none; default: the one model the "
                             "workers serve (with several, such a request is a 400)")
    parser.add_argument("--model-alias", action="append", default=None, metavar="NAME=MODEL",
                        help="requests naming NAME run on MODEL (repeatable); OpenAI's names "
                             "(dall-e-3, gpt-image-1, ...) not aliased run on the default "
                             "model")
    parser.add_argument("--timeout", type=float, default=defaults.REQUEST_TIMEOUT,
                        help="seconds a request may take, queueing included (then 504); "
                             "also the most a request's own `timeout` may ask for")
    parser.add_argument("--threads", type=int, default=64,
                        help="waitress threads: requests served at once")
    parser.add_argument("--reserved-threads", type=int, default=None,
                        help="threads never given to requests that wait for images, so "
                             "health checks and quick requests are served at once; past the "
                             "rest, such requests get a 429; default: an eighth of the "
                             "threads, at least 2")
    parser.add_argument("--max-streams", type=int, default=None,
                        help="event streams open at once (each holds a thread while it "
                             "lasts); default: half the threads, so streams never starve "
                             "plain requests")
    parser.add_argument("--connection-limit", type=int, default=1000,
                        help="open connections at once; past it new ones wait in the "
                             "listen backlog")
    parser.add_argument("--channel-timeout", type=int, default=30,
                        help="seconds an idle connection is kept open")
    parser.add_argument("--receive-timeout", type=float, default=30.0,
                        help="seconds a client has to send a whole request (head and body) "
                             "from its first byte; then the connection is closed")
    parser.add_argument("--keepalive", type=float, default=10.0,
                        help="seconds between keep-alive comments on an idle event stream")
    parser.add_argument("--max-body", type=int, default=1 << 20,
                        help="largest request body in bytes (then 413)")
    parser.add_argument("--max-edit-body-mb", type=float, default=64.0,
                        help="largest /v1/images/edits request in MiB: its images and mask, "
                             "uploaded or as data: URLs (then 413)")
    parser.add_argument("--fetch-image-urls", action="store_true",
                        help="let JSON edits name images by http(s) URL, fetched by this "
                             "server from public addresses only (off: a client could make "
                             "the server reach what it can, a server-side request forgery)")
    parser.add_argument("--drain-timeout", type=float, default=5.0,
                        help="on SIGTERM, seconds waiting requests get to finish (then 503)")
    parser.add_argument("--api-key", action="append", default=None, metavar="KEY",
                        help="require `Authorization: Bearer KEY` on /v1/* (repeatable; "
                             "prefer --api-keys-file: command lines are visible to `ps`)")
    parser.add_argument("--api-keys-file", default=None, metavar="FILE",
                        help="API keys, one per line (# comments)")
    parser.add_argument("--metrics-token", default=None, metavar="TOKEN",
                        help="require `Authorization: Bearer TOKEN` on /metrics (open "
                             "without one: bind to loopback, or set it; prefer "
                             "--metrics-token-file)")
    parser.add_argument("--metrics-token-file", default=None, metavar="FILE",
                        help="the /metrics token: the file's first line")
    parser.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                        help="allow browser calls from this origin (repeatable); off by "
                             "default")
    add_storage_arguments(parser)
    parser.add_argument("--heartbeat", type=float, default=defaults.HEARTBEAT_INTERVAL,
                        help="seconds between status polls of the broker")
    logs.add_log_arguments(parser)


def default_data_dir() -> str:
    """$DC_DATA_DIR, else the per-user data directory (XDG)."""
    if os.environ.get("DC_DATA_DIR"):
        return os.environ["DC_DATA_DIR"]
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "diffusion-cluster")


def add_storage_arguments(parser: argparse.ArgumentParser) -> None:
    """Where jobs and images outlive a request (docs/storage.md)."""
    parser.add_argument("--data-dir", default=default_data_dir(),
                        help="job records (SQLite) and images, unless --db and --image-store "
                             "say otherwise; default $DC_DATA_DIR, else ~/.local/share/"
                             "diffusion-cluster")
    parser.add_argument("--db", default=None, metavar="URL",
                        help="job records: postgresql://USER@HOST/DB when several frontends "
                             "share one history; a path or sqlite:///PATH; default "
                             "DATA_DIR/jobs.db")
    parser.add_argument("--image-store", default=None, metavar="LOCATION",
                        help="where images are kept: a directory, or s3://BUCKET/PREFIX "
                             "(credentials the usual AWS way); default DATA_DIR/images")
    parser.add_argument("--s3-endpoint", default=None, metavar="URL",
                        help="an S3-compatible server's URL (MinIO, Ceph, R2, ...); default "
                             "AWS, or $AWS_ENDPOINT_URL")
    parser.add_argument("--no-image-store", action="store_true",
                        help="keep no images: answers carry them inline only (no url)")
    parser.add_argument("--public-url", default=None, metavar="URL",
                        help="the base of image URLs behind a proxy (https://images.example."
                             "com); default each request's own scheme and host")
    parser.add_argument("--image-ttl", default="7d", metavar="DURATION",
                        help="how long images are kept (90s, 30m, 12h, 7d; 0: forever)")
    parser.add_argument("--image-store-limit", default="10G", metavar="SIZE",
                        help="most bytes all images may take (500M, 10G; 0: no cap); the "
                             "oldest go first, never one younger than 5 minutes")
    parser.add_argument("--default-response-format", choices=("b64_json", "url"),
                        default="b64_json",
                        help="the answer for a request that sends no response_format")
    parser.add_argument("--history-days", type=float, default=30.0,
                        help="days finished job records are kept (0: forever)")
    parser.add_argument("--no-history", action="store_true",
                        help="keep no prompts: a job's prompt is kept only while it runs "
                             "(to resume it after a restart), then overwritten")
    parser.add_argument("--lease", type=float, default=15.0,
                        help="seconds another frontend sharing --db waits after this one "
                             "stops before it takes over this one's unfinished jobs")


def check_frontend_arguments(args: argparse.Namespace) -> None:
    """Fill in the limits derived from --threads; ValueError names a flag that cannot work."""
    if args.reserved_threads is None:
        args.reserved_threads = max(2, args.threads // 8)
    if not 1 <= args.reserved_threads < args.threads:
        raise ValueError("--reserved-threads must be at least 1 and fewer than --threads")
    if args.max_streams is None:
        args.max_streams = max(1, min(args.threads // 2, args.threads - args.reserved_threads))
    for name in ("connection_limit", "channel_timeout", "max_streams"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.receive_timeout <= 0:
        raise ValueError("--receive-timeout must be above 0")
    args.model_aliases = tuple(parse_alias(text) for text in args.model_alias or ())
    # Parsed beside the flags, which keep what was typed (launch.py passes those on).
    args.image_ttl_s = parse_duration(args.image_ttl) or None
    args.image_store_bytes = parse_size(args.image_store_limit) or None
    if args.history_days < 0:
        raise ValueError("--history-days must be 0 (forever) or more")
    if args.lease < 1:
        raise ValueError("--lease must be at least 1 second")
    if args.no_image_store and args.image_store:
        raise ValueError("--image-store and --no-image-store cannot go together")
    if args.no_image_store and args.default_response_format == "url":
        raise ValueError("--default-response-format url needs an image store")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m http_frontend",
        description="Serve the OpenAI-compatible Images API and the web UI.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_frontend_arguments(parser)
    args = environment.parse_args(parser, argv, "frontend")
    try:
        check_frontend_arguments(args)
    except ValueError as exc:
        parser.error(str(exc))
    return args


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


class BrokerWatchdog:
    """Notices the broker client's I/O thread dying: nothing reaches the broker without it,
    so the frontend stops (``on_death``) and its supervisor starts a new one."""

    def __init__(self, broker: Any, on_death: Callable[[], None], *,
                 interval: float = 0.5) -> None:
        self.broker = broker
        self.on_death = on_death
        self.interval = interval
        self.died = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="broker-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2.0)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not getattr(self.broker, "alive", True):  # BrokerClient.alive: its thread runs
                self.died = True
                log.error("the broker connection thread died; stopping, so that the "
                          "supervisor starts this frontend again")
                self.on_death()
                return


def describe_storage(args: argparse.Namespace) -> str:
    """Where the flags put job records and images, for launch.py to print."""
    data_dir = os.path.abspath(os.path.expanduser(args.data_dir))
    records = "a database given by --db" if args.db else os.path.join(data_dir, "jobs.db")
    images = "not kept" if args.no_image_store else \
        args.image_store or os.path.join(data_dir, "images")
    return f"Data: job records in {records}; images in {images}"


def open_storage(args: argparse.Namespace, frontend: str) -> tuple[History, Sweeper | None]:
    """The job records and the image store the flags name; DatabaseError or StoreError
    says why they cannot be used."""
    data_dir = os.path.abspath(os.path.expanduser(args.data_dir))
    records = JobRecords(open_database(args.db or os.path.join(data_dir, "jobs.db")),
                         keep_prompts=not args.no_history)
    store: ImageStore | None = None
    sweeper = None
    if not args.no_image_store:
        store = open_store(args.image_store or os.path.join(data_dir, "images"),
                           s3_endpoint=args.s3_endpoint)
        store.check()
        sweeper = Sweeper(store, Retention(max_age=args.image_ttl_s,
                                           max_bytes=args.image_store_bytes))
    history = History(records, store, frontend=frontend, lease=args.lease,
                      public_url=args.public_url)
    return history, sweeper


def load_metrics_token(token: str | None, token_file: str | None) -> str | None:
    """The /metrics token from --metrics-token or the first line of --metrics-token-file
    (both: ValueError); None when neither gives one."""
    if token is not None and token_file is not None:
        raise ValueError("--metrics-token and --metrics-token-file cannot go together")
    if token_file is not None:
        lines = Path(token_file).read_text().splitlines()
        token = lines[0] if lines else ""
        if not token.strip():
            raise ValueError(f"{token_file} holds no token on its first line")
    if token is None or not token.strip():
        return None
    return token.strip()


def load_broker_keys(broker_key: str | None, key: str | None) -> CurveKeys | None:
    """The CURVE keys of --broker-key and --key (None without them); ValueError or OSError
    says why they cannot be used."""
    if bool(broker_key) != bool(key):
        raise ValueError("--broker-key and --key go together")
    if broker_key is None or key is None:
        return None
    return CurveKeys.from_files(broker_key, key)


def raise_open_files_limit(needed: int) -> None:
    """Lift the soft limit on open files to ``needed`` (connections are files)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        log.warning("only %d open files allowed (hard limit); --connection-limit needs about "
                    "%d", target, needed)


def _edit_body(args: argparse.Namespace) -> int:
    return int(args.max_edit_body_mb * (1 << 20))


def _create_server(app: Any, args: argparse.Namespace) -> Any:
    return http_server.create_server(
        app, host=args.host, port=args.port, threads=args.threads,
        receive_timeout=args.receive_timeout, max_body=args.max_body,
        # A backstop: the app answers 413 itself, with the same message, up to here.
        max_request_body_size=max(4 * args.max_body, _edit_body(args)) + 1,
        # Uploads' own limit; every other route keeps 4 x --max-body (server.RequestParser).
        upload_limits={path: _edit_body(args) for path in UPLOAD_PATHS},
        connection_limit=args.connection_limit, channel_timeout=args.channel_timeout,
        cleanup_interval=1,  # how often idle and slow connections are looked for
        asyncore_use_poll=True,  # select() stops at 1024 descriptors
        ident="diffusion-cluster",
        channel_request_lookahead=1)  # lets a waiting request notice its client hung up


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.configure("frontend", args.log_level, args.log_format)
    logs.add_filter(request_ids.LogFilter())
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    try:
        api_keys = load_keys(args.api_key, args.api_keys_file)
    except (OSError, ValueError) as exc:
        log.error("cannot start: cannot read the API keys: %s", exc)
        return os.EX_CONFIG  # launcher.supervisor.EXIT_CONFIG: a restart would fail the same way
    try:
        metrics_token = load_metrics_token(args.metrics_token, args.metrics_token_file)
    except (OSError, ValueError) as exc:
        log.error("cannot start: cannot read the metrics token: %s", exc)
        return os.EX_CONFIG
    try:
        broker_keys = load_broker_keys(args.broker_key, args.key)
    except (OSError, ValueError) as exc:
        log.error("cannot start: cannot read the broker keys: %s", exc)
        return os.EX_CONFIG
    raise_open_files_limit(args.connection_limit + args.threads + 128)
    owner = args.frontend_id or f"{socket.gethostname()}:{args.port}"
    try:
        history, sweeper = open_storage(args, owner)
    except (DatabaseError, StoreError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return os.EX_UNAVAILABLE  # the supervisor tries again: a database may be starting
    broker = BrokerClient(args.broker, owner=owner, heartbeat=args.heartbeat,
                          curve=broker_keys)
    config = FrontendConfig(
        service=ServiceConfig(default_model=args.default_model, default_timeout=args.timeout,
                              max_waiting=args.threads - args.reserved_threads,
                              max_streams=args.max_streams, keepalive=args.keepalive,
                              default_response_format=args.default_response_format,
                              model_aliases=args.model_aliases),
        max_body=args.max_body, max_edit_body=_edit_body(args),
        image_fetcher=ImageFetcher(max_bytes=_edit_body(args)) if args.fetch_image_urls
        else None,
        api_keys=tuple(api_keys),
        cors_origins=tuple(args.cors_origin or ()), image_ttl=args.image_ttl_s,
        metrics_token=metrics_token,
    )
    service = ImageService(broker, config.service, history=history)
    jobs = JobsAPI(service)
    app = create_app(config, broker, service=service, jobs=jobs)
    keeper = Keeper(jobs, connected=lambda: broker.connected,
                    history_days=args.history_days or None)
    try:
        server = _create_server(app, args)
    except OSError as exc:
        log.error("cannot start: cannot listen on %s:%s: %s", args.host, args.port,
                  exc.strerror or exc)
        return os.EX_CONFIG  # the port is taken: a restart would fail the same way
    broker.start()
    keeper.start()
    if sweeper is not None:
        sweeper.start()
    # waitress must be closed on the main thread: the drain thread asks for it with SIGUSR1.
    signal.signal(signal.SIGUSR1, lambda *_: http_server.close_everything(server))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: drain_then_close(service, args.drain_timeout))
    watchdog = BrokerWatchdog(broker, lambda: drain_then_close(service, args.drain_timeout))
    watchdog.start()
    log.info("serving on http://%s:%s (broker %s; %s)", args.host,
             getattr(server, "effective_port", args.port), args.broker,
             f"{len(api_keys)} API key(s)" if api_keys else "no API keys")
    log.info("%s", describe_storage(args))
    try:
        server.run()
    except OSError:
        pass  # closing the server from the signal handler ends run() this way
    finally:
        watchdog.stop()
        keeper.stop()
        if sweeper is not None:
            sweeper.stop()
        broker.close()
        history.close()
    log.info("frontend stopped")
    return EXIT_BROKER_THREAD_DIED if watchdog.died else 0


if __name__ == "__main__":
    sys.exit(main())
