"""python -m gpu_worker: serve one model on one device for a broker."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from typing import TYPE_CHECKING

from broker import defaults
from gpu_worker import models

if TYPE_CHECKING:
    from gpu_worker.worker import WorkerConfig


def add_worker_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of one worker; launch.py composes them with the broker's and the frontend's."""
    parser.add_argument("--broker", default=defaults.WORKERS_ENDPOINT,
                        help="the broker's worker endpoint")
    parser.add_argument("--model", default=None,
                        help="registry alias (see `launch.py models`), Hugging Face repo id, "
                             "or directory with model_index.json; default: flux-schnell on "
                             "CUDA, tiny (random weights, makes noise) otherwise")
    parser.add_argument("--device", default=None,
                        help="torch device, e.g. cuda:0 or cpu; default cuda:0 if available")
    parser.add_argument("--worker-id", default=None,
                        help="name shown in /v1/models and logs; default host-pid-device")
    parser.add_argument("--max-batch", type=int, default=1,
                        help="most queued jobs with equal settings taken at once")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (CPU workers); default: torch's choice")
    parser.add_argument("--heartbeat", type=float, default=defaults.HEARTBEAT_INTERVAL,
                        help="seconds between heartbeats; must match the broker's")
    parser.add_argument("--cache-dir", default=None,
                        help="where the tiny model is written; default ~/.cache/diffusion-cluster")
    parser.add_argument("--no-warm-up", action="store_true",
                        help="register without a warm-up generation")
    parser.add_argument("--offload", action="store_true",
                        help="model CPU offload, for GPUs too small to hold the model")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the denoiser (slow start, faster steps)")
    parser.add_argument("--no-image-metadata", action="store_true",
                        help="leave the prompt and settings out of the images (prompts can be "
                             "private); the marking as AI-generated stays")
    parser.add_argument("--broker-key", default=None, metavar="FILE",
                        help="the broker's public key (broker.key from `launch.py keys`); "
                             "with --key, the link is CURVE-encrypted and authenticated")
    parser.add_argument("--key", default=None, metavar="FILE",
                        help="this worker's secret key file (NAME.key_secret, mode 0600)")
    parser.add_argument("--log-level", default=defaults.LOG_LEVEL,
                        help="DEBUG, INFO, WARNING or ERROR")


def config_from_args(args: argparse.Namespace) -> WorkerConfig:
    # Imported here, not at the top: they import torch, and launch.py reads the flags above.
    from broker.connection import CurveKeys
    from gpu_worker.worker import WorkerConfig

    device = args.device
    if device is None:
        import torch
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    model = args.model or models.default_model(device.startswith("cuda"))
    if bool(args.broker_key) != bool(args.key):
        raise ValueError("--broker-key and --key go together")
    curve = CurveKeys.from_files(args.broker_key, args.key) if args.key else None
    return WorkerConfig(broker=args.broker, model=model, device=device,
                        worker_id=args.worker_id, max_batch=args.max_batch,
                        heartbeat=args.heartbeat, threads=args.threads,
                        cache_dir=args.cache_dir, warm_up=not args.no_warm_up,
                        offload=args.offload, compile=args.compile, curve=curve,
                        image_metadata=not args.no_image_metadata)


def run_worker(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s worker[{os.getpid()}] %(levelname)s %(message)s")
    try:
        config = config_from_args(args)
    except (OSError, ValueError) as exc:  # missing or unsafe key files: one clear line
        logging.getLogger(__name__).error("cannot start: %s", exc)
        return os.EX_CONFIG  # launcher.supervisor.EXIT_CONFIG: a restart would fail the same way
    from gpu_worker.worker import Worker

    worker = Worker(config)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    try:
        worker.run()
    except Exception as exc:  # load failures: one clear line, then a non-zero exit
        logging.getLogger(__name__).exception("worker failed: %s", exc)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gpu_worker",
        description="Serve one diffusers model on one device for a diffusion-cluster broker.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_worker_arguments(parser)
    return run_worker(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
