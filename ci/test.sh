#!/usr/bin/env bash
# The README's two commands, in a fresh virtual environment.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# --- README: install ---
pip install -e '.[test]'
# --- README: test ---
python -m pytest -n 2
