"""Start a diffusion-cluster: arguments -> process specs -> a supervisor. Nothing else.

    python launch.py                       # broker + one worker per GPU (or CPU) + frontend
    python launch.py worker --broker tcp://HEAD:5556 --model sdxl-turbo   # join from elsewhere
    python launch.py models                # the model registry
    python launch.py status                # a running cluster's workers, queues, throughput
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
from typing import Any

from broker import logs
from broker.__main__ import add_broker_arguments
from broker.auth import FRONTENDS_DIR, WORKERS_DIR, create_keys
from broker.connection import CurveKeys
from gpu_worker import models
from gpu_worker.__main__ import add_worker_arguments
from http_frontend.__main__ import (
    add_frontend_arguments,
    check_frontend_arguments,
    describe_storage,
)
from launcher import environment, flags
from launcher import status as cluster_status
from launcher.cluster import (
    ProcessSpec,
    address_in_use,
    cpu_worker_threads,
    group_gpus,
    parse_model_counts,
    place_workers,
    visible_gpus,
    wait_for_frontend,
    wait_until_ready,
)
from launcher.supervisor import EXIT_CONFIG, Supervisor

log = logging.getLogger("launch")
LOCAL_WORKER_KEY = "local"  # the key pair this host's own workers use with --curve
LOCAL_FRONTEND_KEY = "local"  # and its own frontend (DIR/frontends/local), made when missing

# What launch.py starts; every flag of each is a launch.py flag too, but for those it computes.
BROKER = flags.Program(
    "broker", "broker", add_broker_arguments,
    overrides={"curve": {"help": "keys from `launch.py keys DIR`: the worker endpoint takes "
                                 "only CURVE-encrypted workers whose key is in DIR/workers/, "
                                 "the client endpoint only frontends whose key is in "
                                 "DIR/frontends/ (this host's workers and frontend use the "
                                 f"'{LOCAL_WORKER_KEY}' pairs; the frontend's is made when "
                                 "missing)"}})
WORKER = flags.Program(  # a worker of this cluster, on one of this host's devices
    "worker", "gpu_worker", add_worker_arguments,
    set_by_launch=frozenset({"broker", "model", "device", "threads", "broker_key", "key"}))
FRONTEND = flags.Program(
    "frontend", "http_frontend", add_frontend_arguments, check=check_frontend_arguments,
    set_by_launch=frozenset({"broker", "default_model", "drain_timeout", "broker_key",
                             "key"}))
JOINING_WORKER = flags.Program(  # `launch.py worker`: for a broker elsewhere
    "worker", "gpu_worker", add_worker_arguments,
    set_by_launch=frozenset({"model", "threads"}),
    overrides={"broker": {"required": True, "default": argparse.SUPPRESS,
                          "help": "the head's worker endpoint, e.g. tcp://HEAD:5556"},
               "device": {"help": "one device for one worker, e.g. cuda:1 or cpu; default: "
                                  "one worker per GPU, else --num-workers CPU workers"}})


def local_worker_keys(args: argparse.Namespace) -> dict[str, str]:
    """The CURVE key files this host's workers use with --curve DIR: its 'local' pair."""
    if not args.curve:
        return {}
    return {"broker_key": str(Path(args.curve) / "broker.key"),
            "key": str(Path(args.curve) / WORKERS_DIR / f"{LOCAL_WORKER_KEY}.key_secret")}


def local_frontend_keys(args: argparse.Namespace) -> dict[str, str]:
    """The CURVE key files this host's frontend uses with --curve DIR: its 'local' pair."""
    if not args.curve:
        return {}
    return {"broker_key": str(Path(args.curve) / "broker.key"),
            "key": str(Path(args.curve) / FRONTENDS_DIR / f"{LOCAL_FRONTEND_KEY}.key_secret")}


def ensure_local_frontend_key(args: argparse.Namespace) -> None:
    """Write DIR/frontends/local when --curve DIR has none (a folder made before frontends
    needed keys): its own frontend is as trusted as the head that holds broker.key_secret."""
    folder = Path(args.curve or ".")
    # Without broker.key the broker refuses to start and says so; a new pair made here
    # would not be the one the workers hold.
    if not args.curve or not (folder / "broker.key").exists() or \
            (folder / FRONTENDS_DIR / f"{LOCAL_FRONTEND_KEY}.key").exists():
        return
    create_keys(folder, [], frontends=[LOCAL_FRONTEND_KEY])
    print(f"Wrote the key pair of this host's frontend: {args.curve}/{FRONTENDS_DIR}/"
          f"{LOCAL_FRONTEND_KEY}.key(_secret)", flush=True)


