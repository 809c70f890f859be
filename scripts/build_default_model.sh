#!/usr/bin/env bash
# Build the shipped default model, models/default, from nothing but package registries:
#   emoji (npm) + Tux Paint (Debian) data -> BPE tokenizer -> CLIP -> VQGAN (+ decoder fine-tune)
#   -> code shards -> transformer (+ continuation) -> pipeline directory -> held-out evaluation.
# These are exactly the commands and settings that made the committed models/default (2026-11-25,
# on a 2-core CPU shared with other jobs; wall times in models/default/README.md).
# Every step is a plain `holst` command; a step whose output already exists is skipped, so an
# interrupted build continues where it stopped. FORCE=1 rebuilds everything.
set -euo pipefail
cd "$(dirname "$0")/.."
HOLST=${HOLST:-.venv/bin/holst}
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/default}
OUT=${OUT:-models/default}
FORCE=${FORCE:-0}

step() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }
done_already() { [ "$FORCE" != 1 ] && [ -e "$1" ]; }

# 1. Data: emoji art in 4 styles + Tux Paint stamps, 64 px, Russian + English captions, fixed held-out split.
step "1/9 data -> data/default"
done_already data/emoji/captions.jsonl || $HOLST data emoji --out data/emoji --size 64 --overwrite
done_already data/tuxpaint/captions.jsonl || $HOLST data tuxpaint --out data/tuxpaint --size 64 --overwrite
done_already data/default/captions.jsonl || $HOLST data merge --out data/default data/emoji data/tuxpaint

# 2. Tokenizer: YouTokenToMe-format BPE (2048 ids) on the training captions and tags, both languages.
step "2/9 tokenizer -> $RUNS/tokenizer"
if ! done_already "$RUNS/tokenizer/bpe.model"; then
  mkdir -p "$RUNS"
  $PY - data/default/captions.jsonl "$RUNS/captions.txt" <<'PYEOF'
import json, sys
with open(sys.argv[2], "w", encoding="utf-8") as f:
    for line in open(sys.argv[1], encoding="utf-8"):
        r = json.loads(line)
        if r.get("split") != "train":
            continue
        texts = [r.get("ru"), r.get("en")] + list(r.get("ru_tags") or []) + list(r.get("en_tags") or [])
        f.writelines(t.strip().replace("\n", " ") + "\n" for t in texts if t)
PYEOF
  $HOLST train tokenizer "$RUNS/captions.txt" --vocab-size 2048 --out "$RUNS/tokenizer" --text-seq-length 24
fi

# 3. CLIP for ranking (max_minutes cut the run twice; re-running this same command resumed it to 1,200 steps).
step "3/9 clip -> $RUNS/clip/final"
done_already "$RUNS/clip/final/model.safetensors" || \
  $HOLST train clip --config configs/train/clip_emoji64.yaml --set data=data/default \
    --set tokenizer="$RUNS/tokenizer" --set out_dir="$RUNS/clip" --set max_minutes=30 --set max_steps=1200 --resume if-present

# 4. VQGAN: 64 px -> 8x8 codes of 512 (the emoji64 layout of this build: ch_mult 1,2,2,4).
step "4/9 vqgan -> $RUNS/vqgan/final"
done_already "$RUNS/vqgan/final/model.safetensors" || \
  $HOLST train vqgan --config configs/train/vqgan_emoji64.yaml --set data=data/default --set out_dir="$RUNS/vqgan" \
    --set 'model_overrides={ch_mult: [1, 2, 2, 4]}' --set batch_size=16 --set max_steps=900 --set eval_every=300 \
    --set save_every=300 --set log_every=25 --set warmup_steps=50 --set lr=2e-3 --resume if-present

# 5. Code shards: every training image encoded once.
step "5/9 codes -> $RUNS/codes/train"
done_already "$RUNS/codes/train/index.json" || \
  $HOLST prepare codes --vqgan "$RUNS/vqgan/final" --data data/default --out "$RUNS/codes/train" --size 64 --split train

