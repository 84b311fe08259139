#!/usr/bin/env bash
# Installs what the tests need into .venv (CPU torch 2.13.0 unless a torch is already there,
# the project with its test extra, the CLIP BPE vocab) and runs the default test set.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow`.
set -euo pipefail
# shellcheck source=scripts/_setup.sh
. "$(dirname "$0")/_setup.sh"
pip install -e ".[test]"
python -c "import importlib.util as u; assert u.find_spec('open_clip')" 2>/dev/null \
  || pip install --no-deps open-clip-torch
python -c "import torch, diffusers, transformers; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__)"
exec python -m pytest "$@"
