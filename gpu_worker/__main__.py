"""python -m gpu_worker: serve one model on one device for a broker."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

from broker import defaults, logs
from gpu_worker import models

if TYPE_CHECKING:
    from gpu_worker.loras import AdapterFile
    from gpu_worker.marking import Marking
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
    parser.add_argument("--lora-dir", default=None, metavar="DIR",
                        help="LoRA adapters this worker can apply: the .safetensors files under "
                             "DIR (subfolders too), named by their path there; files added or "
                             "removed are noticed without a restart")
    parser.add_argument("--lora-repo", action="append", default=None,
                        metavar="REPO_ID[:WEIGHT_NAME]",
                        help="a LoRA adapter from a Hugging Face repo, which this worker may "
                             "download (repeatable): its WEIGHT_NAME file, default "
                             "pytorch_lora_weights.safetensors (else the repo's one "
                             ".safetensors file); named REPO_ID, or REPO_ID/WEIGHT_STEM. "
                             "Resolved at start through the Hugging Face cache (HF_HUB_CACHE, "
                             "HF_HUB_OFFLINE=1: the cache only)")
    parser.add_argument("--lora-cache", type=int, default=8,
                        help="LoRA adapters kept in memory at most (least recently used out)")
    parser.add_argument("--lora-cache-mb", type=float, default=2048.0,
                        help="and their weights in MiB, at most")
    parser.add_argument("--no-image-metadata", action="store_true",
                        help="leave the prompt and settings out of the images (prompts can be "
                             "private); the marking as AI-generated stays")
    parser.add_argument("--broker-key", default=None, metavar="FILE",
                        help="the broker's public key (broker.key from `launch.py keys`); "
                             "with --key, the link is CURVE-encrypted and authenticated")
    parser.add_argument("--key", default=None, metavar="FILE",
                        help="this worker's secret key file (NAME.key_secret, mode 0600)")
    parser.add_argument("--watermark", action="store_true",
                        help="hide SDXL's invisible watermark in every finished image (needs "
                             "the invisible-watermark package; images under 256x256 pixels "
                             "stay unmarked)")
    parser.add_argument("--c2pa-cert", default=None, metavar="FILE",
                        help="PEM certificate chain (signer first) to sign a C2PA manifest "
                             "into every finished image; with --c2pa-key")
    parser.add_argument("--c2pa-key", default=None, metavar="FILE",
                        help="the PEM private key of --c2pa-cert (mode 0600)")
    parser.add_argument("--c2pa-tsa-url", default=None, metavar="URL",
                        help="an RFC 3161 timestamp authority that attests each signing time; "
                             "without one the time is not attested")
    logs.add_log_arguments(parser)


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
    if args.lora_dir and not Path(args.lora_dir).is_dir():
        raise ValueError(f"--lora-dir {args.lora_dir!r} is not a folder")
    if (args.lora_dir or args.lora_repo) and args.compile:
        raise ValueError("--compile cannot be used with --lora-dir or --lora-repo yet: a "
                         "compiled denoiser would recompile whenever the adapters change")
    if args.lora_cache < 1 or args.lora_cache_mb <= 0:
        raise ValueError("--lora-cache and --lora-cache-mb must be positive")
    lora_repos = _lora_repos(args.lora_repo or [], json_logs=args.log_format == "json")
    curve = CurveKeys.from_files(args.broker_key, args.key) if args.key else None
    marking = _marking(args)
    return WorkerConfig(broker=args.broker, model=model, device=device,
                        worker_id=args.worker_id, max_batch=args.max_batch,
                        heartbeat=args.heartbeat, threads=args.threads,
                        cache_dir=args.cache_dir, warm_up=not args.no_warm_up,
                        offload=args.offload, compile=args.compile, curve=curve,
                        lora_dir=args.lora_dir, lora_repos=lora_repos,
                        lora_cache=args.lora_cache,
                        lora_cache_bytes=int(args.lora_cache_mb * (1 << 20)),
                        image_metadata=not args.no_image_metadata, marking=marking)


def _lora_repos(specs: list[str], *, json_logs: bool) -> tuple[AdapterFile, ...]:
    """--lora-repo's adapters, resolved now: before the model loads, so that a repo that
    cannot be had stops the worker in seconds (LoraSetupError is a ValueError)."""
    from gpu_worker.loras import resolve_lora_repo

    if specs and json_logs:  # a download's progress bars on stderr would not be JSON
        from huggingface_hub.utils.tqdm import disable_progress_bars

        disable_progress_bars()
    return tuple(resolve_lora_repo(spec) for spec in dict.fromkeys(specs))  # each once


def _marking(args: argparse.Namespace) -> Marking:
    """The watermark and C2PA signer the flags ask for, checked now rather than per job."""
    from gpu_worker.marking import C2paSigner, Marking
    from gpu_worker.worker import VERSION

    if bool(args.c2pa_cert) != bool(args.c2pa_key):
        raise ValueError("--c2pa-cert and --c2pa-key go together")
    if args.c2pa_tsa_url and not args.c2pa_key:
        raise ValueError("--c2pa-tsa-url needs --c2pa-cert and --c2pa-key")
    tsa = urllib.parse.urlsplit(args.c2pa_tsa_url or "")
    if args.c2pa_tsa_url and (tsa.scheme not in ("http", "https") or not tsa.hostname):
        raise ValueError(f"--c2pa-tsa-url {args.c2pa_tsa_url!r} is not an http(s) URL")
    try:
        signer = C2paSigner.from_files(args.c2pa_cert, args.c2pa_key, version=VERSION,
                                       tsa_url=args.c2pa_tsa_url) if args.c2pa_key else None
        return Marking(watermark=args.watermark, c2pa=signer)
    except ImportError as exc:  # an optional package, or a system library it needs, is missing
        raise ValueError(f"--watermark and --c2pa-* need the packages of the marking extra: "
                         f"{exc}") from exc


def _route_library_logs() -> None:
    """diffusers and transformers print through stderr handlers of their own: send their
    records through the root logger's, so that every line is JSON."""
    import diffusers
    import transformers

    for library in (diffusers.utils.logging, transformers.utils.logging):
        library.disable_default_handler()
        library.enable_propagation()
    # A model's first download draws huggingface_hub's progress bars on stderr: not JSON.
    from huggingface_hub.utils.tqdm import disable_progress_bars

    disable_progress_bars()


def run_worker(args: argparse.Namespace) -> int:
    logs.configure("worker", args.log_level, args.log_format,
                   **({"worker_id": args.worker_id} if args.worker_id else {}))
    try:
        config = config_from_args(args)
    except (OSError, ValueError) as exc:  # missing or unsafe key files: one clear line
        logging.getLogger(__name__).error("cannot start: %s", exc)
        return os.EX_CONFIG  # launcher.supervisor.EXIT_CONFIG: a restart would fail the same way
    from gpu_worker.loras import LoraSetupError
    from gpu_worker.worker import Worker

    worker = Worker(config)
    logs.add_static_fields(worker_id=worker.worker_id)  # the default id is made just now
    if args.log_format == "json":
        _route_library_logs()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    try:
        worker.run()
    except LoraSetupError as exc:  # an adapter the operator named does not fit the model
        logging.getLogger(__name__).error("cannot start: %s", exc)
        return os.EX_CONFIG
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
