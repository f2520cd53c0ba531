#!/usr/bin/env bash
# The prepared GPU check, as run on a lent GPU machine (no network; PyTorch and numpy there, not
# dlpipe's other dependencies). Prepare once where PyPI is reachable: `make gpu-wheels` puts
# dlpipe's core dependencies (google-crc32c, click, isal) for CPython 3.10-3.13 in .gpu-wheels/.
# On the GPU machine, from the repository root (the device tool: carry .gpu-wheels):
#
#     bash bench/gpu_run.sh [gpu_check.py options, e.g. --quick]
#
# The wheels matching this interpreter are unpacked into a temporary folder on PYTHONPATH (no pip
# needed), dlpipe is imported from this checkout, and bench/gpu_check.py writes its results to
# $OUT/gpu-check (default ./gpu-check), packed as gpu-check.tgz beside results.json/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
dest=${OUT:-.}/gpu-check
site=$(mktemp -d)
trap 'rm -rf "$site"' EXIT
tag=$("$PYTHON" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
shopt -s nullglob
for wheel in .gpu-wheels/*-py3-none-any.whl .gpu-wheels/*-"$tag"-"$tag"-*.whl; do
  "$PYTHON" -m zipfile -e "$wheel" "$site"
done
missing=$(PYTHONPATH="$site" "$PYTHON" -c '
import importlib.util
print(" ".join(m for m in ("google_crc32c", "click", "numpy", "torch") if importlib.util.find_spec(m) is None))')
if [ -n "$missing" ]; then
  echo "gpu_run.sh: $missing not importable by $PYTHON ($tag); run make gpu-wheels where PyPI is reachable and carry .gpu-wheels" >&2
  exit 1
fi
mkdir -p "$dest"
status=0
PYTHONPATH="$PWD:$site" PYTHONUNBUFFERED=1 "$PYTHON" bench/gpu_check.py --out "$dest/run" "$@" || status=$?
cp "$dest"/run/results.json "$dest"/run/results.md "$dest"/ 2>/dev/null || true
tar czf "$dest/gpu-check.tgz" -C "$dest" run
exit $status