# 6. Decoder-only fine-tune of the VQGAN: the codes stay exactly the same, the pictures get sharper.
step "6/9 vqgan decoder -> $RUNS/vqgan_dec/final"
done_already "$RUNS/vqgan_dec/final/model.safetensors" || \
  $HOLST train vqgan --config configs/train/vqgan_emoji64.yaml --set data=data/default --set out_dir="$RUNS/vqgan_dec" \
    --set init_from="$RUNS/vqgan/final" --set 'freeze=[encoder.*, quant_conv.*, quantize.*]' --set batch_size=16 \
    --set max_steps=1200 --set eval_every=400 --set save_every=200 --set log_every=50 --set warmup_steps=20 \
    --set lr=1e-3 --set num_threads=1 --resume if-present

# 7. Transformer: the 'emoji' preset made smaller (6 layers x 256), 1600 steps of 32, then 1200 more from there.
step "7/9 dalle -> $RUNS/dalle2/final"
DALLE_COMMON=(--config configs/train/dalle_emoji.yaml --set tokenizer="$RUNS/tokenizer" --set "codes=[$RUNS/codes/train]"
              --set vqgan="$RUNS/vqgan/final" --set batch_size=32 --set save_every=100 --set tensorboard=false)
done_already "$RUNS/dalle/final/model.safetensors" || \
  $HOLST train dalle "${DALLE_COMMON[@]}" --set out_dir="$RUNS/dalle" --set model_overrides.num_layers=6 \
    --set model_overrides.hidden_size=256 --set model_overrides.num_attention_heads=4 --set max_steps=1600 \
    --set lr=1e-3 --set warmup_steps=50 --set sample_every=400 --resume if-present
done_already "$RUNS/dalle2/final/model.safetensors" || \
  $HOLST train dalle "${DALLE_COMMON[@]}" --set out_dir="$RUNS/dalle2" --set init_from="$RUNS/dalle/final" \
    --set max_steps=1200 --set lr=5e-4 --set warmup_steps=20 --set sample_every=600 --set num_threads=1 --resume if-present

# 8. The pipeline directory: transformer and CLIP in bf16, VQGAN in fp32. The Real-ESRGAN x4 weights are
#    converted into $OUT/superres by setup.sh (not committed) and used when present.
step "8/9 pipeline -> $OUT"
$HOLST prepare pipeline --out "$OUT" --tokenizer "$RUNS/tokenizer" --vqgan "$RUNS/vqgan_dec/final" \
  --dalle "$RUNS/dalle2/final" --clip "$RUNS/clip/final" --dtype bf16 \
  --num-images 8 --rerank 0 --top-k 128 --top-p 0.99 --guidance-scale 3 --batch-size 8 \
  --name "holst emoji (default)" --language "ru, en" --license "see LICENSES/" \
  --description "A small ruDALL-E-style model trained from scratch on a CPU: 64 px emoji and clip-art from captions." \
  --training-data "holst data emoji (emojibase-data 17.0.0 CLDR captions; Noto, Twemoji, OpenMoji, Fluent art) + holst data tuxpaint (Debian tuxpaint-stamps-default)"
mkdir -p "$OUT/LICENSES"
cp data/emoji/LICENSES/* "$OUT/LICENSES/"
for f in data/tuxpaint/LICENSES/*; do cp "$f" "$OUT/LICENSES/tuxpaint-$(basename "$f")"; done
$PY scripts/plot_training_curves.py "$RUNS" "$OUT/training_curves.png"

# 9. Held-out evaluation (the report quoted in the model card).
step "9/9 eval -> $OUT/eval"
$HOLST eval pipeline --model "$OUT" --data data/default --out "$OUT/eval" --threads 1 --num-captions 16 --num-images 4
echo "done: $OUT"
