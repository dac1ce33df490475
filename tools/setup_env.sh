#!/usr/bin/env bash
# One-command environment for nat_mm: creates .venv/ in the repository root and installs, in order,
# torch, the build tools, mmcv 2.1.0 with its compiled ops (built once into a wheel cache outside the
# repository), mmdet, mmsegmentation, pycocotools, the dev tools, onnx / onnxruntime / onnxscript
# (the `export` extra) and nat_mm itself (editable).
#
# Re-running it on a ready environment takes a second: a stamp records what was installed.
#
# Environment knobs (all optional):
#   PYTHON               interpreter for the venv (default: python3; needs >= 3.10)
#   NAT_MM_CACHE         wheel cache folder (default: ~/.cache/nat_mm)
#   NAT_MM_TORCH         torch requirement (default: torch==2.13.0)
#   NAT_MM_TORCH_CPU_INDEX  index with CPU-only torch wheels, used on machines without CUDA when the
#                        default resolution would pick a CUDA build (default: PyTorch's CPU index)
#   MAX_JOBS             parallel compile jobs for mmcv (default: number of cores)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)
CACHE="${NAT_MM_CACHE:-$HOME/.cache/nat_mm}"
TORCH_REQ="${NAT_MM_TORCH:-torch==2.13.0}"
TORCH_CPU_INDEX="${NAT_MM_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
MMCV_VERSION=2.1.0
STAMP="$VENV/.nat_mm_setup"

