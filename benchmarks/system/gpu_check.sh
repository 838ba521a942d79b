#!/usr/bin/env bash
# The GPU check of fct (benchmarks/system/gpu_check.py): h in bf16, a 1M-item backfill and the new
# model's training, each on CUDA beside the CPU, in one run sized to end in under 5 minutes.
# Installs nothing and reaches no network: it needs a python with torch + numpy (a bare GPU
# machine's will do); the LanceDB backfill also needs fct's full install, else it says "not run".
# PYTHON picks the interpreter; else python3, else the repository's .venv, whichever has torch.
# Arguments go to gpu_check.py (--cpu-only, --require-cuda, --no-lancedb).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ -z "${PYTHON:-}" ]]; then
    for candidate in python3 .venv/bin/python; do
        if "$candidate" -c "import torch, numpy" 2>/dev/null; then
            PYTHON=$candidate
            break
        fi
    done
fi
if [[ -z "${PYTHON:-}" ]] || ! "$PYTHON" -c "import torch, numpy" 2>/dev/null; then
    echo "gpu_check: no python with torch and numpy (tried ${PYTHON:-python3, .venv/bin/python});" \
        "set PYTHON to one that has them" >&2
    exit 2
fi
nvidia-smi -L 2>/dev/null || echo "gpu_check: nvidia-smi lists no GPU"
exec "$PYTHON" benchmarks/system/gpu_check.py "$@"
