#!/usr/bin/env bash
# One command on a GPU machine: probe the devices, doctor --json, parity on the device per family, a
# medium-preset bench, a short train (determinism, cross-backend resume) and a tinygrad JIT-cache hit, each
# under its own timeout; writes devcheck-report.json (see twinlm/devcheck.py). No network needed.
# Usage: scripts/devcheck.sh [--dry-run] [--device SPEC] [--out FILE]
set -euo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-.venv/bin/python}"
[ -x "$py" ] || py=python3
exec "$py" -m twinlm.devcheck "$@"
