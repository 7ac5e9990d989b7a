#!/usr/bin/env bash
# Runs every test environment (tox.ini) on a machine with only Python and pip.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-tox
.venv-tox/bin/python -m pip install -q --disable-pip-version-check "tox>=4.11"
exec .venv-tox/bin/tox run "$@"
