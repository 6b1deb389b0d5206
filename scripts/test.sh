#!/usr/bin/env bash
# Install with the test extras, lint and type-check, then run the whole test suite (it starts its
# own nats-server and redis-server on free ports).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXTRAS="[test]" bash scripts/setup.sh
# the web page test (tests/test_ui.py) drives a real headless Chromium: Debian's, when missing
if ! command -v chromium >/dev/null && command -v apt-get >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq && $sudo apt-get install -y -qq --no-install-recommends chromium \
    || echo "could not install chromium: tests/test_ui.py will fail; install it by hand" >&2
fi
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
.venv/bin/python -m ruff check .  # the lint rules: pyproject.toml's [tool.ruff]
.venv/bin/python -m mypy  # the types of the seven packages: pyproject.toml's [tool.mypy]
.venv/bin/python -m pytest -q "$@"
