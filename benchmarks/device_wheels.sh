#!/usr/bin/env bash
# Wheels for running benchmarks/gpu_check.sh on a GPU machine that has torch and CUDA but no
# network: the project's dependencies that such an image lacks (optuna, hydra-core, ...) or has
# at other versions (transformers, peft, huggingface_hub), at the versions of this checkout's
# .venv, for the GPU machine's Python (PYVER, default 3.12) on x86-64. On the GPU machine (the
# wheels carried beside the checkout):
#
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:$PWD PYTHON=python3 LOG_DIR=/tmp/logs benchmarks/gpu_check.sh
#
#   [PYVER=3.12] benchmarks/device_wheels.sh [DIR]     # default DIR: .whl (about 30 MB)
# First used 2026-12-04 on an H200 image with torch 2.11 (BENCHMARKS.md "GPU: one NVIDIA H200").
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${1:-.whl}
PY=${PYTHON:-.venv/bin/python}
# what the import chain of `python -m lora_sweep -m` needs beyond torch, numpy, pandas, scipy,
# safetensors, tokenizers, accelerate, pyyaml, tqdm (which such images carry)
NAMES=(transformers huggingface_hub peft optuna hydra-core omegaconf antlr4-python3-runtime alembic
       colorlog Mako cmaes SQLAlchemy regex httpx2 httpcore2 truststore anyio h11 kernels
       tomlkit click fsspec typing_extensions hf-xet)
mkdir -p "$OUT"
FROZEN=$("$PY" -m pip list --format=freeze 2>/dev/null)
PINS=()
for name in "${NAMES[@]}"; do
  # pip normalises names: case, and '-' / '_' alike
  pin=$(grep -i "^${name//[-_]/[-_]}==" <<<"$FROZEN" || true)
  if [[ -z $pin ]]; then echo "$name is not installed in $PY's environment" >&2; exit 2; fi
  PINS+=("$pin")
done
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for pin in "${PINS[@]}"; do
  if [[ $pin == antlr4-python3-runtime==* ]]; then  # published as an sdist only: build its (pure) wheel
    "$PY" -m pip wheel --quiet --no-deps -w "$OUT" "$pin"
  else
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp \
      "${PLATFORMS[@]}" -d "$OUT" "$pin"
  fi
done
ls "$OUT"
du -sh "$OUT"
