#!/usr/bin/env bash
# Start a whole fleet on this machine (Redis, SQLite, N workers, Flower), convert a sample image,
# and keep it running for you to submit more (`obdconv submit ...` with the printed environment).
# Usage: deploy/local-fleet.sh [WORKERS]   (Ctrl-C stops everything)
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m obdconv fleet --workers "${1:-2}" --keep-running
