"""python -m gpu_worker: serve one model on one device for a broker."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING

from broker import defaults, logs
from gpu_worker import compiling, models, parallel, quantize, step_cache
from launcher import environment

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
                        help="torch.compile the denoiser (slower start, faster steps); the "
                             "warm-up compiles its sizes, later compiles are logged")
    parser.add_argument("--compile-scope", choices=compiling.SCOPES, default="regional",
                        help="with --compile: the denoiser's repeated blocks, compiled once "
                             "and reused (seconds), or the full denoiser (minutes)")
    parser.add_argument("--warm-up-size", action="append", default=None, metavar="WxH",
                        help="a size the warm-up runs (repeatable; with --compile each is "
                             "compiled at batch sizes 1 and 2); default: the model's default "
                             "size, or every size it takes where it takes only a few")
    parser.add_argument("--step-cache", default=step_cache.AUTO,
                        metavar="METHOD[:KEY=VALUE,...]",
                        help="skip denoiser work on steps that change little: none, "
                             "first-block[:threshold=T], taylorseer[:interval=N,warmup=N,"
                             "order=N], mag[:threshold=T,max-skip=N,retention=R] (FLUX.1 "
                             "only); auto is the model family's registry default, none for "
                             "every family today (docs/performance.md); requests may turn it "
                             "off with \"step_cache\": false")
    parser.add_argument("--gpus-per-worker", type=int, default=1, metavar="N",
                        help="split each image across N devices, --device and the next "
                             "N-1 (cuda:0 and cuda:1 for 2), with context parallelism: "
                             "one worker, N processes; FLUX.1, FLUX.2 and Qwen-Image")
    parser.add_argument("--context-parallel", choices=parallel.MODES, default="ulysses",
                        help="with --gpus-per-worker: how attention is split; ulysses needs "
                             "the model's attention heads to divide by N, ring needs CUDA")
    parser.add_argument("--quantize", choices=quantize.CHOICES, default=quantize.NONE,
                        help="quantise the denoiser with torchao: fp8 needs a CUDA GPU of "
                             "compute capability 8.9+ (Ada, Hopper, Blackwell); the others "
                             "run anywhere (docs/performance.md)")
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
    if args.quantize != quantize.NONE and args.offload:
        raise ValueError("--quantize cannot be used with --offload yet: quantised weights "
                         "moving between CPU and GPU on every call are not tested")
    if args.step_cache != step_cache.AUTO:
        step_cache.StepCacheSetting.parse(args.step_cache)  # its text: checked before loading
    quantize.check(args.quantize, device, loras=bool(args.lora_dir or args.lora_repo))
    if args.gpus_per_worker != 1:
        parallel.check_mode(parallel.GroupPlan(
            parallel.group_devices(device, args.gpus_per_worker), args.context_parallel))
        if args.step_cache not in (step_cache.AUTO, step_cache.NONE):
            raise ValueError("--step-cache cannot be used with --gpus-per-worker: the ranks "
                             "would decide apart which steps to skip")
    warm_up_sizes = tuple(_size(text) for text in args.warm_up_size or ())
    lora_repos = _lora_repos(args.lora_repo or [], json_logs=args.log_format == "json")
    curve = CurveKeys.from_files(args.broker_key, args.key) if args.key else None
    marking = _marking(args)
    return WorkerConfig(broker=args.broker, model=model, device=device,
                        worker_id=args.worker_id, max_batch=args.max_batch,
                        heartbeat=args.heartbeat, threads=args.threads,
                        cache_dir=args.cache_dir, warm_up=not args.no_warm_up,
                        offload=args.offload, compile=args.compile,
                        compile_scope=args.compile_scope, warm_up_sizes=warm_up_sizes,
                        step_cache=args.step_cache, quantize=args.quantize,
                        gpus_per_worker=args.gpus_per_worker,
                        context_parallel=args.context_parallel, log_level=args.log_level,
                        log_format=args.log_format, curve=curve,
                        lora_dir=args.lora_dir, lora_repos=lora_repos,
                        lora_cache=args.lora_cache,
                        lora_cache_bytes=int(args.lora_cache_mb * (1 << 20)),
                        image_metadata=not args.no_image_metadata, marking=marking)


def _size(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"([0-9]{1,5})x([0-9]{1,5})", text.strip())  # ASCII digits only
    if match is None or not all(0 < int(side) <= 16384 for side in match.groups()):
        raise ValueError(f"--warm-up-size {text!r} is not WIDTHxHEIGHT (up to 16384 each)")
    return int(match[1]), int(match[2])


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

    setup_errors = (LoraSetupError, step_cache.StepCacheError, quantize.QuantizeError,
                    parallel.ParallelError)

    worker = Worker(config)
    logs.add_static_fields(worker_id=worker.worker_id)  # the default id is made just now
    if config.quantize == quantize.NONE:
        # diffusers imports torchao whenever it is installed; without --quantize its warnings
        # about GPU kernels it could not load (on any CPU host) concern nothing this runs.
        logging.getLogger("torchao").setLevel(logging.ERROR)
    if args.log_format == "json":
        from gpu_worker.pipeline import route_library_logs

        route_library_logs()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: worker.stop())
    try:
        worker.run()
    except setup_errors as exc:  # a flag that does not fit the model: a restart fails again
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
    return run_worker(environment.parse_args(parser, argv, "worker"))


if __name__ == "__main__":
    sys.exit(main())
