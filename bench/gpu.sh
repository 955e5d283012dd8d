#!/usr/bin/env bash
# bench/gpu.sh: forward, forward+backward and decode of open-mythos, the torch twin and the JAX twin in
# bfloat16 on an accelerator (a CUDA GPU; JAX also on a TPU), written as one markdown table.
#
#   bash bench/gpu.sh                      # install into .venv-accel, run, write $OUT/accelerator.md (or ./bench-out/)
#   bash bench/gpu.sh --out results.md     # the table there (raw times beside it: results.json)
#   bash bench/gpu.sh --no-install         # use $PYTHON (default: .venv/bin/python, else python3) as it is
#   bash bench/gpu.sh --dry-run            # print the plan, then run the Python part on the CPU, tiny inputs
#
# Installs (pins): torch==2.13.0 (PyPI's Linux x86_64 wheel bundles the CUDA 12 runtime; for another CUDA
# set TORCH_INDEX_URL, e.g. https://download.pytorch.org/whl/cu128), jax[cuda12] (jax[tpu] on a TPU host) at
# the repo's jax version (JAX_VERSION, default below), open-mythos==0.5.0 --no-deps, transformers (open-mythos'
# tokenizer module imports it) and this project. No network on the machine? Point WHEELHOUSE at a folder of
# wheels (pip download them elsewhere): pip then installs with --no-index --find-links "$WHEELHOUSE".
# The Python part is bench/accelerator.py (its docstring says what is timed). Budget: under 8 minutes
# (install ~2-3 min from a warm cache, the run ~2-4 min: two presets, 5 repeats). Nothing in CI runs it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_VERSION="2.13.0"
JAX_VERSION="${JAX_VERSION:-0.10.2}"      # the jax of the project's own environment (jax/jaxlib 0.10.2)
OPEN_MYTHOS_VERSION="0.5.0"
VENV="${VENV:-$ROOT/.venv-accel}"
OUT_PATH=""
DRY_RUN=0
INSTALL=1
if [[ -z "${PYTHON:-}" ]]; then   # the project's venv when there is one (--dry-run, --no-install), else python3
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="python3"; fi
fi
TIMEOUT_S="${TIMEOUT_S:-420}"             # the Python part's wall-clock limit (the install comes on top)

usage() { sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) [[ $# -ge 2 ]] || { echo "gpu.sh: --out needs a path" >&2; exit 2; }; OUT_PATH="$2"; shift 2 ;;
        --dry-run) DRY_RUN=1; shift ;;
        --no-install) INSTALL=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "gpu.sh: unknown argument '$1'; allowed: --out PATH, --dry-run, --no-install, --help" >&2; exit 2 ;;
    esac
done

if [[ -z "$OUT_PATH" ]]; then
    OUT_DIR="${OUT:-$ROOT/bench-out}"
    mkdir -p "$OUT_DIR"
    OUT_PATH="$OUT_DIR/accelerator.md"
fi
JSON_PATH="${OUT_PATH%.md}.json"

# which accelerator: CUDA (nvidia-smi), a TPU (its device files or TPU_NAME), else none
if command -v nvidia-smi > /dev/null 2>&1 && nvidia-smi -L > /dev/null 2>&1; then
    ACCEL="cuda"
    JAX_EXTRA="cuda12"
elif compgen -G "/dev/accel*" > /dev/null || compgen -G "/dev/vfio/[0-9]*" > /dev/null || [[ -n "${TPU_NAME:-}" ]]; then
    ACCEL="tpu"
    JAX_EXTRA="tpu"
else
    ACCEL="none"
    JAX_EXTRA=""
fi

PIP_SOURCE=()
if [[ -n "${WHEELHOUSE:-}" ]]; then
    PIP_SOURCE=(--no-index --find-links "$WHEELHOUSE")
fi
TORCH_SOURCE=("${PIP_SOURCE[@]}")
if [[ -n "${TORCH_INDEX_URL:-}" && -z "${WHEELHOUSE:-}" ]]; then
    TORCH_SOURCE=(--index-url "$TORCH_INDEX_URL")
fi
JAX_SPEC="jax==$JAX_VERSION"
if [[ -n "$JAX_EXTRA" ]]; then
    JAX_SPEC="jax[$JAX_EXTRA]==$JAX_VERSION"
fi

plan() {
    echo "accelerator: $ACCEL (torch: $([[ $ACCEL == cuda ]] && echo cuda || echo cpu); jax: its default backend)"
    if [[ $INSTALL -eq 1 ]]; then
        echo "1. $PYTHON -m venv $VENV"
        echo "2. pip install ${TORCH_SOURCE[*]} torch==$TORCH_VERSION"
        echo "3. pip install ${PIP_SOURCE[*]} '$JAX_SPEC' flax optax numpy pyyaml safetensors ml_dtypes typer rich transformers setuptools"
        echo "4. pip install ${PIP_SOURCE[*]} --no-deps open-mythos==$OPEN_MYTHOS_VERSION"
        echo "5. pip install --no-deps --no-build-isolation -e $ROOT"
    else
        echo "1-5. no install: $PYTHON as it is"
    fi
    echo "6. timeout $TIMEOUT_S python bench/accelerator.py --out $OUT_PATH --json $JSON_PATH"
    echo "   (forward, forward+backward, batch-1 decode; open-mythos under bf16 autocast, both twins in bf16;"
    echo "    bench-s-gqa 4x256 and bench-m-moe64 2x512 tokens, 8 loop steps, medians of 5)"
}

if [[ $DRY_RUN -eq 1 ]]; then
    echo "gpu.sh --dry-run: the plan on this machine:"
    plan
    echo
    echo "dry run: the Python part on the CPU, tiny inputs, with $PYTHON (no install):"
    cd "$ROOT"
    "$PYTHON" bench/accelerator.py --device cpu --tiny --repeats 1 --new-tokens 3 --prompt-tokens 8 \
        --out "$OUT_PATH" --json "$JSON_PATH"
    echo "dry run OK: $OUT_PATH"
    exit 0
fi

plan
START=$SECONDS
if [[ $INSTALL -eq 1 ]]; then
    "$PYTHON" -m venv "$VENV"
    PY="$VENV/bin/python"
    "$PY" -m pip install --quiet --upgrade pip "${PIP_SOURCE[@]}" || true   # an old pip is fine too
    "$PY" -m pip install --quiet "${TORCH_SOURCE[@]}" "torch==$TORCH_VERSION"
    "$PY" -m pip install --quiet "${PIP_SOURCE[@]}" "$JAX_SPEC" flax optax numpy pyyaml safetensors ml_dtypes \
        typer rich transformers setuptools
    "$PY" -m pip install --quiet "${PIP_SOURCE[@]}" --no-deps "open-mythos==$OPEN_MYTHOS_VERSION"
    "$PY" -m pip install --quiet --no-deps --no-build-isolation -e "$ROOT"
    echo "installed in $((SECONDS - START)) s"
else
    PY="$PYTHON"
fi

cd "$ROOT"
"$PY" -c "import torch, jax; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| jax', jax.__version__, jax.devices())"
timeout "$TIMEOUT_S" "$PY" bench/accelerator.py --out "$OUT_PATH" --json "$JSON_PATH"
echo "done in $((SECONDS - START)) s: $OUT_PATH"
