#!/usr/bin/env bash
# Installs what the tests need into .venv (CPU torch 2.13.0 unless a torch is already there,
# the project with its test extra, the CLIP BPE vocab) and runs the default test set.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
pip() { python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
pip install -e ".[test]"
python -c "import importlib.util as u; assert u.find_spec('open_clip')" 2>/dev/null \
  || pip install --no-deps open-clip-torch
python -c "import torch, diffusers, transformers; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__)"
exec python -m pytest "$@"
