#!/usr/bin/env bash
# Ray Serve (and diffusers) for the GPU machine, which has neither and no network, in one archive small enough to
# travel with the repository (the device tool carries at most 64 MiB):
#
#   scripts/pack_ray_for_device.sh [PYTHON_VERSION]    -> .raypack/ray.tar.xz (+ .raypack/models, the model configs)
#
# On the device (Python 3.12 there; see docs/RAY.md for the whole command):
#   mkdir -p /tmp/site && tar -xJf .raypack/ray.tar.xz -C /tmp/site && export PYTHONPATH=/tmp/site
#
# It downloads the wheels of ray[serve] and diffusers for that Python on manylinux x86_64, leaves out what the device
# already has (torch's and transformers' dependencies) and what Serve never runs with its HTTP proxy off (py-spy,
# virtualenv for runtime-env venvs, uvloop), unpacks them into one site folder, drops the parts of Ray that Serve
# does not import (the Java jars, RLlib, Tune, Train, Data, AIR, LLM, the dashboard's web client, tests), checks that
# nothing left behind imports a dropped package, and compresses it with xz -9.
# .raypack/ is kept out of git through .git/info/exclude (shared by every worktree of this repository).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON_VERSION="${1:-3.12}"
OUT="${OUT:-.raypack}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
PIP="${PIP:-.venv/bin/pip}"

# On the device already (the torch, transformers, accelerate, pandas, pytest stacks): newer copies here would shadow
# the device's own, since PYTHONPATH comes first on sys.path.
ON_DEVICE="numpy packaging pyyaml typing_extensions filelock jinja2 markupsafe fsspec huggingface_hub safetensors
 regex tqdm pillow"
# Not run by Serve with its proxy off: profiling (py-spy), venv runtime environments (virtualenv and its helpers),
# an optional faster event loop (uvloop; Ray falls back to asyncio).
NOT_NEEDED="py_spy virtualenv distlib platformdirs python_discovery uvloop"
# Parts of the ray package that Serve and Ray core never import (checked below).
DROP_DIRS="ray/jars ray/rllib ray/tune ray/train ray/data ray/air ray/llm ray/serve/llm ray/dashboard/client"

"$PIP" download --quiet --dest "$WORK/wheels" --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
  "ray[serve]==2.60.0" "diffusers==0.42.1" importlib_metadata 2>&1 | grep -v "is ignored" || true

# A wheel is a zip; Python's zipfile module drops the file modes, and Ray's raylet and GCS server must stay executable.
unpack() {
  python3 - "$1" "$2" <<'PY'
import sys, zipfile
from pathlib import Path
with zipfile.ZipFile(sys.argv[1]) as wheel:
    for info in wheel.infolist():
        path = Path(wheel.extract(info, sys.argv[2]))
        mode = (info.external_attr >> 16) & 0o777
        if mode and not info.is_dir():
            path.chmod(mode)
PY
}

mkdir -p "$WORK/site"
for wheel in "$WORK"/wheels/*.whl; do
  name="$(basename "$wheel" | cut -d- -f1 | tr '[:upper:]' '[:lower:]')"
  skip=""
  for excluded in $ON_DEVICE $NOT_NEEDED; do [ "$name" = "$excluded" ] && skip=1; done
  if [ -n "$skip" ]; then echo "left out: $(basename "$wheel")"; continue; fi
  unpack "$wheel" "$WORK/site"
done

for dir in $DROP_DIRS; do rm -rf "${WORK:?}/site/$dir"; done
find "$WORK/site" -type d \( -name tests -o -name __pycache__ \) -prune -exec rm -rf {} +
# Ray's binaries ship with their symbol tables (about a quarter of their size); running needs only the dynamic ones.
if command -v strip >/dev/null && command -v file >/dev/null; then
  find "$WORK/site/ray" -type f \( -name "*.so" -o -perm -u+x \) -exec sh -c 'file -b "$1" | grep -q "^ELF" && strip --strip-unneeded "$1"' _ {} \;
fi
# Ray's console scripts point at their entry modules; the device calls `python3 -m ...` and ray.init, never them.
rm -rf "$WORK/site/bin"

# Nothing that stays may import what was dropped at module level (lazy imports inside functions are fine).
dropped_modules="$(echo "$DROP_DIRS" | tr ' ' '\n' | grep -v "dashboard/client\|air/examples" | sed 's|/|.|g' | paste -sd'|')"
if grep -rEn "^(from|import) ($dropped_modules)([. ]|$)" "$WORK/site/ray" --include=*.py; then
  echo "some module that stays imports a dropped package at import time (above): keep that package" >&2
  exit 1
fi

mkdir -p "$OUT"
rm -f "$OUT/ray.tar.xz"
echo "unpacked: $(du -sh "$WORK/site" | cut -f1); compressing (xz -9, a few minutes)..."
XZ_OPT="-9 -T0" tar -cJf "$OUT/ray.tar.xz" -C "$WORK/site" .
# The model configs the benchmarks build their full-size models from (a few hundred kB).
rm -rf "$OUT/models" && cp -r "${SHARED_MODELS_DIR:-../shared/models}" "$OUT/models" && chmod -R u+w "$OUT/models"
grep -qxF ".raypack/" "$(git rev-parse --git-path info/exclude)" || echo ".raypack/" >> "$(git rev-parse --git-path info/exclude)"
echo "wrote $OUT/ray.tar.xz ($(du -h "$OUT/ray.tar.xz" | cut -f1)) for Python $PYTHON_VERSION, and $OUT/models"
