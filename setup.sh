#!/usr/bin/env bash
# One-shot, idempotent setup on a fresh machine: a venv in .venv, torch 2.13.0 (CPU) first,
# then the project with its dev extras, and the Fashion-MNIST data from Debian when apt is there.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  "${PIP[@]}" install -c constraints.txt "torch==2.13.0"
fi
"${PIP[@]}" install -c constraints.txt -e ".[dev]"

# Real data: Debian ships Fashion-MNIST as IDX files. Install it when missing and apt is usable.
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
      || echo "setup: could not install dataset-fashion-mnist; pass dataset.data_dir=... (see README)" >&2
  else
    echo "setup: dataset-fashion-mnist not installed and apt unavailable; pass dataset.data_dir=... (see README)" >&2
  fi
fi
