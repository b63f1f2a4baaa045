#!/usr/bin/env bash
# One GPU session's worth of measurements: every speed setting's speed (bench/gpu.py) and
# its images against plain's (bench/quality.py), for FLUX.1-schnell (1024², 4 steps) and
# SDXL-Turbo (512², 1 step), real-size with random weights. Run from anywhere:
#
#     bench/gpu_run.sh 2>&1 | tee gpu_run.log
#
# Budget: about 8 minutes on an H100-class GPU, a guess that no run has checked yet. Each
# step has its own time limit (below; STEP_LIMIT_S=N gives every step N seconds instead), 8
# minutes together, so that one slow setting cannot take the rest of the session; the scripts
# print each figure as it is measured, so a step stopped by its limit still leaves what it
# measured in the log. Repeats are few on purpose: a FLUX call takes seconds, and each
# compiled setting pays a compile warm-up (regional: the repeated blocks, well under a minute).
#
# Settings (bench/_settings.py): plain, each step cache (FLUX only: SDXL's UNet has no step
# caching in diffusers, so those rows say "not run" with the reason), each quantisation the
# GPU can run (fp8 needs compute capability 8.9+), and compile (regional, inductor).

set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export HF_HUB_OFFLINE=1

echo "== bench/gpu_run.sh, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader \
    2>/dev/null || echo "nvidia-smi: not available"
"$PY" - <<'EOF' || { echo "no CUDA device: nothing to measure here"; exit 2; }
import importlib
import sys

import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
for name in ("diffusers", "transformers", "torchao"):
    try:
        print(f"{name} {importlib.import_module(name).__version__}")
    except ImportError:
        print(f"{name} not installed")
if torch.cuda.is_available():
    print(f"device: {torch.cuda.get_device_name()}, capability "
          f"{'.'.join(map(str, torch.cuda.get_device_capability()))}")
else:
    sys.exit(2)
EOF

step() {  # step LIMIT_S SCRIPT ARGS...
    local limit=${STEP_LIMIT_S:-$1}
    shift
    echo
    echo "== step (limit ${limit} s): $*"
    local started=$SECONDS
    timeout --signal=INT --kill-after=20 "$limit" "$PY" "$@"
    local status=$?
    [ "$status" -eq 124 ] && echo "== stopped at the ${limit} s limit: the figures above are what it measured"
    echo "== step took $((SECONDS - started)) s (exit $status)"
}

# Speed: every setting; SDXL-Turbo is cheap enough for two batch sizes, FLUX gets batch 1
# (at 1024² one image is already 4,352 tokens a step: a full GPU).
step 75 bench/gpu.py --models sdxl-turbo --batches 1,4 --repeats 3 --setting all
step 210 bench/gpu.py --models flux-schnell --batches 1 --repeats 2 --setting all
# Quality: the same prompts and seeds with and without each setting.
step 150 bench/quality.py --models flux-schnell --prompts 2 --repeats 1 --setting all
step 45 bench/quality.py --models sdxl-turbo --prompts 4 --repeats 2 --setting all
echo
echo "== done in ${SECONDS} s"
