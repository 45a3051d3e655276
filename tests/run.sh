#!/usr/bin/env bash
# Run the whole test suite (unit, integration, end-to-end) plus lint and type checks.
set -euo pipefail
cd "$(dirname "$0")/.."
export TCP_NODELAY=1
.venv/bin/ruff check node workers models tests bench tools testkit
.venv/bin/mypy
.venv/bin/python -m pytest -ra "$@"
