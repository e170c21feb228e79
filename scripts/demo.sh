#!/usr/bin/env bash
# Set up (idempotent), then run the main job on an embedded default: a local fleet on this machine
# (Redis, SQLite dedup/status database, 2 Celery workers, Flower) converts a built-in sample image
# into overlaybd, verifies it, and prints the result. Extra arguments go to `obdconv fleet`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/obdconv fleet "$@"
