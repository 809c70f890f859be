#!/usr/bin/env bash
# Every GPU measurement of generation in one run, one JSON file (issue 14):
# Malevich (1.3B, random weights) in bf16 at batch 1, 32, 128, 256, 512, with and without
# classifier-free guidance, eager / torch.compile / CUDA-graph decode steps, then the GPU tests.
#
#   bench/gpu.sh [--out gpu.json]              # on a CUDA machine (~8 min on one H100/H200)
#   bench/gpu.sh --tiny [--out gpu_tiny.json]  # the same script on the CPU with a tiny model (a check)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=gpu.json
source bench/gpu_args.sh "$@"
if [ "$TINY" = 1 ]; then
  COMMON=(--preset tiny --device cpu --dtype fp32 --threads 2 --repeats 1 --top-k 32 --top-p 0.99)
  SIZES=1,4; BIG=8; MODES=eager,static,compile; TESTS=(-m "not gpu" -k "cuda_graph or compiled" tests/test_sampling.py)
else
  COMMON=(--preset malevich --device cuda --dtype bf16 --repeats 2 --top-k 2048 --top-p 0.995)
  SIZES=1,32; BIG=128,256,512; MODES=eager,compile,graph; TESTS=(-m gpu tests/)
fi
i=0
run() {  # one bench/generate.py call -> $TMP/<n>.json
  i=$((i + 1))
  timeout 600 "$PY" bench/generate.py "${COMMON[@]}" "$@" --out "$TMP/$i.json" > "$TMP/$i.log" 2>&1 \
    || echo "{\"failed\": \"bench/generate.py $*\", \"log_tail\": $("$PY" -c 'import json,sys; print(json.dumps(open(sys.argv[1]).read()[-2000:]))' "$TMP/$i.log")}" > "$TMP/$i.json"
}
run --batch-sizes "$SIZES" --modes "$MODES" --baseline-max-batch 1        # no guidance, baseline at batch 1
run --batch-sizes "$SIZES" --modes "$MODES" --guidance-scale 3 --no-baseline
run --batch-sizes "$BIG" --modes "${MODES##*,}" --no-baseline               # the best mode only at big batches
run --batch-sizes "$BIG" --modes "${MODES##*,}" --guidance-scale 3 --no-baseline
set +e
timeout 300 "$PY" -m pytest -p no:warnings "${TESTS[@]}" > "$TMP/tests.log" 2>&1
echo $? > "$TMP/tests.rc"
set -e
"$PY" - "$TMP" "$OUT" "$TINY" <<'PYEOF'
import glob, json, os, sys
tmp, out, tiny = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
runs = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(tmp, "[0-9]*.json")), key=lambda p: int(os.path.basename(p)[:-5]))]
log = open(os.path.join(tmp, "tests.log")).read().strip().splitlines()
report = {"bench": "gpu.sh", "tiny": tiny, "runs": runs,
          "tests": {"exit_code": int(open(os.path.join(tmp, "tests.rc")).read()), "summary": log[-1] if log else ""}}
with open(out, "w") as f:
    json.dump(report, f, indent=2)
print(f"wrote {out}: {len(runs)} runs, tests: {report['tests']['summary']}")
PYEOF
