#!/usr/bin/env bash
# The main job: installs what it needs into .venv (CPU torch 2.13.0 unless a torch is already
# there, the project) and runs the offline demo on the bundled micro model.
# Extra arguments go to `dynasyn demo`, e.g. `bash scripts/demo.sh --out /tmp/demo --overwrite`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
pip() { python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
python -c "import dynasyn" 2>/dev/null || pip install -e .
exec dynasyn demo "$@"
