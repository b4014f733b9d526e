#!/usr/bin/env bash
# The README's test command: installs everything the tests need on a fresh machine, then runs them.
# Python packages go into .venv (created on first run); the browser tests need Debian's Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
  "${PYTHON:-python3}" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -r requirements-dev.txt

if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "Installing Chromium for the browser tests..."
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "Chromium is not installed and cannot be installed here: the browser tests will be skipped."
  fi
fi

# The MobileSAM weights (38 MB, hash-checked) into ./models once, so the tests run with the real model.
.venv/bin/python -m model_weights models || echo "Could not fetch the MobileSAM weights: the MobileSAM tests will fail."

exec .venv/bin/python -m pytest "$@"
