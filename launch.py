"""Start a diffusion-cluster: arguments -> process specs -> a supervisor. Nothing else.

    python launch.py                       # broker + one worker per GPU (or CPU) + frontend
    python launch.py worker --broker tcp://HEAD:5556 --model sdxl-turbo   # join from elsewhere
    python launch.py models                # the model registry
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from broker.auth import create_keys
from broker.broker import BrokerConfig
from gpu_worker import models
from launcher.cluster import (
    ProcessSpec,
    address_in_use,
    cpu_worker_threads,
    parse_model_counts,
    place_workers,
    visible_gpus,
    wait_for_frontend,
    wait_until_ready,
)
from launcher.supervisor import EXIT_CONFIG, Supervisor

log = logging.getLogger("launch")
LOCAL_WORKER_KEY = "local"  # the key pair this host's own workers use with --curve
PY = sys.executable


def _common_worker_flags(args: argparse.Namespace, model: str) -> list[str]:
    flags = ["--model", model, "--heartbeat", str(args.heartbeat),
             "--max-batch", str(args.max_batch), "--log-level", args.log_level]
    if args.cache_dir:
        flags += ["--cache-dir", args.cache_dir]
    if args.offload:
        flags.append("--offload")
    if args.compile:
        flags.append("--compile")
    broker_key, key = _worker_keys(args)
    if key:
        flags += ["--broker-key", broker_key, "--key", key]
    return flags


def _worker_keys(args: argparse.Namespace) -> tuple[str | None, str | None]:
    """The CURVE key files a worker uses: given outright, or the local pair of --curve DIR."""
    if getattr(args, "key", None):
        return args.broker_key, args.key
    if getattr(args, "curve", None):
        return (str(Path(args.curve) / "broker.key"),
                str(Path(args.curve) / "workers" / f"{LOCAL_WORKER_KEY}.key_secret"))
    return None, None


def wanted_workers(args: argparse.Namespace, gpus: list[str]) -> list[tuple[str, int]]:
    """(model, workers) pairs: --models, else --model on every GPU or --num-workers CPUs."""
    if args.models:
        return parse_model_counts(args.models)
    model = args.model or models.default_model(cuda=bool(gpus))
    return [(model, len(gpus) if gpus else args.num_workers)]


def worker_specs(args: argparse.Namespace, broker: str,
                 gpus: list[str] | None = None) -> list[ProcessSpec]:
    """One worker per GPU used, else CPU workers that share the cores."""
    if gpus is None:
        gpus = visible_gpus(args.num_gpus)
    placed = place_workers(wanted_workers(args, gpus), gpus)
    threads = cpu_worker_threads(len(placed))
    specs = []
    for i, (model, gpu) in enumerate(placed):
        flags = [PY, "-m", "gpu_worker", "--broker", broker, *_common_worker_flags(args, model)]
        if gpu is not None:
            # Each worker sees exactly one GPU, so its device is always cuda:0.
            specs.append(ProcessSpec(f"worker-gpu{gpu}", [*flags, "--device", "cuda:0"],
                                     env={"CUDA_VISIBLE_DEVICES": gpu}))
        else:
            specs.append(ProcessSpec(f"worker-cpu{i}", [*flags, "--device", "cpu",
                                                         "--threads", str(threads)],
                                     env={"CUDA_VISIBLE_DEVICES": ""}))
    return specs


def cluster_specs(args: argparse.Namespace) -> list[ProcessSpec]:
    gpus = visible_gpus(args.num_gpus)
    broker_cmd = [
        PY, "-m", "broker", "--clients", args.clients, "--workers", args.workers,
        "--heartbeat", str(args.heartbeat), "--max-queue", str(args.max_queue),
        "--log-level", args.log_level,
    ]
    if args.curve:
        broker_cmd += ["--curve", args.curve]
    if args.insecure:
        broker_cmd.append("--insecure")
    broker = ProcessSpec("broker", broker_cmd, stop_last=True,
                         listens=(args.clients, args.workers))
    frontend_cmd = [
        PY, "-m", "http_frontend", "--broker", args.clients.replace("*", "127.0.0.1"),
        "--host", args.host, "--port", str(args.port), "--timeout", str(args.timeout),
        "--heartbeat", str(args.heartbeat), "--log-level", args.log_level,
        # Leave the broker time to stop after the frontend drained.
        "--drain-timeout", str(max(1.0, args.grace - 2.0)),
    ]
    # Always named: a request without `model` goes to the model the operator chose (or the
    # workers' own default), never to whichever model a worker happened to announce first.
    frontend_cmd += ["--default-model", wanted_workers(args, gpus)[0][0]]
    for key in args.api_key or ():
        frontend_cmd += ["--api-key", key]
    if args.api_keys_file:
        frontend_cmd += ["--api-keys-file", args.api_keys_file]
    for origin in args.cors_origin or ():
        frontend_cmd += ["--cors-origin", origin]
    frontend = ProcessSpec("frontend", frontend_cmd, listens=(http_address(args),))
    connect = args.workers.replace("*", "127.0.0.1").replace("0.0.0.0", "127.0.0.1")
    return [broker, *worker_specs(args, connect, gpus), frontend]


def http_address(args: argparse.Namespace) -> str:
    return f"[{args.host}]:{args.port}" if ":" in args.host else f"{args.host}:{args.port}"


def addresses_in_use(args: argparse.Namespace) -> list[str]:
    """One line for each address this cluster would listen on that is taken already."""
    taken = []
    for address, what in ((http_address(args), "HTTP (--host/--port)"),
                          (args.clients, "the broker's clients (--clients)"),
                          (args.workers, "the broker's workers (--workers)")):
        reason = address_in_use(address)
        if reason:
            hint = " (another launch.py running?)" if "in use" in reason else ""
            taken.append(f"cannot listen on {address} for {what}: {reason}{hint}")
    return taken


def run_cluster(args: argparse.Namespace) -> int:
    try:
        specs = cluster_specs(args)
    except ValueError as exc:
        print(f"launch.py: {exc}", file=sys.stderr)
        return 2
    # Say so at once rather than start children that cannot bind. Racy (the port can be taken
    # in between): then the child exits with EXIT_CONFIG and the supervisor stops, below.
    taken = addresses_in_use(args)
    if taken:
        for line in taken:
            print(f"launch.py: {line}", file=sys.stderr)
        return EXIT_CONFIG
    workers = [s for s in specs if s.name.startswith("worker")]
    if not any(s.name.startswith("worker-gpu") for s in workers):
        served = sorted({s.argv[s.argv.index("--model") + 1] for s in workers})
        print(f"No CUDA GPU found: starting {len(workers)} CPU worker(s) serving "
              f"{', '.join(served)}.")
        if models.TINY in served:
            print("  'tiny' has random weights and makes noise: it shows the cluster works.\n"
                  "  Serve a real model with --model (see `python launch.py models`); on a "
                  "GPU host\n  the default is flux-schnell.")
    supervisor = Supervisor(specs, grace=args.grace)
    supervisor.install_signal_handlers()
    supervisor.start()
    # Supervise from the start (a child that dies while others load is restarted); report
    # readiness from a side thread.
    threading.Thread(target=report_ready, args=(args, len(workers), supervisor),
                     name="readiness", daemon=True).start()
    return _finish(supervisor)


def _finish(supervisor: Supervisor) -> int:
    """Supervise to the end; the last line says why when a child could not start."""
    status = supervisor.wait()
    if supervisor.failure:
        print(f"launch.py: stopped: {supervisor.failure}", file=sys.stderr, flush=True)
    return status


def report_ready(args: argparse.Namespace, workers: int, supervisor: Supervisor) -> None:
    """Print the URL once every worker has warmed up and the frontend sees them all."""
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}/"
    started = time.monotonic()
    ready = wait_until_ready(args.clients.replace("*", "127.0.0.1"), workers,
                             timeout=args.ready_timeout, should_stop=supervisor.stopping)
    ready = ready and wait_for_frontend(url, workers, timeout=30.0,
                                        should_stop=supervisor.stopping)
    if ready:
        print(f"Ready in {time.monotonic() - started:.1f} s: {workers} worker(s). "
              f"Open {url}", flush=True)
    elif not supervisor.stopping():
        print(f"Not every worker was ready after {args.ready_timeout:.0f} s; serving with the "
              f"ones that are. Open {url}", flush=True)


def run_workers(args: argparse.Namespace) -> int:
    specs = worker_specs(args, args.broker)
    supervisor = Supervisor(specs, grace=args.grace)
    supervisor.install_signal_handlers()
    supervisor.start()
    print(f"Started {len(specs)} worker(s) for {args.broker}", flush=True)
    return _finish(supervisor)


def make_keys(args: argparse.Namespace) -> int:
    names = args.worker or [LOCAL_WORKER_KEY, "worker-1"]
    try:
        written = create_keys(Path(args.dir), names, force=args.force)
    except (FileExistsError, OSError) as exc:
        print(f"launch.py keys: {exc}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    print(f"\nOn the head: python launch.py --curve {args.dir} --workers tcp://0.0.0.0:5556\n"
          "On a GPU host, with broker.key and one worker pair copied there:\n"
          "  python launch.py worker --broker tcp://HEAD:5556 --broker-key broker.key "
          "--key NAME.key_secret")
    return 0


def print_models(_: argparse.Namespace) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `launch.py models | head` ends quietly
    rows = [("alias", "family", "size", "steps", "guidance", "neg", "dtype", "repo")]
    for spec in models.REGISTRY.values():
        rows.append((spec.name, spec.family, f"{spec.default_size[0]}x{spec.default_size[1]}",
                     str(spec.default_steps),
                     "-" if spec.default_guidance is None else f"{spec.default_guidance:g}",
                     "yes" if spec.negative_prompt else "no", spec.dtype,
                     spec.repo or "(built in)"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())
    print("\nAny other diffusers repo id or directory with model_index.json works too.")
    return 0


def _add_worker_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="alias (see `launch.py models`), Hugging Face repo id or "
                             "directory; default flux-schnell on CUDA, tiny without")
    parser.add_argument("--models", default=None,
                        help="several models in one cluster, as MODEL:WORKERS pairs, e.g. "
                             "'flux-schnell:4,sdxl:2,tiny:1' (one GPU per worker; the first "
                             "is the default model)")
    parser.add_argument("--num-gpus", type=int, default=None,
                        help="use the first N visible GPUs (CUDA_VISIBLE_DEVICES is "
                             "honoured); default all")
    parser.add_argument("--num-workers", type=int, default=1,
                        help="CPU workers to start when there is no GPU")
    parser.add_argument("--max-batch", type=int, default=1,
                        help="queued jobs with equal settings a worker runs at once")
    parser.add_argument("--heartbeat", type=float, default=BrokerConfig().heartbeat_interval,
                        help="seconds between heartbeats; a peer is dead after 3 missed")
    parser.add_argument("--cache-dir", default=None, help="where the tiny model is written")
    parser.add_argument("--offload", action="store_true", help="model CPU offload on GPUs")
    parser.add_argument("--compile", action="store_true", help="torch.compile the denoiser")
    parser.add_argument("--grace", type=float, default=8.0,
                        help="seconds children get to stop before they are killed")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = BrokerConfig()
    parser = argparse.ArgumentParser(
        description="Start a diffusion-cluster on this host, or join one.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")
    worker = sub.add_parser(
        "worker", help="join a running cluster from this host",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Start one worker per GPU here (or CPU workers) for a remote broker.")
    worker.add_argument("--broker", required=True,
                        help="the head's worker endpoint, e.g. tcp://HEAD:5556")
    worker.add_argument("--device", default=None,
                        help="one device for one worker, e.g. cuda:1 or cpu")
    _add_worker_flags(worker)
    worker.add_argument("--broker-key", default=None, metavar="FILE",
                        help="the head's broker.key (public), for a CURVE broker")
    worker.add_argument("--key", default=None, metavar="FILE",
                        help="this host's worker secret key (NAME.key_secret)")
    sub.add_parser("models", help="list the model registry")
    keys = sub.add_parser(
        "keys", help="write CURVE key pairs for the broker and worker hosts",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write DIR/broker.key(_secret) and DIR/workers/NAME.key(_secret); the "
                    "broker (--curve DIR) lets in every worker whose public key is in "
                    "DIR/workers/. Secret files are mode 0600.")
    keys.add_argument("dir", help="where to write the keys")
    keys.add_argument("--worker", action="append", default=None, metavar="NAME",
                      help="a worker key pair to write (repeatable); default: "
                           f"'{LOCAL_WORKER_KEY}' (this host's workers) and 'worker-1'")
    keys.add_argument("--force", action="store_true", help="replace existing key pairs")

    parser.add_argument("--host", default="127.0.0.1",
                        help="HTTP address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port")
    parser.add_argument("--clients", default=defaults.clients,
                        help="broker endpoint for frontends")
    parser.add_argument("--workers", default=defaults.workers,
                        help="broker endpoint for workers (bind 0.0.0.0 to let other hosts "
                             "join)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds an HTTP request may take, queueing included")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue,
                        help="queued jobs per model before 429")
    parser.add_argument("--ready-timeout", type=float, default=600.0,
                        help="seconds to wait for every worker's warm-up")
    parser.add_argument("--curve", metavar="DIR", default=None,
                        help="keys from `launch.py keys DIR`: the worker endpoint takes only "
                             "CURVE-encrypted workers whose key is in DIR/workers/ (this "
                             "host's workers use the 'local' pair)")
    parser.add_argument("--insecure", action="store_true",
                        help="allow a plain-TCP worker endpoint beyond loopback")
    parser.add_argument("--api-key", action="append", default=None, metavar="KEY",
                        help="require `Authorization: Bearer KEY` on /v1/* (repeatable; "
                             "prefer --api-keys-file: command lines are visible to `ps`)")
    parser.add_argument("--api-keys-file", default=None, metavar="FILE",
                        help="API keys, one per line (# comments)")
    parser.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                        help="allow browser calls from this origin (repeatable); off by "
                             "default")
    _add_worker_flags(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s launch %(levelname)s %(message)s")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.command == "models":
        return print_models(args)
    if args.command == "keys":
        return make_keys(args)
    if args.command == "worker":
        if args.device:
            return _run_one_worker(args)
        return run_workers(args)
    return run_cluster(args)


def _run_one_worker(args: argparse.Namespace) -> int:
    flags = ["-m", "gpu_worker", "--broker", args.broker, "--device", args.device,
             *_common_worker_flags(args, args.model or models.default_model(
                 cuda=args.device.startswith("cuda")))]
    supervisor = Supervisor([ProcessSpec(f"worker-{args.device}", [PY, *flags])],
                            grace=args.grace)
    supervisor.install_signal_handlers()
    supervisor.start()
    return _finish(supervisor)


if __name__ == "__main__":
    sys.exit(main())
