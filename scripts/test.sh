#!/usr/bin/env bash
# Install (if needed) and run the whole test suite: unit, integration (local Ray,
# real DeepSpeed, real Ray Serve over HTTP) and, when CUDA is present, gpu tests.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not slow"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
# Lint and format first: a style failure fails CI in seconds, before the long tests.
.venv/bin/ruff format --check .
.venv/bin/ruff check .
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0   # keep Ray on 127.0.0.1
export RAY_DEDUP_LOGS=0 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -ra "$@"
