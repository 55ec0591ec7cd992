#!/usr/bin/env bash
# Set up .venv and run the linter (ruff lint + format check) and the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh train,cpu,serve,dev,track
export BENTOML_DO_NOT_TRACK=True
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/python -m pytest -q "$@"