log() { printf '[setup %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { printf '[setup] ERROR: %s\n' "$*" >&2; exit 1; }

# The stamp is the hash of everything that decides what gets installed.
want_stamp=$(cat "$ROOT/tools/setup_env.sh" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want_stamp" && -x "$PY" ]]; then
    log "environment ready: $VENV (delete $STAMP to force a re-install)"
    exit 0
fi

has_cuda() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

# --- 1. the virtual environment -----------------------------------------------------------------
if [[ ! -x "$PY" ]]; then
    base_py="${PYTHON:-python3}"
    "$base_py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
        || die "nat_mm needs Python >= 3.10; PYTHON=$base_py is $("$base_py" --version 2>&1)"
    log "creating $VENV with $("$base_py" --version 2>&1)"
    "$base_py" -m venv "$VENV"
fi

# --- 2. torch: the CPU wheel on a machine without CUDA ------------------------------------------
if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
    torch_args=("$TORCH_REQ")
    if ! has_cuda; then
        # Ask pip what it would pick; a CUDA build on a CPU machine means several GB for nothing.
        picked=$("${PIP[@]}" install --dry-run --quiet --no-deps --report - "$TORCH_REQ" 2>/dev/null \
            | "$PY" -c 'import json,sys; r=json.load(sys.stdin)["install"]; print(r[0]["metadata"]["version"] if r else "")' \
            || true)
        if [[ "$picked" != *+cpu ]]; then
            log "no CUDA here and the default index offers torch '$picked': using $TORCH_CPU_INDEX"
            torch_args+=(--index-url "$TORCH_CPU_INDEX" --extra-index-url https://pypi.org/simple)
        fi
    fi
    log "installing ${torch_args[*]}"
    "${PIP[@]}" install --quiet "${torch_args[@]}"
fi

# --- 3. build tools (setuptools < 82 keeps pkg_resources for mmcv's setup.py and mmengine) -------
"${PIP[@]}" install --quiet numpy ninja 'setuptools<82' wheel
TORCH_VERSION=$("$PY" -c 'import torch; print(torch.__version__)')
log "torch $TORCH_VERSION"

# --- 4. mmcv with compiled ops, from the wheel cache or built once into it ----------------------
PY_TAG=$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')
WHEEL_DIR="$CACHE/wheels/mmcv-${MMCV_VERSION}_torch-${TORCH_VERSION}_${PY_TAG}"

build_mmcv() {
    local work="$CACHE/build/mmcv-${MMCV_VERSION}_torch-${TORCH_VERSION}_${PY_TAG}"
    local blog="$work.log"
    rm -rf "$work" && mkdir -p "$work"
    "${PIP[@]}" download --quiet --no-deps --no-binary :all: "mmcv==$MMCV_VERSION" -d "$work"
    tar -xzf "$work/mmcv-$MMCV_VERSION.tar.gz" -C "$work"
    local src="$work/mmcv-$MMCV_VERSION"
    # torch >= 2.10 headers need C++20; mmcv 2.1.0 hard-codes -std=c++14/17.
    sed -i -E 's/(-std=|\/std:)c\+\+1[47]/\1c++20/g' "$src/setup.py"
    local jobs="${MAX_JOBS:-$(nproc)}"
    log "building mmcv $MMCV_VERSION with compiled ops ($jobs jobs; ~15-20 min on 2 idle cores, once)"
    log "full build log: $blog"
    # -g0: no debug info (smaller wheel, faster compile).
    (cd "$src" && MAX_JOBS="$jobs" CFLAGS="-g0" CXXFLAGS="-g0" "${PIP[@]}" wheel -v \
        --no-build-isolation --no-deps -w "$work/dist" . >"$blog" 2>&1) &
    local pid=$! start=$SECONDS
    while kill -0 "$pid" 2>/dev/null; do
        sleep 30
        local step total elapsed
        step=$(grep -oE '^\s*\[[0-9]+/[0-9]+\]' "$blog" | tail -n1 | tr -d ' []' || true)
        elapsed=$((SECONDS - start))
        if [[ "$step" == */* && "${step%/*}" -gt 0 ]]; then
            total=${step#*/}
            log "mmcv build: $step objects compiled, $((elapsed / 60)) min elapsed," \
                "~$(((total - ${step%/*}) * elapsed / ${step%/*} / 60)) min left"
        else
            log "mmcv build: preparing ($((elapsed / 60)) min elapsed)"
        fi
    done
    wait "$pid" || { tail -n 40 "$blog" >&2; die "mmcv build failed; see $blog"; }
    mkdir -p "$WHEEL_DIR.tmp" && cp "$work"/dist/mmcv-*.whl "$WHEEL_DIR.tmp/"
    rm -rf "$WHEEL_DIR" && mv "$WHEEL_DIR.tmp" "$WHEEL_DIR"  # publish the cache entry atomically
    rm -rf "$work"
    log "mmcv wheel cached in $WHEEL_DIR ($(((SECONDS - start) / 60)) min)"
}

if ! "$PY" -c 'import mmcv, mmcv._ext; assert mmcv.__version__ == "'$MMCV_VERSION'"' >/dev/null 2>&1; then
    if ! compgen -G "$WHEEL_DIR/mmcv-*.whl" >/dev/null; then
        build_mmcv
    else
        log "mmcv $MMCV_VERSION from the wheel cache $WHEEL_DIR"
    fi
    # --no-deps: its runtime deps come with the nat_mm install below, which requires mmcv==2.1.0.
    "${PIP[@]}" install --quiet --no-deps --force-reinstall "$WHEEL_DIR"/mmcv-*.whl
fi

# --- 5. the OpenMMLab libraries, dev tools and nat_mm itself -----------------------------------
log "installing mmdet, mmsegmentation, pycocotools, dev tools, ONNX export tools and nat_mm (editable)"
"${PIP[@]}" install --quiet --no-build-isolation -e "${ROOT}[openmmlab,dev,export]"

# panopticapi (mmdet's COCO panoptic loading and PQ metric) is git-only upstream; panopticapi-lite
# ships the same module. --no-deps: its metadata pins numpy<2, which the code itself does not need.
if ! "$PY" -c 'import panopticapi' >/dev/null 2>&1; then
    "${PIP[@]}" install --quiet --no-deps panopticapi-lite==0.2.0
fi

# NATTEN: pure Python on a CPU machine (its Flex backend); on CUDA its kernels need a long source
# build or NATTEN's own wheels, so it is left to the user there (pip install natten, see README).
if ! has_cuda && ! "$PY" -c 'import natten' >/dev/null 2>&1; then
    log "installing NATTEN (pure Python, CPU)"
    "${PIP[@]}" install --quiet --no-build-isolation --no-deps natten==0.21.7
fi

# --- 6. known breakages of the stack, fixed in the environment ---------------------------------
# The mmsegmentation wheel ships a stray top-level `tests` package that shadows any project's tests.
"$PY" - <<'EOF'
import importlib.metadata as md, pathlib, shutil
dist = md.distribution('mmsegmentation')
stray = {f.parts[0] for f in dist.files or [] if f.parts and f.parts[0] == 'tests'}
for name in stray:
    path = pathlib.Path(dist.locate_file(name))
    if path.is_dir():
        shutil.rmtree(path)
        print(f'[setup] removed the stray package {path} installed by mmsegmentation')
EOF

"$PY" -c 'import nat_mm, mmdet, mmseg, mmcv.ops, torch; print("[setup] ok: torch", torch.__version__, "mmcv", mmcv.__version__, "mmdet", mmdet.__version__, "mmseg", mmseg.__version__)'
echo "$want_stamp" >"$STAMP"
log "environment ready: $VENV"
