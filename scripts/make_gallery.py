"""The README gallery: real outputs of the shipped model, one row per caption.

    .venv/bin/python scripts/make_gallery.py models/default docs/gallery.png

Each row: the 4 best of 8 samples (ranked by the model's CLIP), seed 0, the pipeline's sampling
defaults, upscaled x4 by Real-ESRGAN when its weights are present (else Lanczos), shown at 128 px.
"""

from __future__ import annotations

import sys

import torch

from holst import Text2ImagePipeline
from holst.eval.plots import labeled_grid
from holst.utils.images import save_png

CAPTIONS = (
    "красное яблоко", "синее сердце", "улыбающееся лицо", "ёлка", "собака", "автомобиль", "ракета", "дом",
    "a red apple", "a green tree",
)


def main(model: str, out: str) -> None:
    torch.set_num_threads(2)
    pipe = Text2ImagePipeline.from_pretrained(model)
    rows = []
    for caption in CAPTIONS:
        result = pipe(caption, num_images=8, seed=0, rerank=4, upscale=4)
        rows.append(result.images)
    save_png(labeled_grid(rows, CAPTIONS, cell=128, label_width=170), out)
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
