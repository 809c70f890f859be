#!/usr/bin/env bash
# Build the shipped default model, models/default, from nothing but package registries:
#   emoji (npm) + Tux Paint (Debian) data -> BPE tokenizer -> CLIP -> VQGAN (+ decoder fine-tune)
#   -> code shards -> transformer (+ continuation) -> pipeline directory -> held-out evaluation.
# These are exactly the commands and settings that made the committed models/default (2026-12-02,
# on an otherwise idle 2-core CPU; the wall time of every stage is printed at the end and written to
# $RUNS/stage_times.tsv, and quoted in models/default/README.md).
# Every step is a plain `holst` command; a step whose output already exists is skipped, so an
# interrupted build continues where it stopped. FORCE=1 rebuilds everything.
#   CLIP_FROM=dir    take the CLIP reranker from dir (e.g. models/default/clip) instead of training it
#                    (it is trained on all styles of the data and does not depend on the other stages)
# Continuing the transformer of a committed model (warm start, codes unchanged): see
# models/default/README.md, "Continue training".
set -euo pipefail
cd "$(dirname "$0")/.."
HOLST=${HOLST:-.venv/bin/holst}
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/default}
OUT=${OUT:-models/default}
FORCE=${FORCE:-0}

CLIP_FROM=${CLIP_FROM:-}
mkdir -p "$RUNS"
STAGE="" STAGE_T0=$SECONDS
: > "$RUNS/stage_times.tsv"
stage_end() { [ -n "$STAGE" ] && printf '%s\t%d\n' "$STAGE" $((SECONDS - STAGE_T0)) >> "$RUNS/stage_times.tsv"; return 0; }
step() { stage_end; STAGE="$1" STAGE_T0=$SECONDS; echo; echo "=== $(date -u +%H:%M:%S) $*"; }
done_already() { [ "$FORCE" != 1 ] && [ -e "$1" ]; }

# 1. Data: emoji art in 4 styles + Tux Paint stamps, 64 px, Russian + English captions, fixed held-out split
#    (data/default: tokenizer, CLIP and the recognisability reference). The VQGAN and the transformer train on
#    data/emoji1: one picture per emoji concept (Twemoji where it exists, else Noto, Fluent, OpenMoji), so that
#    each caption has one picture to learn instead of four styles to average.
step "1/10 data -> data/default, data/emoji1"
done_already data/emoji/captions.jsonl || $HOLST data emoji --out data/emoji --size 64 --overwrite
done_already data/tuxpaint/captions.jsonl || $HOLST data tuxpaint --out data/tuxpaint --size 64 --overwrite
done_already data/default/captions.jsonl || $HOLST data merge --out data/default data/emoji data/tuxpaint
done_already data/emoji1/captions.jsonl || \
  $HOLST data merge --out data/emoji1 --one-per-concept twemoji,noto,fluent-flat,openmoji data/emoji

# 2. Tokenizer: YouTokenToMe-format BPE (2048 ids) on the training captions and tags, both languages.
step "2/10 tokenizer -> $RUNS/tokenizer"
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

# 3. CLIP for ranking (about 30 minutes on 2 idle cores; max_minutes stops it, re-running the command resumes).
step "3/10 clip -> $RUNS/clip/final"
if [ -n "$CLIP_FROM" ] && ! done_already "$RUNS/clip/final/model.safetensors"; then
  mkdir -p "$RUNS/clip/final" && cp -r "$CLIP_FROM"/. "$RUNS/clip/final/"
fi
done_already "$RUNS/clip/final/model.safetensors" || \
  $HOLST train clip --config configs/train/clip_emoji64.yaml --set data=data/default \
    --set tokenizer="$RUNS/tokenizer" --set out_dir="$RUNS/clip" --set max_minutes=30 --set max_steps=1200 --resume if-present

# 4. VQGAN: 64 px -> 8x8 codes of 1024 (emoji64 layout with ch_mult 1,2,2,4), L1 + L2 + perceptual loss
#    (EfficientNet-Lite0 features), bf16 autocast where the CPU has it.
step "4/10 vqgan -> $RUNS/vqgan/final"
done_already "$RUNS/vqgan/final/model.safetensors" || \
  $HOLST train vqgan --config configs/train/vqgan_emoji64.yaml --set data=data/emoji1 --set out_dir="$RUNS/vqgan" \
    --set 'model_overrides={ch_mult: [1, 2, 2, 4], n_embed: 1024}' --set batch_size=16 --set max_steps=1800 \
    --set perceptual_weight=0.5 --set precision=auto --set eval_every=600 --set save_every=300 --set log_every=50 \
    --set warmup_steps=50 --set lr=1.5e-3 --resume if-present

