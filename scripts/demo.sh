#!/usr/bin/env bash
# Sets up a virtual environment with adapterkit and the method plugins, then runs the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-demo
.venv-demo/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e . -e plugins/lora transformers
exec .venv-demo/bin/python examples/quickstart.py "$@"
