#!/usr/bin/env bash
# Build the shipped default model, models/default, from nothing but package registries:
#   emoji data (npm) -> BPE tokenizer -> VQGAN -> code shards -> transformer -> CLIP -> pipeline directory.
# Every step is a plain `holst` command; a step whose output already exists is skipped, so an
# interrupted build continues where it stopped (trainers also resume from their checkpoint.pt).
# FORCE=1 rebuilds everything. Run from anywhere; paths are relative to the repository root.
#
# Step settings live in configs/train/{vqgan_emoji64,dalle_emoji,clip_emoji64}.yaml (about 15, 30-40 and 10
# minutes on 2 idle CPU cores; encoding the codes takes a few minutes more). Override YAML values with e.g.
#   DALLE_SET="max_steps=200" scripts/build_default_model.sh   (a quick, worse model)
set -euo pipefail
cd "$(dirname "$0")/.."
HOLST=${HOLST:-.venv/bin/holst}
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/emoji}
RUNS=${RUNS:-runs/default}
OUT=${OUT:-models/default}
VOCAB=${VOCAB:-2048}                  # BPE ids incl. 4 specials; the 'emoji' preset has 2048 text rows
VQGAN_CONFIG=${VQGAN_CONFIG:-configs/train/vqgan_emoji64.yaml}
DALLE_CONFIG=${DALLE_CONFIG:-configs/train/dalle_emoji.yaml}
CLIP_CONFIG=${CLIP_CONFIG:-configs/train/clip_emoji64.yaml}
VQGAN_SET=${VQGAN_SET:-}
DALLE_SET=${DALLE_SET:-}
CLIP_SET=${CLIP_SET:-}
FORCE=${FORCE:-0}

step() { echo; echo "=== $(date -u +%H:%M:%S) $*"; }
done_already() { [ "$FORCE" != 1 ] && [ -e "$1" ]; }
sets() { for kv in $1; do printf -- '--set %s ' "$kv"; done; }
config() { if [ -f "$1" ]; then printf -- '--config %s' "$1"; else echo "note: $1 not found, trainer defaults" >&2; fi; }

# 1. Data: emoji pictures in 4 art styles, 64 px, with Russian + English captions and a fixed held-out split.
step "1/7 data -> $DATA"
done_already "$DATA/captions.jsonl" || $HOLST data emoji --out "$DATA" --size 64 --overwrite

# 2. Tokenizer: YouTokenToMe-format BPE trained on the training captions (both languages).
step "2/7 tokenizer -> $RUNS/tokenizer"
if ! done_already "$RUNS/tokenizer/bpe.model"; then
  mkdir -p "$RUNS"
  $PY - "$DATA/captions.jsonl" "$RUNS/captions_train.txt" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1], encoding="utf-8")]
with open(sys.argv[2], "w", encoding="utf-8") as f:
    for r in rows:
        if r.get("split", "train") == "train":
            for lang in ("ru", "en"):
                if r.get(lang):
                    f.write(r[lang].replace("\n", " ") + "\n")
PYEOF
  $HOLST train tokenizer "$RUNS/captions_train.txt" --vocab-size "$VOCAB" --out "$RUNS/tokenizer"
fi

# 3. VQGAN: 64 px images -> 8x8 codes of a 512-entry codebook.
step "3/7 vqgan -> $RUNS/vqgan/final"
done_already "$RUNS/vqgan/final/model.safetensors" || \
  $HOLST train vqgan $(config "$VQGAN_CONFIG") --set "data=$DATA" --set "out_dir=$RUNS/vqgan" $(sets "$VQGAN_SET") --resume

# 4. Code shards: every image encoded once, so the transformer trains on codes.
step "4/7 codes -> $RUNS/codes"
done_already "$RUNS/codes/train" || \
  $HOLST prepare codes --vqgan "$RUNS/vqgan/final" --data "$DATA" --out "$RUNS/codes/train" --size 64 --split train

# 5. Transformer: the 'emoji' preset trained on the code shards with BPE-dropout and empty captions (for guidance).
step "5/7 dalle -> $RUNS/dalle/final"
done_already "$RUNS/dalle/final/model.safetensors" || \
  $HOLST train dalle $(config "$DALLE_CONFIG") --set "tokenizer=$RUNS/tokenizer" --set "codes=[$RUNS/codes/train]" \
    --set "vqgan=$RUNS/vqgan/final" --set "out_dir=$RUNS/dalle" $(sets "$DALLE_SET") --resume

# 6. CLIP for ranking, trained on the same pictures and the same tokenizer.
step "6/7 clip -> $RUNS/clip/final"
done_already "$RUNS/clip/final/model.safetensors" || \
  $HOLST train clip $(config "$CLIP_CONFIG") --set "data=$DATA" --set "tokenizer=$RUNS/tokenizer" \
    --set "out_dir=$RUNS/clip" $(sets "$CLIP_SET") --resume

# 7. The pipeline directory (+ the Real-ESRGAN x4 weights setup.sh converted into $OUT/superres, if present;
#    configs/train/superres_emoji.yaml fine-tunes them on the VQGAN's outputs, a GPU job).
step "7/7 pipeline -> $OUT"
SUPERRES=()
[ -f "$OUT/superres/model.safetensors" ] && SUPERRES=(--superres "$OUT/superres")
$HOLST prepare pipeline --out "$OUT" --tokenizer "$RUNS/tokenizer" --vqgan "$RUNS/vqgan/final" \
  --dalle "$RUNS/dalle/final" --clip "$RUNS/clip/final" "${SUPERRES[@]}" \
  --num-images 8 --rerank 0 --top-k 256 --top-p 0.99 \
  --name "holst emoji (default)" --language "ru, en" \
  --description "A small ruDALL-E-style model trained from scratch on CPU: 64 px emoji art from captions." \
  --training-data "holst data emoji: emojibase-data 17.0.0 captions (CLDR), Noto/Twemoji/OpenMoji/Fluent art (npm)"

step "check: one generation"
$HOLST generate "красное яблоко" --model "$OUT" --num-images 4 --seed 0 --out "$RUNS/check" --no-progress
echo "done: $OUT"
