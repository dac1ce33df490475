# The two commands of the README, and a few for developers.
#   make demo   set up, then run the main job on the embedded default data
#   make test   set up, then run the test suite (slow tests: make test-slow)
#   make lint   ruff (lint + format) and shellcheck
PY := .venv/bin/python
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: setup demo test test-slow lint format clean-env

setup:
	@bash tools/setup_env.sh

demo: setup
	$(PY) tools/main_job.py $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/shellcheck tools/*.sh .ci/run

format: setup
	.venv/bin/ruff format .
	.venv/bin/ruff check --fix .

clean-env:
	rm -rf .venv
