#!/usr/bin/env bash
# Sets up everything fxpeft needs on a fresh machine, idempotently: a virtualenv in .venv with the CPU
# build of torch 2.13.0 (installed first, so that no range pulls a multi-GB CUDA build), fxpeft itself
# (editable) with its test/bench extras, and Graphviz's `dot` for the visualiser.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==2.13.0" 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import torch, fxpeft, transformers, peft, hypothesis" \
  || { echo "setup: the Python install failed (see pip's output above)" >&2; exit 1; }
if ! command -v dot >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz) >/dev/null \
      || echo "setup: could not install graphviz; rendering falls back to .dot files" >&2
  else
    echo "setup: Graphviz's 'dot' is missing; install it with: sudo apt-get install graphviz" >&2
  fi
fi
echo "setup: ok ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
