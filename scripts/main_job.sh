#!/usr/bin/env bash
# The main job: install, fine-tune SmolLM2-135M-Instruct with LoRA (DeepSpeed ZeRO-2, two
# Ray Train workers) on the shipped extraction task, print eval metrics before and after,
# then serve base model + adapter behind the OpenAI-compatible endpoint and ask both.
# Extra arguments are job-spec overrides, e.g. `bash scripts/main_job.sh optim.epochs=2`.
set -euo pipefail
cd "$(dirname "$0")/.."
RAYFT_VLLM=${RAYFT_VLLM:-0} bash scripts/install.sh  # the quick start needs no vLLM environment
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 TOKENIZERS_PARALLELISM=false
.venv/bin/rayft models pull smollm2-135m-instruct
exec .venv/bin/python -m rayft.cluster.quickstart configs/extract-lora.yaml "$@"