# 5. Code shards: every training image encoded once.
step "5/10 codes -> $RUNS/codes/train"
done_already "$RUNS/codes/train/index.json" || \
  $HOLST prepare codes --vqgan "$RUNS/vqgan/final" --data data/emoji1 --out "$RUNS/codes/train" --size 64 --split train

# 6. Decoder-only fine-tune of the VQGAN with the PatchGAN (adaptive weight) + perceptual loss: the codes stay
#    exactly the same, the edges get sharper.
step "6/10 vqgan decoder -> $RUNS/vqgan_dec/final"
done_already "$RUNS/vqgan_dec/final/model.safetensors" || \
  $HOLST train vqgan --config configs/train/vqgan_emoji64.yaml --set data=data/emoji1 --set out_dir="$RUNS/vqgan_dec" \
    --set init_from="$RUNS/vqgan/final" --set 'freeze=[encoder.*, quant_conv.*, quantize.*]' --set batch_size=16 \
    --set max_steps=900 --set perceptual_weight=0.5 --set disc_weight=0.5 --set disc_start=0 --set precision=auto \
    --set eval_every=300 --set save_every=300 --set log_every=50 --set warmup_steps=20 --set lr=5e-4 \
    --resume if-present

# 7. Transformer: the 'emoji' preset made smaller (6 layers x 256), 1024 image codes, 5000 steps of 32 (~44
#    epochs of the ru + en captions), bf16 autocast and the block-sparse attention.
step "7/10 dalle -> $RUNS/dalle/final"
done_already "$RUNS/dalle/final/model.safetensors" || \
  $HOLST train dalle --config configs/train/dalle_emoji.yaml --set tokenizer="$RUNS/tokenizer" \
    --set "codes=[$RUNS/codes/train]" --set vqgan="$RUNS/vqgan/final" --set out_dir="$RUNS/dalle" \
    --set model_overrides.num_layers=6 --set model_overrides.hidden_size=256 --set model_overrides.num_attention_heads=4 \
    --set model_overrides.image_vocab_size=1024 --set batch_size=32 --set max_steps=5000 --set lr=2e-3 \
    --set warmup_steps=100 --set precision=auto --set attn_impl=sparse --set save_every=250 --set sample_every=1000 \
    --set log_every=50 --set tensorboard=false --resume if-present

# 8. The pipeline directory: transformer and CLIP in bf16, VQGAN in fp32. The Real-ESRGAN x4 weights are
#    converted into $OUT/superres by setup.sh (not committed) and used when present.
step "8/10 pipeline -> $OUT"
$HOLST prepare pipeline --out "$OUT" --tokenizer "$RUNS/tokenizer" --vqgan "$RUNS/vqgan_dec/final" \
  --dalle "$RUNS/dalle/final" --clip "$RUNS/clip/final" --dtype bf16 \
  --num-images 8 --rerank 0 --top-k 128 --top-p 0.99 --guidance-scale 1 --batch-size 8 \
  --name "holst emoji (default)" --language "ru, en" --license "see LICENSES/" \
  --description "A small ruDALL-E-style model trained from scratch on a CPU: 64 px emoji and clip-art from captions." \
  --training-data "holst data emoji (emojibase-data 17.0.0 CLDR captions; Twemoji art, else Noto/OpenMoji, one picture per concept) for the VQGAN and transformer; + all 4 styles and holst data tuxpaint (Debian tuxpaint-stamps-default) for the tokenizer and CLIP"
mkdir -p "$OUT/LICENSES"
cp data/emoji/LICENSES/* "$OUT/LICENSES/"
for f in data/tuxpaint/LICENSES/*; do cp "$f" "$OUT/LICENSES/tuxpaint-$(basename "$f")"; done
$PY scripts/plot_training_curves.py "$RUNS" "$OUT/training_curves.png"

# 9. Held-out evaluation (the reports quoted in the model card).
step "9/10 eval -> $OUT/eval"
$HOLST eval vqgan --model "$OUT" --data data/default --out "$OUT/eval"
$HOLST eval dalle --model "$OUT" --data data/default --out "$OUT/eval"
$HOLST eval pipeline --model "$OUT" --data data/default --out "$OUT/eval" --num-captions 16 --num-images 4

# 10. Recognisability (the headline figure) and its compact reference for tests/test_default_model.py.
step "10/10 recognise -> $OUT/eval/recognise.md"
$HOLST eval recognise --model "$OUT" --data data/default --out "$OUT/eval" --num-captions 48 --num-images 4 \
  --save-reference "$OUT/eval/recognise_reference.safetensors"
stage_end
echo; echo "stage wall times (s):"; cat "$RUNS/stage_times.tsv"
echo "done: $OUT"
