#!/usr/bin/env bash
# The titan tier's venv (docs/scaling.md, section torchtitan): torchtitan 0.3.0 on the CPU build of torch 2.13.0,
# with the project installed editable. torchtitan 0.3.0 asks for a nightly torch; its protocols and the pieces the
# adapter uses run on torch 2.13, so it goes in with --no-deps and its other requirements are listed here.
#
#   tests/titan/install.sh [VENV]                  # default VENV: /tmp/tt
#   VENV/bin/python -m pytest -m titan tests/titan -q
#
# TORCH_INDEX=https://download.pytorch.org/whl/cpu picks the CPU wheel from PyTorch's index (online); without it
# pip's own configuration is used (a local wheel directory, or PyPI, whose Linux torch is the CUDA build).
set -euo pipefail

VENV="${1:-/tmp/tt}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PYTHON:-python3.11}"

"$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install)

# torch pinned first, and pinned again in every later install: an unpinned torch would pull a CUDA build
"${PIP[@]}" "torch==2.13.0" ${TORCH_INDEX:+--index-url "$TORCH_INDEX"}
# the project and its [torch] extra; ml_dtypes (mythos_torch.weights, weights_bridge); the test tools
"${PIP[@]}" "torch==2.13.0" -e "$ROOT[torch]" ml_dtypes "pytest>=8" "hypothesis>=6.100"
# torchtitan without its dependencies (they would replace torch), then what it imports:
#   protocols, ParallelDims, optimizer/loss components: spmd_types, torch_checkpointing, tyro, einops, safetensors
#   torchtitan.trainer (mythos.titan.trainer_config): torchdata, datasets, tokenizers, tensorboard, wandb, pillow,
#   and triton (torchtitan.models.common imports it; the CUDA torch wheels bring it along, the CPU one does not)
"${PIP[@]}" --no-deps "torchtitan==0.3.0"
"${PIP[@]}" "torch==2.13.0" "spmd_types==0.2.3" "torch_checkpointing>=0.1.0" tyro einops safetensors \
    "torchdata>=0.8.0" "datasets>=3.6.0,<4.8.0" "tokenizers>=0.15.0" tensorboard wandb pillow triton

"$VENV/bin/python" - <<'EOF'
import torch, torchtitan
from torchtitan.trainer import Trainer  # noqa: F401  the whole trainer imports
import mythos.titan  # noqa: F401
print(f"titan venv ready: torch {torch.__version__}, torchtitan {torchtitan.__version__}")
EOF
