#!/usr/bin/env bash
# Every GPU measurement of training in one run, one JSON file (issue 15): bench/train.py's GPU list
# (Malevich 1.3B, random ids, batch 8, 3 timed steps a row: the reference's fp16 set-up, then bf16 +
# sdpa, + block-sparse attention, + lean loss, + compile, + activation checkpointing; tokens/s and
# peak memory per row, and the step's dense matmuls alone), then the CUDA tests of training.
#
#   bench/gpu_train.sh [--out gpu_train.json]              # on a CUDA machine (one 420 s cap on the bench)
#   bench/gpu_train.sh --tiny [--out gpu_train_tiny.json]  # the same script on the CPU with a tiny model (a check)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=gpu_train.json
source bench/gpu_args.sh "$@"
if [ "$TINY" = 1 ]; then
  BENCH=(--variants gpu --preset tiny --batch 4 --device cpu --threads 2 --steps 2 --warmup 1)
  TESTS=(-m "not gpu" -k "compiled_steps_equal or sparse_model_step" tests/test_train_speed.py)
else
  BENCH=(--steps 3 --warmup 2)
  TESTS=(-m gpu tests/test_train_speed.py)
fi
set +e
timeout 420 "$PY" bench/train.py "${BENCH[@]}" > "$TMP/bench.json" 2> "$TMP/bench.log"
echo $? > "$TMP/bench.rc"
timeout 120 "$PY" -m pytest -p no:warnings "${TESTS[@]}" > "$TMP/tests.log" 2>&1
echo $? > "$TMP/tests.rc"
set -e
"$PY" - "$TMP" "$OUT" "$TINY" <<'PYEOF'
import json, os, sys
tmp, out, tiny = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
read = lambda name: open(os.path.join(tmp, name)).read()
rc = int(read("bench.rc"))
bench = json.loads(read("bench.json")) if rc == 0 else {"failed": f"bench/train.py exit {rc}", "log_tail": read("bench.log")[-2000:]}
log = read("tests.log").strip().splitlines()
report = {"bench": "gpu_train.sh", "tiny": tiny, "train": bench,
          "tests": {"exit_code": int(read("tests.rc")), "summary": log[-1] if log else ""}}
with open(out, "w") as f:
    json.dump(report, f, indent=2)
rows = bench.get("results", [])
print(f"wrote {out}: {len(rows)} rows" + "".join(f"\n  {r['change']}: {r['tokens_per_s']} tokens/s" for r in rows)
      + f"\ntests: {report['tests']['summary']}")
PYEOF