def wanted_workers(args: argparse.Namespace, gpus: list[str]) -> list[tuple[str, int]]:
    """(model, workers) pairs: --models, else --model on every GPU or --num-workers CPUs."""
    if args.models:
        return parse_model_counts(args.models)
    model = args.model or models.default_model(cuda=bool(gpus))
    return [(model, len(gpus) if gpus else args.num_workers)]


# CPU workers share the host's cores with each other and with the broker and frontend. torch's
# threads (GNU OpenMP) spin at every barrier by default, taking cores from the threads that
# have work: a 20-step tiny job took 7-27 s instead of about 1 s on a busy 2-core host. They
# wait passively instead, unless the environment says otherwise.
CPU_WORKER_ENV = {"CUDA_VISIBLE_DEVICES": "",
                  "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def worker_specs(args: argparse.Namespace, program: flags.Program, broker: str,
                 gpus: list[str] | None = None, **computed: str) -> list[ProcessSpec]:
    """One worker per GPU used, else CPU workers that share the cores."""
    if gpus is None:
        gpus = visible_gpus(args.num_gpus)
    per_worker = args.gpus_per_worker
    groups = group_gpus(gpus, per_worker)
    placed = place_workers(wanted_workers(args, groups), groups)
    if args.worker_id and len(placed) > 1:
        raise ValueError(f"--worker-id names one worker, but {len(placed)} would start")
    threads = cpu_worker_threads(len(placed) * per_worker)  # a group is that many processes
    specs = []
    for i, (model, gpu) in enumerate(placed):
        values: dict[str, Any] = {"broker": broker, "model": model, **computed}
        if gpu is not None:
            # Each worker sees exactly its GPUs, so its device is always cuda:0 (its group's
            # first; a group's ranks take cuda:1 and on).
            specs.append(ProcessSpec(f"worker-gpu{gpu.replace(',', '-')}",
                                     flags.argv(program, args, **values, device="cuda:0"),
                                     env={"CUDA_VISIBLE_DEVICES": gpu}))
        else:
            specs.append(ProcessSpec(f"worker-cpu{i}", flags.argv(
                program, args, **values, device="cpu", threads=threads),
                env=CPU_WORKER_ENV))
    return specs


def cluster_specs(args: argparse.Namespace) -> list[ProcessSpec]:
    gpus = visible_gpus(args.num_gpus)
    broker = ProcessSpec("broker", flags.argv(BROKER, args), stop_last=True,
                         listens=(args.clients, args.workers))
    frontend = ProcessSpec("frontend", flags.argv(
        FRONTEND, args, broker=args.clients.replace("*", "127.0.0.1"),
        # Always named: a request without `model` goes to the model the operator chose (or
        # the workers' own default), never to whichever model a worker announced first.
        default_model=wanted_workers(args, gpus)[0][0],
        # Leave the broker time to stop after the frontend drained.
        drain_timeout=max(1.0, args.grace - 2.0), **local_frontend_keys(args)),
        listens=(http_address(args),))
    connect = args.workers.replace("*", "127.0.0.1").replace("0.0.0.0", "127.0.0.1")
    return [broker, *worker_specs(args, WORKER, connect, gpus, **local_worker_keys(args)),
            frontend]


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
        complain(args, "launch.py", str(exc))
        return 2
    try:
        ensure_local_frontend_key(args)
    except OSError as exc:
        complain(args, "launch.py", f"cannot write the frontend's CURVE key: {exc}")
        return EXIT_CONFIG
    # Say so at once rather than start children that cannot bind. Racy (the port can be taken
    # in between): then the child exits with EXIT_CONFIG and the supervisor stops, below.
    taken = addresses_in_use(args)
    if taken:
        for line in taken:
            complain(args, "launch.py", line)
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
    print(describe_storage(args), flush=True)
    supervisor = Supervisor(specs, grace=args.grace)
    supervisor.install_signal_handlers()
    supervisor.start()
    # Supervise from the start (a child that dies while others load is restarted); report
    # readiness from a side thread.
    threading.Thread(target=report_ready, args=(args, len(workers), supervisor),
                     name="readiness", daemon=True).start()
    return _finish(args, supervisor)


def _finish(args: argparse.Namespace, supervisor: Supervisor) -> int:
    """Supervise to the end; the last line says why when a child could not start."""
    status = supervisor.wait()
    if supervisor.failure:
        complain(args, "launch.py", f"stopped: {supervisor.failure}")
    return status


