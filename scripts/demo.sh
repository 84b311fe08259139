#!/usr/bin/env bash
# The main job: installs what it needs into .venv (CPU torch 2.13.0 unless a torch is already
# there, the project) and runs the offline demo on the bundled micro model.
# Extra arguments go to `dynasyn demo`, e.g. `bash scripts/demo.sh --out /tmp/demo --overwrite`.
set -euo pipefail
# shellcheck source=scripts/_setup.sh
. "$(dirname "$0")/_setup.sh"
python -c "import dynasyn" 2>/dev/null || pip install -e .
exec dynasyn demo "$@"
