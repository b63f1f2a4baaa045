# The two commands of the README. Each creates .venv first if it is missing.
PY := .venv/bin/python
ARGS ?=

.PHONY: run test lint bootstrap

run:
	scripts/bootstrap
	$(PY) launch.py $(ARGS)

test:
	scripts/bootstrap test
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(ARGS)

lint:
	scripts/bootstrap test
	$(PY) -m ruff check .