def complain(args: argparse.Namespace, who: str, text: str) -> None:
    """A line for the operator on stderr: ``who: text``, or under --log-format json a log
    line like every other (a JSON reader of stderr must not meet plain text)."""
    if getattr(args, "log_format", "text") == "json":
        log.error("%s", text)
    else:
        print(f"{who}: {text}", file=sys.stderr, flush=True)


def report_ready(args: argparse.Namespace, workers: int, supervisor: Supervisor) -> None:
    """Print the URL once every worker has warmed up and the frontend sees them all."""
    url = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}/"
    started = time.monotonic()
    keys = local_frontend_keys(args)  # it asks the broker as this host's frontend
    ready = wait_until_ready(args.clients.replace("*", "127.0.0.1"), workers,
                             timeout=args.ready_timeout, should_stop=supervisor.stopping,
                             curve=CurveKeys.from_files(keys["broker_key"], keys["key"])
                             if keys else None)
    ready = ready and wait_for_frontend(url, workers, timeout=30.0,
                                        should_stop=supervisor.stopping)
    if ready:
        print(f"Ready in {time.monotonic() - started:.1f} s: {workers} worker(s). "
              f"Open {url}", flush=True)
    elif not supervisor.stopping():
        print(f"Not every worker was ready after {args.ready_timeout:.0f} s; serving with the "
              f"ones that are. Open {url}", flush=True)


def join_specs(args: argparse.Namespace) -> list[ProcessSpec]:
    """`launch.py worker`: one worker on --device, else one per GPU (or CPU workers)."""
    if not args.device:
        return worker_specs(args, JOINING_WORKER, args.broker)
    model = args.model or models.default_model(cuda=args.device.startswith("cuda"))
    return [ProcessSpec(f"worker-{args.device}", flags.argv(JOINING_WORKER, args, model=model))]


def run_workers(args: argparse.Namespace) -> int:
    try:
        specs = join_specs(args)
    except ValueError as exc:
        complain(args, "launch.py worker", str(exc))
        return 2
    supervisor = Supervisor(specs, grace=args.grace)
    supervisor.install_signal_handlers()
    supervisor.start()
    print(f"Started {len(specs)} worker(s) for {args.broker}", flush=True)
    return _finish(args, supervisor)


