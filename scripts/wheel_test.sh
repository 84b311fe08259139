#!/usr/bin/env bash
# The release check: build the sdist and the wheel (`python -m build`), install the wheel into a
# fresh venv OUTSIDE the checkout (so the source tree cannot be imported), and run it there:
# `dynasyn --version` and the offline `dynasyn demo`, whose grid must be written.
#
#   bash scripts/wheel_test.sh             # about 2 minutes on 2 quiet CPU cores
#   KEEP=1 bash scripts/wheel_test.sh      # keep the temporary folder (printed) for a look
#
# Torch is installed first (TORCH_SPEC, default torch==2.13.0, the CPU build here), then the
# wheel, whose other dependencies come from the package index. Nothing is written to the
# checkout except what `python -m build` itself leaves (src/dynasyn.egg-info, ignored by git).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
TMP=$(mktemp -d "${TMPDIR:-/tmp}/dynasyn-wheel.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then
  echo "wheel_test: keeping $TMP"
else
  trap 'rm -rf "$TMP"' EXIT
fi
cd "$TMP"   # away from the checkout: `import dynasyn` must find the installed wheel only
pip() { python -m pip --disable-pip-version-check -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
step() { printf 'wheel_test: %s (%ds)\n' "$1" "$SECONDS"; }

step "fresh venv in $TMP/venv"
"$PY" -m venv "$TMP/venv"
# shellcheck disable=SC1091
. "$TMP/venv/bin/activate"
pip install build

step "python -m build (sdist, then the wheel from the sdist)"
python -m build --outdir "$TMP/dist" "$REPO" > "$TMP/build.log" 2>&1 \
  || { tail -20 "$TMP/build.log" >&2; echo "wheel_test: FAIL: python -m build" >&2; exit 1; }
WHEEL=$(ls "$TMP"/dist/dynasyn-*.whl)
step "built $(basename "$WHEEL") ($(du -k "$WHEEL" | cut -f1) KB)"
# the wheel must carry every file of the bundled micro model
want=$(cd "$REPO/src" && find dynasyn/micro/weights -type f | sort)
have=$(python -c "import sys, zipfile; print('\n'.join(sorted(n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.startswith('dynasyn/micro/weights/') and not n.endswith('/'))))" "$WHEEL")
if [ -z "$want" ] || [ "$want" != "$have" ]; then
  echo "wheel_test: FAIL: the wheel's micro weights differ from src/dynasyn/micro/weights:" >&2
  diff <(echo "$want") <(echo "$have") >&2 || true
  exit 1
fi
step "the wheel carries the $(echo "$want" | wc -l) files of src/dynasyn/micro/weights"
# ... and every module of the package (a folder without __init__.py would be left out)
want=$(cd "$REPO/src" && find dynasyn -name '*.py' -not -path '*/__pycache__/*' | sort)
have=$(python -c "import sys, zipfile; print('\n'.join(sorted(n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.endswith('.py'))))" "$WHEEL")
if [ "$want" != "$have" ]; then
  echo "wheel_test: FAIL: the wheel's modules differ from src/dynasyn (< source, > wheel):" >&2
  diff <(echo "$want") <(echo "$have") >&2 || true
  exit 1
fi
step "the wheel carries the $(echo "$want" | wc -l) modules of src/dynasyn"

step "pip install $TORCH_SPEC"
pip install "$TORCH_SPEC"
step "pip install the wheel"
pip install "$WHEEL"

where=$(python -c "import dynasyn; print(dynasyn.__file__)")
case "$where" in
  "$TMP/venv/"*) ;;
  *) echo "wheel_test: FAIL: dynasyn imported from $where, not from the fresh venv" >&2; exit 1 ;;
esac
version=$(python -c "import dynasyn; print(dynasyn.__version__)")
case "$(basename "$WHEEL")" in
  "dynasyn-$version-"*) ;;
  *) echo "wheel_test: FAIL: __version__ $version is not the wheel's ($(basename "$WHEEL"))" >&2; exit 1 ;;
esac
cli_version=$(dynasyn --version)
case "$cli_version" in
  *"$version"*) ;;
  *) echo "wheel_test: FAIL: 'dynasyn --version' says '$cli_version', not $version" >&2; exit 1 ;;
esac
step "dynasyn --version: $cli_version (imported from $where)"

# one torch thread by default: on a CPU shared with other jobs, several spinning threads per
# process slow everything down many times over (WHEEL_TEST_THREADS=2 on a machine of your own)
step "dynasyn demo --out $TMP/demo (${WHEEL_TEST_THREADS:-1} thread(s))"
OMP_NUM_THREADS=${WHEEL_TEST_THREADS:-1} dynasyn demo --out "$TMP/demo" --no-progress
if [ ! -s "$TMP/demo/demo_grid.png" ]; then
  echo "wheel_test: FAIL: dynasyn demo wrote no $TMP/demo/demo_grid.png" >&2
  exit 1
fi
python -c "from PIL import Image; import sys; Image.open(sys.argv[1]).verify()" "$TMP/demo/demo_grid.png"
step "OK: the wheel installs outside the checkout and runs the demo"
