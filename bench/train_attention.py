"""Training step with the dense masked attention (sdpa) against the block-sparse one, by grid size.

``holst train dalle`` trains with ``attn_impl: sparse`` by default: under the row, column and (32 x 32)
conv masks a query sees the text and a band of the image, and the sparse kernel computes only those
keys. How much that saves grows with the grid. For each grid this builds the four set-ups (fp32 and
bf16 autocast, each with sdpa and sparse attention; lean loss, holst's dropout, fused AdamW: the
trainer's path), times their optimizer steps round-robin (so a shared machine's drift falls on all
four alike) and reports each step and sparse's speed-up over sdpa at the same precision:

- 8x8: the emoji preset (88 tokens) at batch 16 without dropout, as configs/train/dalle_emoji.yaml;
- 16x16: the small preset (288 tokens) at batch 8;
- 32x32: the small preset with Malevich's sequence (128 text + 1024 image tokens), 4 layers, batch 2.

    OMP_NUM_THREADS=2 .venv/bin/python bench/train_attention.py --threads 2 [--grids 8x8,16x16,32x32] [--steps 7]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json

from timing import bench_device, device_label
from train import Variant, bench_interleaved

NO_DROPOUT = {"embedding_dropout_prob": 0.0, "attention_dropout_prob": 0.0, "output_dropout_prob": 0.0}
GRIDS = {  # name: (preset, DalleConfig overrides, batch)
    "8x8": ("emoji", NO_DROPOUT, 16),
    "16x16": ("small", {}, 8),
    "32x32": ("small", {"num_layers": 4, "image_tokens_per_dim": 32, "text_seq_length": 128}, 2),
}
VARIANTS = [Variant(impl, impl, precision, lean_loss=True, fast_dropout=True)
            for precision in ("fp32", "bf16") for impl in ("sdpa", "sparse")]


def bench_grid(name: str, steps: int, warmup: int, device: str) -> list[dict]:
    """The four set-ups of one grid, timed round-robin; each sparse row gets its speed-up over sdpa."""
    preset, overrides, batch = GRIDS[name]
    rows = bench_interleaved(preset, batch, steps, warmup, VARIANTS, device, overrides)
    for row in rows:
        row.update(grid=name, preset=preset, overrides=overrides, batch=batch)
    for dense, sparse in zip(rows[0::2], rows[1::2]):
        sparse["speedup_vs_sdpa"] = round(dense["step_s"] / sparse["step_s"], 3)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", default=",".join(GRIDS), help=f"comma-separated, of {', '.join(GRIDS)}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per set-up")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = parser.parse_args()
    grids = args.grids.split(",")
    unknown = sorted(set(grids) - set(GRIDS))
    if unknown:
        parser.error(f"unknown grid(s) {unknown}; choose from {list(GRIDS)}")
    device = bench_device(args.device, args.threads)
    print(json.dumps({"bench": "train_attention", "device": device_label(device), "steps": args.steps,
                      "warmup": args.warmup,
                      "results": [row for name in grids for row in bench_grid(name, args.steps, args.warmup, device)]},
                     indent=2))


if __name__ == "__main__":
    main()
