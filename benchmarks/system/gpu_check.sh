#!/usr/bin/env bash
# GPU check of fct_ml in seconds (14 s on the H200 it last ran on): bf16 training steps (cnn-s, ResNet-50), embedding and h
# throughput. Needs only torch + torchvision (no Dagster, no LanceDB), so it runs on a bare GPU box.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi -L || true
python3 benchmarks/system/gpu_check.py
