#!/usr/bin/env bash
# Create .venv (if needed) and install rayft with its test tools.
# torch is installed first and pinned to a CPU build where one is available, so that
# resolving ray/deepspeed/peft never pulls a multi-GB CUDA build onto a CPU machine.
# Override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.13.0" plus your own index options).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-dev}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  "${PIP[@]}" install -q "$TORCH_SPEC"
fi
"${PIP[@]}" install -q -e ".[${EXTRAS}]"
"$VENV/bin/python" -c "import torch, ray, deepspeed, peft, transformers; print(f'rayft env: torch {torch.__version__}, ray {ray.__version__}, deepspeed {deepspeed.__version__}, peft {peft.__version__}, transformers {transformers.__version__}')" 2>&1 | grep '^rayft env'
# vLLM's CPU build in .venv-vllm, for `rayft serve engine=vllm` and its tests;
# RAYFT_VLLM=0 skips it.
if [ "${RAYFT_VLLM:-1}" != "0" ]; then
  bash scripts/install_vllm.sh
fi
