#!/usr/bin/env bash
# Create .venv (if missing) and install LegoDiffusion and its Python client (clients/python, the
# package legoclient, which `lego generate` and `lego history` use) into it. Sourced by demo.sh
# and test.sh.
# EXTRAS: pip extras to add, e.g. "[test]".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# torch first, pinned: on a CPU machine with a local wheel this takes the CPU build; a GPU
# machine may install any torch>=2.4 before running this script.
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -e ./clients/python -e ".${EXTRAS:-}"
