"""Classifier-free guidance against two plain full forward passes, and per-image seeds that do not depend on the
batch size with guidance and with image prompts (through the pipeline; the server's half is in test_serve.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from PIL import Image

from holst.dalle import DalleModel
from holst.pipeline import Text2ImagePipeline
from holst.presets import get_preset
from holst.sampling import sample_image_codes


def full_forward_logits(model: DalleModel, text: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """(B, V_img) image logits for the next code after ``codes`` (B, j): one full forward, no cache."""
    T = model.config.text_seq_length
    P = T + (1 if model.config.hf_version == "v2" else 0)
    logits = model(torch.cat([text, codes], dim=1))  # (B, P + j, V)
    return logits[:, P - 1 + codes.shape[1], model.config.vocab_size :]


@pytest.mark.parametrize("version", ["v3", "v2"])
@pytest.mark.parametrize("scale", [3.0, 0.5])
def test_guidance_is_uncond_plus_s_times_cond_minus_uncond(version, scale):
    """Greedy (top_k=1) guided codes = argmax of uncond + s * (cond - uncond), where cond and uncond come from
    two separate full forwards: the caption's and the empty caption's ([bos, eos, pads], as the tokenizer
    makes '')."""
    torch.manual_seed(0)
    model = DalleModel(dataclasses.replace(get_preset("tiny"), hf_version=version)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # sharper logits than the init: guidance changes the argmax
    c = model.config
    T, N, B = c.text_seq_length, c.image_seq_length, 2
    text = torch.zeros(B, T, dtype=torch.long)
    text[0, :5] = torch.tensor([2, 10, 11, 12, 3])
    text[1, :4] = torch.tensor([2, 40, 41, 3])
    empty = torch.zeros(B, T, dtype=torch.long)
    empty[:, :2] = torch.tensor([2, 3])
    codes = sample_image_codes(model, text, top_k=1, top_p=1.0, guidance_scale=scale, seeds=[0, 1])
    plain = sample_image_codes(model, text, top_k=1, top_p=1.0, seeds=[0, 1])
    assert codes.shape == (B, N)
    with torch.no_grad():
        for j in range(N):
            cond = full_forward_logits(model, text, codes[:, :j])
            uncond = full_forward_logits(model, empty, codes[:, :j])
            guided = uncond + scale * (cond - uncond)
            top2 = guided.topk(2, dim=-1).values
            assert ((top2[:, 0] - top2[:, 1]) > 1e-4).all()  # no near-tie: the argmax is well defined
            assert torch.equal(codes[:, j], guided.argmax(-1)), j
    assert not torch.equal(codes, plain)  # guidance changed something


@pytest.fixture(scope="module")
def pipe() -> Text2ImagePipeline:
    return Text2ImagePipeline.from_random("tiny", seed=0, clip=False, superres=False)


def test_guided_images_depend_on_seed_not_batch(pipe):
    kw = dict(seed=50, guidance_scale=3.0, upscale=1)
    whole = pipe("зелёный треугольник", 5, batch_size=5, **kw)
    ones = pipe("зелёный треугольник", 5, batch_size=1, **kw)
    twos = pipe("зелёный треугольник", 5, batch_size=2, **kw)
    assert torch.equal(whole.codes, ones.codes) and torch.equal(whole.codes, twos.codes)
    assert whole.seeds == ones.seeds == twos.seeds
    # each image alone, from its own seed
    for i, s in enumerate(whole.seeds):
        assert torch.equal(pipe("зелёный треугольник", 1, seed=s, guidance_scale=3.0, upscale=1).codes[0],
                           whole.codes[i])
    assert not torch.equal(whole.codes, pipe("зелёный треугольник", 5, batch_size=5, seed=50, upscale=1).codes)


def test_image_prompt_images_depend_on_seed_not_batch(pipe):
    S = pipe.image_size
    img = Image.new("RGB", (S, S), (200, 30, 30))
    img.paste((20, 20, 220), (0, S // 2, S, S))
    for guidance in (None, 2.0):
        kw = dict(seed=7, image_prompt=img, guidance_scale=guidance, upscale=1)
        whole = pipe("кот", 4, batch_size=4, **kw)
        ones = pipe("кот", 4, batch_size=1, **kw)
        assert torch.equal(whole.codes, ones.codes) and whole.seeds == ones.seeds
        for i, s in enumerate(whole.seeds):
            one = pipe("кот", 1, seed=s, image_prompt=img, guidance_scale=guidance, upscale=1)
            assert torch.equal(one.codes[0], whole.codes[i])
