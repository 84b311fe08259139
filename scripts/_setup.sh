# Sourced by test.sh and demo.sh: make .venv and install CPU torch 2.13.0 unless a torch is
# already there (e.g. your CUDA build).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
pip() { python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
python -c "import torch" 2>/dev/null || pip install "torch==2.13.0"
