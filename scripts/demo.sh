#!/usr/bin/env bash
# Install, then run the main job: the whole stack on the embedded default (its own nats-server,
# the shared-memory store, tiny models built on first use) generates fox.png and stops.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
EXTRAS="" bash scripts/setup.sh
export HF_HUB_OFFLINE=1
.venv/bin/lego generate "a red fox in the snow" --seed 42 -o fox.png
