# Entry points for developers and CI; each target is a thin call into deploy/local/ or the venv's tools.
#   make up | down | test | lint | bench | demo
#   PYTEST_ARGS="-k name -x" passes through to pytest; BENCH=bench_ingest runs one benchmark.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
export PATH := $(CURDIR)/.venv/bin:$(PATH)

PYTEST_ARGS ?=
BENCH ?=

.PHONY: install up down test lint bench demo

install:
	deploy/local/install.sh

up: install
	deploy/local/up.sh

down:
	deploy/local/down.sh

test: up
	. .local/env && .venv/bin/pytest tests --ignore=tests/bench -q $(PYTEST_ARGS)

lint: install
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
	.venv/bin/mypy

bench: up
	. .local/env && .venv/bin/python tests/bench/run.py $(BENCH)

demo: up
	. .local/env && .venv/bin/meterline demo
