# Entry points. Each target runs setup first (idempotent: seconds when nothing changed).
#   make run    the whole workflow on config/config.yaml, all cores
#   make test   the test suite (unit, end-to-end workflow, real local Slurm cluster when root)
#   make lint   snakefmt, snakemake --lint, ruff
VENV := .venv
BIN := $(VENV)/bin
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: setup run test lint dry-run

setup:
	tools/setup.sh

run: setup
	snakemake --cores all

dry-run: setup
	snakemake -n

test: setup
	tools/run_tests.sh

lint: setup
	snakefmt --check Snakefile workflow
	snakemake --lint
	ruff check .
	ruff format --check .
