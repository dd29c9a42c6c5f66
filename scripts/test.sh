#!/usr/bin/env bash
# Set up a virtual environment (once) and run the default test suite.
# pytest exits 5 when it collects no test: that counts as a failure here.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet -e '.[dev]'
export QUANTZOO_DATA_DIR="${QUANTZOO_DATA_DIR:-$(cd .. && pwd)/shared/data}"
.venv/bin/python -m pytest -q "$@"