def make_keys(args: argparse.Namespace) -> int:
    workers, frontends = args.worker or [], args.frontend or []
    if not workers and not frontends:
        workers, frontends = [LOCAL_WORKER_KEY, "worker-1"], [LOCAL_FRONTEND_KEY]
    try:
        written = create_keys(Path(args.dir), workers, frontends=frontends, force=args.force)
    except (FileExistsError, OSError) as exc:
        complain(args, "launch.py keys", str(exc))
        return 2
    for path in written:
        print(path)
    print(f"\nOn the head: python launch.py --curve {args.dir} --workers tcp://0.0.0.0:5556\n"
          "On a GPU host, with broker.key and one worker pair copied there:\n"
          "  python launch.py worker --broker tcp://HEAD:5556 --broker-key broker.key "
          "--key NAME.key_secret\n"
          "A frontend on another host, with broker.key and one frontend pair copied there:\n"
          "  python -m http_frontend --broker tcp://HEAD:5555 --broker-key broker.key "
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


def print_status(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `launch.py status | head` ends quietly
    api_key = getattr(args, "status_api_key", None) or os.environ.get("DC_API_KEY") or None
    return cluster_status.run(args.status_url, api_key=api_key, timeout=args.status_timeout)


def _add_placement_flags(parser: argparse.ArgumentParser) -> None:
    """launch.py's own flags for the workers: which models, on how many devices."""
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
    parser.add_argument("--grace", type=float, default=8.0,
                        help="seconds children get to stop before they are killed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, each flag not given taken from its variable (docs/configuration.md)."""
    parser, commands = make_parser()
    scheme = environment_scheme(commands)
    args = environment.parse(parser, argv, scheme)
    if args.command in STARTED:
        refused = flags.refused(STARTED[args.command], taken_by(commands[args.command], scheme),
                                os.environ)
        if refused:
            environment.fail(parser, "; ".join(refused))
    return args


# A parser for each command whose flags the environment may set (None: the cluster itself);
# `keys` and `models`, typed by hand, take none.
Commands = dict[str | None, argparse.ArgumentParser]


def make_parser() -> tuple[argparse.ArgumentParser, Commands]:
    parser = argparse.ArgumentParser(
        description="Start a diffusion-cluster on this host, or join one. Every flag of the "
                    "broker, the workers and the frontend is a flag here too.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        # No abbreviations: with every program's flags here, `keys --worker` would read as an
        # ambiguous prefix of --workers and --worker-id.
        allow_abbrev=False,
    )
    sub = parser.add_subparsers(dest="command")
    worker = sub.add_parser(
        "worker", help="join a running cluster from this host",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Start one worker per GPU here (or CPU workers) for a remote broker.")
    _add_placement_flags(worker)
    flags.add_program_arguments(worker, [JOINING_WORKER])
    sub.add_parser("models", help="list the model registry")
    keys = sub.add_parser(
        "keys", help="write CURVE key pairs for the broker, worker hosts and frontends",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write DIR/broker.key(_secret), DIR/workers/NAME.key(_secret) and "
                    "DIR/frontends/NAME.key(_secret); the broker (--curve DIR) lets in every "
                    "worker whose public key is in DIR/workers/ and every frontend whose "
                    "public key is in DIR/frontends/. Secret files are mode 0600.")
    keys.add_argument("dir", help="where to write the keys")
    keys.add_argument("--worker", action="append", default=None, metavar="NAME",
                      help="a worker key pair to write (repeatable); default: "
                           f"'{LOCAL_WORKER_KEY}' (this host's workers) and 'worker-1'")
    keys.add_argument("--frontend", action="append", default=None, metavar="NAME",
                      help="a frontend key pair to write (repeatable), for a frontend on "
                           f"another host; default: '{LOCAL_FRONTEND_KEY}' (this host's "
                           "frontend) when no --worker or --frontend is given")
    keys.add_argument("--force", action="store_true", help="replace existing key pairs")
    state = sub.add_parser(
        "status", help="show a running cluster: workers, queues, recent throughput",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Ask a frontend's HTTP API for its workers, queues and the images it "
                    "finished lately. Exit status 0: ready; 1: not ready (the reason is "
                    "printed); 2: the frontend cannot be reached or refused the key.")
    state.add_argument("--url", dest="status_url", default=cluster_status.DEFAULT_URL,
                       metavar="URL", help="the frontend's address")
    state.add_argument("--api-key", dest="status_api_key", default=argparse.SUPPRESS,
                       metavar="KEY",
                       help="sent as a Bearer token; default: the DC_API_KEY environment "
                            "variable")
    state.add_argument("--timeout", dest="status_timeout", type=float,
                       default=cluster_status.TIMEOUT, metavar="SECONDS",
                       help="seconds each request may take")

    _add_placement_flags(parser)
    parser.add_argument("--ready-timeout", type=float, default=600.0,
                        help="seconds to wait for every worker's warm-up")
    flags.add_program_arguments(parser, [BROKER, WORKER, FRONTEND])
    return parser, {None: parser, "worker": worker, "status": state}


# The programs each command starts: their variables launch.py does not take are refused.
STARTED = {None: [BROKER, WORKER, FRONTEND], "worker": [JOINING_WORKER]}


def environment_scheme(commands: Commands) -> environment.Scheme:
    """launch.py's variables: a program's flag has the program's own (DC_WORKER_MAX_BATCH),
    --model the workers' (DC_WORKER_MODEL), launch.py's own flags and those that set every
    program (--heartbeat, --log-level, --log-format) DC_LAUNCH_*."""
    names = {**flags.variables([BROKER, WORKER, FRONTEND]), **flags.variables([JOINING_WORKER])}
    for parser in commands.values():
        for action in environment.options(parser):
            names.setdefault(action.dest, environment.variable("launch", action.dest))
    names["model"] = environment.variable(WORKER.name, "model")  # what every worker serves
    return environment.Scheme(
        names, tuple(environment.prefix(name) for name in ("launch", "broker", "worker",
                                                           "frontend")),
        others=flags.every_variable([BROKER, WORKER, FRONTEND]),
        commands=frozenset(command for command in commands if command))


def taken_by(parser: argparse.ArgumentParser, scheme: environment.Scheme) -> set[str]:
    """The variables one command's flags take."""
    return {scheme.names[action.dest] for action in environment.options(parser)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.configure("launch", args.log_level, args.log_format)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.command == "models":
        return print_models(args)
    if args.command == "keys":
        return make_keys(args)
    if args.command == "status":
        return print_status(args)
    if args.command == "worker":
        return run_workers(args)
    return run_cluster(args)


if __name__ == "__main__":
    sys.exit(main())
