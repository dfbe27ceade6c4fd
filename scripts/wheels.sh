#!/usr/bin/env bash
# Wheels for the GPU machine, which has no network: CPython 3.12 on x86-64 Linux, binary only, no dependencies
# resolved (name each one). Shared by `scripts/reference_model.sh` and `scripts/gpu_checks.sh`.
#
#   scripts/wheels.sh fetch DIR NAME==VERSION...   # here, with the registry: → DIR/*.whl, then lists DIR with its size
#   scripts/wheels.sh install DIR WHEEL...         # there, offline: into DIR of its own (put DIR on PYTHONPATH)
#
# PYTHON: the interpreter whose pip runs (default .venv/bin/python if present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
(( $# >= 3 )) || { sed -n '2,8p' "$0"; exit 2; }
action=$1 dir=$2
shift 2
case $action in
  fetch)
    mkdir -p "$dir"
    # pip matches each manylinux tag exactly: name the ones this project's wheels use (torchao: 2_24/2_28).
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
      -d "$dir" "$@"
    ls -la "$dir"
    du -sh "$dir"
    ;;
  install)
    rm -rf "$dir"
    echo "installing into $dir: $(basename -a "$@" | tr '\n' ' ')"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
      --target "$dir" "$@"
    ;;
  *) echo "error: unknown action '$action' (fetch or install)" >&2; exit 2 ;;
esac
