# The two commands of the README. Each creates .venv first if it is missing.
PY := .venv/bin/python
ARGS ?=

.PHONY: run test lint bench bench-gpu bootstrap

run:
	scripts/bootstrap
	$(PY) launch.py $(ARGS)

test:
	scripts/bootstrap test
	HF_HUB_OFFLINE=1 PY=$(PY) scripts/test-suite $(ARGS)

lint:
	scripts/bootstrap test
	$(PY) -m ruff check .

# Benchmarks 1-4 (bench/README.md): about five minutes on a laptop; prints tables and ratios.
bench:
	scripts/bootstrap test
	HF_HUB_OFFLINE=1 $(PY) bench/broker_overhead.py
	HF_HUB_OFFLINE=1 $(PY) bench/scheduling.py
	HF_HUB_OFFLINE=1 $(PY) bench/e2e_http.py
	HF_HUB_OFFLINE=1 $(PY) bench/batching.py
	HF_HUB_OFFLINE=1 $(PY) bench/postprocess.py
	HF_HUB_OFFLINE=1 $(PY) bench/previews.py
	HF_HUB_OFFLINE=1 $(PY) bench/loras.py

# Benchmark 5: real-size FLUX.1-schnell and SDXL-Turbo with random weights; needs CUDA.
bench-gpu:
	scripts/bootstrap
	HF_HUB_OFFLINE=1 $(PY) bench/gpu.py $(ARGS)
