#!/usr/bin/env bash
# Installs what the tests need into .venv (CPU torch 2.13.0 unless a torch is already there,
# the project with its test and ui extras, the CLIP BPE vocab) and runs the default test set.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m slow`.
set -euo pipefail
# shellcheck source=scripts/_setup.sh
. "$(dirname "$0")/_setup.sh"
pip install -e ".[test]"
python -c "import importlib.util as u; assert u.find_spec('open_clip')" 2>/dev/null \
  || pip install --no-deps open-clip-torch
# The browser test (tests/test_ui_browser.py) needs the ui extra, Playwright for Python and
# Debian's chromium (never a Playwright browser download). Best effort: whatever cannot be
# installed makes that test skip, not this run fail. chromium is installed only when asked
# (DYNASYN_INSTALL_CHROMIUM=1, as .ci/run does) and apt-get is usable.
pip install -e ".[ui]" playwright \
  || echo "scripts/test.sh: the ui extra / playwright did not install; the browser test will skip" >&2
if [ "${DYNASYN_INSTALL_CHROMIUM:-0}" = 1 ] && ! command -v chromium >/dev/null 2>&1 \
   && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  { timeout 600 apt-get install -y -q chromium >/dev/null 2>&1 \
    || { timeout 300 apt-get update -q >/dev/null 2>&1 \
         && timeout 600 apt-get install -y -q chromium >/dev/null 2>&1; }; } \
    || echo "scripts/test.sh: chromium did not install; the browser test will skip" >&2
fi
python -c "import torch, diffusers, transformers; print('torch', torch.__version__, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__)"
exec python -m pytest "$@"
