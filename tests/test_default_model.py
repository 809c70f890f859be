"""The shipped default model (models/default): it loads, generates, and its pictures match captions.

The weights are committed (tokenizer, VQGAN, transformer, CLIP); the Real-ESRGAN x4 weights are
converted at set-up and may be absent. The held-out captions come from the recorded test split of
the emoji + Tux Paint data (concepts never seen in training) and are stored next to the model, so no
data set is needed here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "default"

pytestmark = pytest.mark.skipif(not (MODEL / "pipeline.json").is_file(), reason="models/default is not built")


@pytest.fixture(scope="module")
def pipe():
    from holst import Text2ImagePipeline

    return Text2ImagePipeline.from_pretrained(MODEL)


def heldout_captions() -> list[str]:
    rows = json.loads((MODEL / "eval" / "heldout_captions.json").read_text(encoding="utf-8"))
    # test_concept: concepts never seen in training (in any style), Russian captions
    return [r["ru"] for r in rows if r["split"] == "test_concept"][:20]


def test_default_model_generates_reproducibly(pipe):
    out = pipe("красное яблоко", num_images=2, seed=7, rerank=0, upscale=1)
    assert len(out.images) == 2 and out.images[0].size == (pipe.image_size, pipe.image_size)
    again = pipe("красное яблоко", num_images=1, seed=out.seeds[0], rerank=0, upscale=1)
    assert torch.equal(again.codes[0], out.codes[0])
    assert out.clip_scores is not None and out.clip_scores == sorted(out.clip_scores, reverse=True)


def test_heldout_captions_beat_shuffled_captions(pipe):
    """For 20 held-out captions, the CLIP score of the generated images with their own caption is
    higher on average than with a different caption (a derangement of the same captions)."""
    captions = heldout_captions()
    assert len(captions) == 20
    own, shuffled = [], []
    for i, caption in enumerate(captions):
        out = pipe(caption, num_images=2, seed=1000 + i, rerank=0, upscale=1)
        other = captions[(i + 7) % len(captions)]
        own.append(sum(pipe.score_images(out.images, caption)) / 2)
        shuffled.append(sum(pipe.score_images(out.images, other)) / 2)
    own_t, shuf_t = torch.tensor(own), torch.tensor(shuffled)
    assert own_t.mean() > shuf_t.mean(), (own, shuffled)
    assert (own_t > shuf_t).float().mean() >= 0.6, (own, shuffled)
