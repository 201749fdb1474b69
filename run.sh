#!/usr/bin/env bash
# bash run.sh --dataset demo [options]    run an experiment (python main.py run ...)
# bash run.sh tests [pytest args]         run the test suite
# bash run.sh bench|prepare|serve|update|stream|ddp-check ... any other main.py command
# On first use it creates .venv and installs the pinned dependencies (torch==2.13.0 first).
set -euo pipefail
cd "$(dirname "$0")"
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(sha256sum requirements.txt | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing dependencies into $VENV (once) ..." >&2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.txt
  touch "$stamp"
fi
export PYTHONUNBUFFERED=1
case "${1:-}" in
  tests) shift; exec "$VENV/bin/python" -m pytest -q tests "$@" ;;
  run|bench|prepare|shrink|export|recommend|evaluate|ab|serve|profiles|update|versions|stream|synth|ddp-check)
    exec "$VENV/bin/python" main.py "$@" ;;
  -h|--help) exec "$VENV/bin/python" main.py run --help ;;
  *) exec "$VENV/bin/python" main.py run "$@" ;;
esac
