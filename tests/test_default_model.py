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


RECOGNISE_REFERENCE = MODEL / "eval" / "recognise_reference.safetensors"


@pytest.mark.skipif(not RECOGNISE_REFERENCE.is_file(), reason="no recognition reference in models/default/eval")
def test_generated_images_show_their_concept(pipe):
    """Recognisability (``holst eval recognise``) on 16 fixed training and 16 held-out concepts x 4 images
    (seed 0, the model's sampling defaults), against the compact reference of all 8,023 real images
    (EfficientNet-Lite0 features, 128 dims) stored beside the model: a hit = the caption's concept among
    the image's 5 nearest real images.

    Measured on the committed model (2026-12-02): training concepts 56 of 64 images (87.5 %), held-out
    concepts 6 of 64 (9.4 %); chance 0.25 % / 0.22 %; the model of 2026-11-25 scored 0-2 % on both. The same
    images counted against another caption's concept stay near chance, so the figure is about captions.
    """
    from holst.eval import recognise as rc
    from holst.eval.features import EffLite0Features, extract_features

    ref = rc.RealReference.load(RECOGNISE_REFERENCE)
    assert len(ref.concepts) == 8023 and ref.features.shape == (8023, 128)
    net = EffLite0Features().eval()
    rates = {}
    for group in ("train", "heldout"):
        concepts = rc.pick_concepts(ref, group, 16, seed=0)
        assert len(concepts) == 16
        # the reference itself: real images of these concepts find their concept among 5 neighbours 40-50 % of the time
        ceiling = rc.ceiling_hits(ref.features, ref.concept_ids, [ref.index[c] for c in concepts])
        assert ceiling.float().mean() > 0.3
        images, _ = rc.generate_images(pipe, [ref.info[c]["ru"] for c in concepts], num_images=4, seed=0)
        feats = ref.project(extract_features(net, images))
        own = torch.tensor([ref.index[c] for c in concepts]).repeat_interleave(4)
        other = torch.tensor([ref.index[concepts[(i + 5) % 16]] for i in range(16)]).repeat_interleave(4)
        hits = rc.nearest_hits(feats, own, ref.features, ref.concept_ids)
        wrong = rc.nearest_hits(feats, other, ref.features, ref.concept_ids)
        rates[group] = (float(hits.float().mean()), rc.chance_rate(ref.concept_ids, own), int(wrong.sum()))
        assert int(wrong.sum()) <= 2, rates
    train, heldout = rates["train"], rates["heldout"]
    assert train[0] >= 0.6 and train[0] > 100 * train[1], rates  # issue 13: >= 30 % on training concepts
    assert heldout[0] >= 3 / 64 and heldout[0] > 10 * heldout[1], rates  # well above chance on held-out ones


@pytest.mark.parametrize("threads", [1, 2])
def test_decoded_pixels_do_not_depend_on_the_batch(pipe, threads):
    """The VQGAN decodes in fixed chunks: an image's bytes are the same alone, in 3 or in 7 (2 threads
    and a plain batch of 3 round some pixels differently from a batch of 2 on this CPU)."""
    from holst.utils.images import tensor_to_pil

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        D = pipe.dalle.config.image_tokens_per_dim
        g = torch.Generator().manual_seed(1)
        codes = torch.randint(0, pipe.dalle.config.image_vocab_size, (7, D * D), generator=g)
        together = [im.tobytes() for im in tensor_to_pil(pipe.decode(codes))]
        three = [im.tobytes() for im in tensor_to_pil(pipe.decode(codes[:3]))]
        alone = [tensor_to_pil(pipe.decode(c[None]))[0].tobytes() for c in codes]
    finally:
        torch.set_num_threads(before)
    assert together == alone and three == alone[:3]
