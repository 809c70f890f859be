"""The README gallery: real outputs of the shipped model, one row per caption.

    .venv/bin/python scripts/make_gallery.py models/default docs/gallery.png

Ten everyday captions (issue 13), one row each: on the left the 4 best of 8 samples for the Russian
caption, on the right the 4 best of 8 for its English form (ranked by the model's CLIP), seed 0, the
pipeline's sampling defaults, upscaled x4 by Real-ESRGAN when its weights are present (else Lanczos),
shown at 128 px.
"""

from __future__ import annotations

import sys

import torch

from holst import Text2ImagePipeline
from holst.eval.plots import labeled_grid
from holst.utils.images import save_png

CAPTIONS = (  # (Russian, English)
    ("яблоко", "apple"), ("сердце", "heart"), ("кот", "cat"), ("собака", "dog"), ("машина", "car"),
    ("дом", "house"), ("ёлка", "fir tree"), ("ракета", "rocket"), ("солнце", "sun"),
    ("улыбающееся лицо", "smiling face"),
)


def main(model: str, out: str) -> None:
    torch.set_num_threads(2)
    pipe = Text2ImagePipeline.from_pretrained(model)
    rows = []
    for ru, en in CAPTIONS:
        rows.append([im for caption in (ru, en)
                     for im in pipe(caption, num_images=8, seed=0, rerank=4, upscale=4).images])
    labels = [f"{ru} / {en}" for ru, en in CAPTIONS]
    save_png(labeled_grid(rows, labels, cell=128, label_width=250), out)
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
