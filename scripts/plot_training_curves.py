"""Draw the training curves of a model build (metrics.jsonl of each trainer) into one PNG.

    .venv/bin/python scripts/plot_training_curves.py runs/default models/default/training_curves.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from PIL import Image

from holst.eval.plots import line_chart
from holst.utils.images import save_png

# (stage directories, run one after the other; title; {legend: metric key})
PANELS = (
    (("vqgan", "vqgan_dec"), "VQGAN: train losses; then decoder-only + GAN",
     {"L1 + L2": "rec", "perceptual": "perc"}),
    (("vqgan", "vqgan_dec"), "VQGAN: held-out PSNR (dB)", {"val PSNR": "val_psnr"}),
    (("dalle", "dalle2"), "transformer: loss (weighted / text / image)", {"loss": "loss", "text": "text",
                                                                         "image": "image"}),
    (("clip",), "CLIP: contrastive loss", {"loss": "loss"}),
)


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def read_stages(runs: Path, stages: tuple[str, ...]) -> list[dict]:
    """Metrics of consecutive runs, later runs' steps shifted to continue the earlier ones."""
    rows, offset = [], 0
    for stage in stages:
        part = read_metrics(runs / stage / "metrics.jsonl")
        rows += [{**r, "step": r["step"] + offset} for r in part]
        offset = max([r["step"] for r in rows], default=offset)
    return rows


def main(runs: str, out: str) -> None:
    panels = []
    for stages, title, keys in PANELS:
        rows = read_stages(Path(runs), stages)
        series = {}
        for legend, key in keys.items():
            pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
            if pts:
                series[legend] = ([p[0] for p in pts], [p[1] for p in pts])
        if series:
            panels.append(line_chart(series, title, width=520, height=260))
    if not panels:
        raise SystemExit(f"no metrics.jsonl under {runs}")
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * 520, rows * 260), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, ((i % cols) * 520, (i // cols) * 260))
    save_png(sheet, out)
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
