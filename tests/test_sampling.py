"""Sampling: reference filter semantics, seeds independent of the batch, guidance, image prompts, perplexity."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_cache import grid_model as shared_grid_model  # the 3-layer grid model

from holst.dalle import DalleModel
from holst.presets import get_preset
from holst.sampling import (
    ImagePrompt,
    _generate_batch,
    _generate_batch_legacy,
    border_mask,
    ce_to_ppl,
    counter_gumbel,
    draw_seeds,
    empty_caption_ids,
    filter_logits,
    guided_logits,
    image_perplexity,
    partial_grid,
    sample_image_codes,
    sample_tokens,
    sample_tokens_topk,
    seed_keys,
    vocab_salt_table,
)

KW = dict(top_k=40, top_p=0.97)


@pytest.fixture(scope="module", params=["v3", "v2"])
def model(request) -> DalleModel:
    torch.manual_seed(0)
    m = DalleModel(get_preset("tiny", hf_version=request.param))
    m.init_weights(0.3)
    return m.eval()


def captions(model: DalleModel, batch: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    text = torch.randint(4, model.config.bpe_vocab_size, (batch, model.config.text_seq_length), generator=g)
    text[:, 0] = 2
    text[:, 8:] = 0
    return text


# ------------------------------------------------------------------ filters (hand-made cases)
def probs_logits(p: list[float]) -> torch.Tensor:
    return torch.tensor([p]).log()


def kept(logits: torch.Tensor) -> list[bool]:
    return torch.isfinite(logits)[0].tolist()


def test_top_k_keeps_ties() -> None:
    assert kept(filter_logits(probs_logits([0.5, 0.2, 0.2, 0.1]), top_k=2, top_p=1.0)) == [True, True, True, False]
    assert kept(filter_logits(probs_logits([0.1, 0.5, 0.4]), top_k=1, top_p=1.0)) == [False, True, False]
    assert kept(filter_logits(probs_logits([0.1, 0.5, 0.4]), top_k=0, top_p=1.0)) == [True, True, True]  # 0: off
    assert kept(filter_logits(probs_logits([0.1, 0.5, 0.4]), top_k=99, top_p=1.0)) == [True, True, True]  # k > V


def test_top_p_keeps_first_crossing_token() -> None:
    # cumulative 0.5, 0.8, 1.0: the token that crosses 0.6 (0.3) stays, the rest goes
    assert kept(filter_logits(probs_logits([0.2, 0.5, 0.3]), top_k=0, top_p=0.6)) == [False, True, True]
    # the top token always stays, even with top_p = 0
    assert kept(filter_logits(probs_logits([0.2, 0.5, 0.3]), top_k=0, top_p=0.0)) == [False, True, False]
    # exactly on the threshold: cumulative 0.5 is not > 0.5, so the next token is still kept
    assert kept(filter_logits(probs_logits([0.5, 0.25, 0.25]), top_k=0, top_p=0.5)) == [True, True, False]


def test_top_p_runs_on_the_top_k_renormalised_distribution() -> None:
    # after top-2: 4/7, 3/7; cumulative 0.57 > 0.5 -> only the top token (on the raw probabilities both would stay)
    assert kept(filter_logits(probs_logits([0.4, 0.3, 0.2, 0.1]), top_k=2, top_p=0.5)) == [True, False, False, False]


def transformers_filter(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """transformers 4.10 top_k_top_p_filtering, line by line (reference.md §2)."""
    logits = logits.clone()
    if top_k > 0:
        top_k = min(max(top_k, 1), logits.size(-1))
        logits[logits < torch.topk(logits, top_k)[0][..., -1, None]] = -float("inf")
    if 0 <= top_p <= 1.0:
        sorted_logits, sorted_indices = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative > top_p
        remove[..., 1:] = remove[..., :-1].clone()
        remove[..., 0] = 0
        logits[remove.scatter(1, sorted_indices, remove)] = -float("inf")
    return logits


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (10, 1.0), (0, 0.9), (25, 0.95), (200, 0.5)])
def test_filter_matches_transformers(top_k: int, top_p: float) -> None:
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(top_k)) * 3
    assert torch.equal(torch.isfinite(filter_logits(logits, top_k, top_p)),
                       torch.isfinite(transformers_filter(logits, top_k, top_p)))


def test_guided_logits() -> None:
    cond, uncond = torch.randn(3, 10), torch.randn(3, 10)
    assert torch.equal(guided_logits(cond, uncond, 1.0), cond)
    torch.testing.assert_close(guided_logits(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))
    assert empty_caption_ids(2, 5).tolist() == [[2, 3, 0, 0, 0]] * 2


# ------------------------------------------------------------------ noise and seeds
def test_counter_gumbel_samples_the_softmax() -> None:
    logits = torch.tensor([0.0, 1.0, 2.0, -1.0, 0.5])
    keys = seed_keys(list(range(20000)))
    draws = (logits + counter_gumbel(keys, 3, 5)).argmax(-1)
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    assert (freq - logits.softmax(-1)).abs().max() < 0.015


def test_counter_gumbel_depends_on_seed_and_step_only() -> None:
    keys = seed_keys([11, 12, 2**70 + 5, -3])
    batch = counter_gumbel(keys, 7, 50)
    assert torch.equal(batch[2:3], counter_gumbel(keys[2:3], 7, 50))
    assert not torch.equal(batch, counter_gumbel(keys, 8, 50))
    assert not torch.equal(batch[0], batch[1])
    assert torch.isfinite(batch).all()


def test_same_seed_same_image_at_batch_1_and_8(model: DalleModel) -> None:
    text = captions(model)
    seeds = [101, 7, 2**40 + 3, 0, 5, 6, 99, 1234]
    batch8 = sample_image_codes(model, text, seeds=seeds, **KW)
    assert batch8.shape == (8, model.config.image_seq_length) and batch8.dtype == torch.long
    assert int(batch8.max()) < model.config.image_vocab_size  # image vocabulary only, never text
    for i in (0, 2, 7):
        one = sample_image_codes(model, text[i : i + 1], seeds=[seeds[i]], **KW)
        assert torch.equal(one[0], batch8[i])
    assert len({tuple(r) for r in batch8.tolist()}) == 8  # different seeds, different images
    chunked = sample_image_codes(model, text, seeds=seeds, batch_size=3, **KW)
    assert torch.equal(chunked, batch8)


def test_generator_reproducible(model: DalleModel) -> None:
    text = captions(model, 2)
    a = sample_image_codes(model, text, generator=torch.Generator().manual_seed(3), **KW)
    b = sample_image_codes(model, text, generator=torch.Generator().manual_seed(3), **KW)
    assert torch.equal(a, b)
    seeds = draw_seeds(2, torch.Generator().manual_seed(3))
    assert torch.equal(sample_image_codes(model, text, seeds=seeds, **KW), a)


def test_static_cache_same_codes(model: DalleModel) -> None:
    text = captions(model, 3)
    a = sample_image_codes(model, text, seeds=[1, 2, 3], **KW)
    assert torch.equal(sample_image_codes(model, text, seeds=[1, 2, 3], static_cache=True, **KW), a)


def test_temperature_and_top_k_1_is_greedy(model: DalleModel) -> None:
    text = captions(model, 2)
    a = sample_image_codes(model, text, seeds=[1, 2], top_k=1, top_p=1.0)
    b = sample_image_codes(model, text, seeds=[8, 9], top_k=1, top_p=1.0, temperature=0.3)
    assert torch.equal(a, b)
    assert torch.equal(sample_image_codes(model, text, seeds=[1, 2], top_k=None, top_p=1.0),
                       sample_image_codes(model, text, seeds=[1, 2], top_k=0, top_p=1.0))
    # greedy codes are the argmax of the model's own logits
    P, N, Vt = model.num_text_positions, model.config.image_seq_length, model.config.vocab_size
    with torch.no_grad():
        logits = model(torch.cat([text, a], dim=1))[:, P - 1 : P - 1 + N, Vt:]
    assert torch.equal(logits.argmax(-1), a)


# ------------------------------------------------------------------ guidance
def test_guidance_scale_1_equals_plain_sampling(model: DalleModel) -> None:
    text = captions(model, 4)
    seeds = [1, 2, 3, 4]
    plain = sample_image_codes(model, text, seeds=seeds, **KW)
    assert torch.equal(sample_image_codes(model, text, seeds=seeds, guidance_scale=1.0, **KW), plain)
    # the batched cond + uncond path itself (the public call skips the uncond rows at s = 1)
    with torch.no_grad():
        guided, _ = _generate_batch(model, text, seed_keys(seeds), None, top_k=KW["top_k"], top_p=KW["top_p"],
                                    temperature=1.0, guidance_scale=1.0, progress=None, progress_interval=1,
                                    mode="eager", want_ppl=False)
    assert torch.equal(guided, plain)
    strong = sample_image_codes(model, text, seeds=[1, 2, 3, 4], guidance_scale=4.0, **KW)
    assert not torch.equal(strong, plain)


# ------------------------------------------------------------------ image prompts
def test_border_mask_matches_reference_index_set() -> None:
    D, borders = 6, {"up": 1, "down": 2, "left": 1, "right": 0}
    expected = set()
    for r in range(D):
        for c in range(D):
            if r < borders["up"] or r >= D - borders["down"] or c < borders["left"] or c >= D - borders["right"]:
                expected.add(r * D + c)
    assert set(torch.nonzero(border_mask(D, borders))[:, 0].tolist()) == expected
    with pytest.raises(ValueError, match="missing"):
        border_mask(D, {"up": 1})
    with pytest.raises(ValueError, match="0..6"):
        border_mask(D, {"up": 7, "down": 0, "left": 0, "right": 0})


def test_border_prompt_tokens_survive(model: DalleModel) -> None:
    D, V = model.config.image_tokens_per_dim, model.config.image_vocab_size
    text = captions(model, 3)
    given = (torch.arange(D * D) * 7) % V
    prompt = ImagePrompt.from_borders(given, {"up": 1, "down": 0, "left": 1, "right": 0})
    for scale in (None, 3.0):
        out = sample_image_codes(model, text, seeds=[1, 2, 3], image_prompt=prompt, guidance_scale=scale, **KW)
        assert torch.equal(out[:, prompt.mask], given[prompt.mask].expand(3, -1))
        assert not torch.equal(out[:, ~prompt.mask], given[~prompt.mask].expand(3, -1))


def test_inpainting_mask_per_image(model: DalleModel) -> None:
    """Any (B, N) mask (inpainting): the given tokens stay, whatever their pattern per image."""
    N, V = model.config.image_seq_length, model.config.image_vocab_size
    text = captions(model, 2)
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, V, (2, N), generator=g)
    mask = torch.rand(2, N, generator=g) < 0.5
    out = sample_image_codes(model, text, seeds=[4, 5], image_prompt=ImagePrompt(codes, mask), **KW)
    assert torch.equal(out[mask], codes[mask])
    # an all-known prompt returns the prompt itself
    everything = ImagePrompt(codes, torch.ones(N, dtype=torch.bool))
    full = sample_image_codes(model, text, seeds=[4, 5], image_prompt=everything)
    assert torch.equal(full, codes)
    # grids as VQGAN.encode returns them (B, D, D) are accepted
    D = model.config.image_tokens_per_dim
    grid_prompt = ImagePrompt(codes.view(2, D, D), mask.view(2, D, D))
    grid = sample_image_codes(model, text, seeds=[4, 5], image_prompt=grid_prompt, **KW)
    assert torch.equal(grid, out)
    out[0, 0] = 0  # an ordinary tensor (not an inference tensor): callers may edit it in place
    with pytest.raises(ValueError, match="0..63"):
        sample_image_codes(model, text, image_prompt=ImagePrompt(codes + V, mask), **KW)


# ------------------------------------------------------------------ perplexity and progress
def test_ce_to_ppl_reference_semantics() -> None:
    ce = torch.tensor([[0.0, math.log(2.0), math.log(4.0)], [math.log(3.0), 0.0, 0.0]])
    torch.testing.assert_close(ce_to_ppl(ce), torch.tensor([3.0, 3.0]))


def test_perplexity_alignment_and_generation_scores(model: DalleModel) -> None:
    text = captions(model, 3)
    codes, ppl = sample_image_codes(model, text, seeds=[1, 2, 3], return_perplexity=True, **KW)
    ref = image_perplexity(model, text, codes)
    torch.testing.assert_close(ppl, ref, rtol=1e-4, atol=1e-4)
    # independent slicing of the plain forward: image[j] is predicted by layer position P - 1 + j (v2: P = T + 1)
    cfg = model.config
    P = cfg.text_seq_length + (1 if cfg.hf_version == "v2" else 0)
    with torch.no_grad():
        logits = model(torch.cat([text, codes], dim=1))[:, :, cfg.vocab_size :]
    ce = F.cross_entropy(logits[:, P : P + cfg.image_seq_length - 1].transpose(1, 2), codes[:, 1:], reduction="none")
    torch.testing.assert_close(ref, ce.exp().mean(dim=1), rtol=1e-4, atol=1e-4)


def test_progress_previews(model: DalleModel) -> None:
    text = captions(model, 2)
    seen = []
    out = sample_image_codes(model, text, seeds=[1, 2], progress=lambda s, t, c: seen.append((s, t, c.clone())),
                             progress_interval=5, **KW)
    N = model.config.image_seq_length
    assert [s for s, _, _ in seen] == [5, 10, 15, 16] and all(t == N for _, t, _ in seen)
    for s, _, c in seen:
        assert c.shape == (2, s) and torch.equal(c, out[:, :s])


def test_partial_grid() -> None:
    codes = torch.tensor([[5, 6, 7], [1, 2, 3]])
    grid = partial_grid(codes, 2, fill=9)
    assert grid.tolist() == [[[5, 6], [7, 9]], [[1, 2], [3, 9]]]
    prompt_fill = partial_grid(codes[:, :1], 2, fill=torch.tensor([0, 1, 2, 3]))
    assert prompt_fill.tolist() == [[[5, 1], [2, 3]], [[1, 1], [2, 3]]]
    with pytest.raises(ValueError, match="2x2"):
        partial_grid(torch.zeros(1, 5, dtype=torch.long), 2)


def test_bad_arguments(model: DalleModel) -> None:
    text = captions(model, 2)
    with pytest.raises(ValueError, match="text_ids"):
        sample_image_codes(model, text[:, :5], **KW)
    with pytest.raises(ValueError, match="tokenizer"):
        sample_image_codes(model, text + model.config.vocab_size, **KW)
    with pytest.raises(ValueError, match="top_p"):
        sample_image_codes(model, text, top_k=5, top_p=1.5)
    with pytest.raises(ValueError, match="temperature"):
        sample_image_codes(model, text, temperature=0.0, **KW)
    with pytest.raises(ValueError, match="one seed per image"):
        sample_image_codes(model, text, seeds=[1], **KW)
    with pytest.raises(ValueError, match="cuda_graph"):
        sample_image_codes(model, text, cuda_graph=True, **KW)


def test_training_mode_restored(model: DalleModel) -> None:
    model.train()
    try:
        sample_image_codes(model, captions(model, 1), seeds=[0], **KW)
        assert model.training
    finally:
        model.eval()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_matches_eager() -> None:
    torch.manual_seed(0)
    model = DalleModel(get_preset("tiny")).cuda().eval()
    text = captions(model, 3).cuda()
    for scale in (None, 2.0):
        a = sample_image_codes(model, text, seeds=[1, 2, 3], guidance_scale=scale, **KW)
        b = sample_image_codes(model, text, seeds=[1, 2, 3], guidance_scale=scale, cuda_graph=True, **KW)
        assert torch.equal(a, b)


def test_sampling_settings_give_the_sampler_keywords(model: DalleModel) -> None:
    from holst.errors import ConfigError
    from holst.sampling import SamplingSettings

    settings = SamplingSettings(top_k=40, top_p=0.97, batch_size=2)
    text = captions(model, 3)
    out = sample_image_codes(model, text, seeds=[1, 2, 3], batch_size=2, **settings.sampler_kwargs())
    assert torch.equal(out, sample_image_codes(model, text, seeds=[1, 2, 3], **KW))
    with pytest.raises(ConfigError, match="top_p"):
        SamplingSettings(top_p=1.5)
    with pytest.raises(ConfigError, match="top_p"):
        sample_image_codes(model, text, seeds=[1, 2, 3], top_k=40, top_p=0.0)  # the same range as the settings


# ------------------------------------------------------------------ lean sampler and decoder vs the per-row path
@pytest.mark.parametrize("top_k,top_p,temperature", [(0, 1.0, 1.0), (1, 1.0, 1.0), (10, 1.0, 0.7), (0, 0.9, 1.0),
                                                     (25, 0.95, 1.3), (200, 0.5, 1.0), (8, 0.0, 1.0)])
def test_topk_sampler_equals_full_filter(top_k: int, top_p: float, temperature: float) -> None:
    g = torch.Generator().manual_seed(top_k)
    logits = torch.randn(64, 100, generator=g) * 3
    keys, salt = seed_keys(list(range(64))), vocab_salt_table(100)
    for step in range(5):
        ref = sample_tokens(logits, keys, step, top_k=top_k, top_p=top_p, temperature=temperature, vocab_salt=salt)
        got = sample_tokens_topk(logits, keys, step, top_k=top_k, top_p=top_p, temperature=temperature,
                                 vocab_salt=salt)
        assert torch.equal(got, ref)


def drawn(logits: list[float], top_k: int, top_p: float, n: int = 4000) -> set[int]:
    x = torch.tensor([logits]).expand(n, -1)
    return set(sample_tokens_topk(x, seed_keys(list(range(n))), 0, top_k=top_k, top_p=top_p).tolist())


def test_topk_sampler_ties() -> None:
    """Top-k keeps every logit equal to the k-th (as filter_logits); at a top-p cut that splits equal
    logits, the lower code index is kept."""
    p = torch.tensor([0.5, 0.2, 0.2, 0.1]).log().tolist()
    assert drawn(p, top_k=2, top_p=1.0) == {0, 1, 2}
    assert drawn(p, top_k=1, top_p=1.0) == {0}
    # cumulative 0.5, 0.7, 0.9: the cut at 0.6 keeps one of the two 0.2s: code 1, not code 2
    assert drawn(p, top_k=0, top_p=0.6) == {0, 1}
    assert drawn([0.0, 1.0, 1.0, 1.0], top_k=2, top_p=0.4) == {1, 2}


def grid_model(hf_version: str, D: int) -> DalleModel:
    return shared_grid_model(hf_version, D, image_vocab_size=48)


def both_paths(model: DalleModel, text: torch.Tensor, prompt=None, mode: str = "eager", **kw):
    """(codes, ppl) of the decoder and of the reference-style per-row cache path, same seeds."""
    keys = seed_keys([3 * i + 1 for i in range(text.shape[0])])
    settings = dict(top_k=kw.get("top_k", 12), top_p=kw.get("top_p", 0.9), temperature=kw.get("temperature", 1.0),
                    guidance_scale=kw.get("guidance_scale"), progress=None, progress_interval=1, want_ppl=True)
    with torch.no_grad():
        new = _generate_batch(model, text, keys, prompt, mode=mode, **settings)
        old = _generate_batch_legacy(model, text, keys, prompt, static_cache=False, cuda_graph=False, **settings)
    return new, old


def grid_captions(model: DalleModel, pattern: list[int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(9)
    T = model.config.text_seq_length
    distinct = torch.randint(4, model.config.bpe_vocab_size, (max(pattern) + 1, T), generator=g)
    distinct[:, 0], distinct[:, 5:] = 2, 0
    return distinct[pattern]


@pytest.mark.parametrize("hf_version", ["v3", "v2"])
@pytest.mark.parametrize("D", [4, 12])
@pytest.mark.parametrize("mode", ["eager", "static"])
@pytest.mark.parametrize("guidance", [None, 3.0])
def test_decoder_same_codes_as_reference_path(hf_version: str, D: int, mode: str, guidance: float | None) -> None:
    """Shared captions ([A, A, B, B]: text once per caption), sampled and greedy, with and without guidance."""
    model = grid_model(hf_version, D)
    text = grid_captions(model, [0, 0, 1, 1])
    (new, ppl), (old, ppl_old) = both_paths(model, text, mode=mode, guidance_scale=guidance)
    assert torch.equal(new, old)
    torch.testing.assert_close(ppl, ppl_old, rtol=1e-4, atol=1e-4)
    assert len({tuple(r) for r in new.tolist()}) == 4
    (greedy, _), (greedy_old, _) = both_paths(model, text, mode=mode, guidance_scale=guidance, top_k=1, top_p=1.0)
    assert torch.equal(greedy, greedy_old)


@pytest.mark.parametrize("hf_version", ["v3", "v2"])
def test_decoder_same_codes_with_image_prompts(hf_version: str) -> None:
    model = grid_model(hf_version, 12)
    D, N, V = 12, 144, model.config.image_vocab_size
    text = grid_captions(model, [0, 1, 2])  # all captions differ: one text entry per row
    given = (torch.arange(N) * 7) % V
    borders = ImagePrompt.from_borders(given, {"up": 2, "down": 0, "left": 1, "right": 0})
    g = torch.Generator().manual_seed(0)
    inpaint = (torch.randint(0, V, (3, N), generator=g), torch.rand(3, N, generator=g) < 0.4)
    for prompt in (borders.expand(3, D, torch.device("cpu")), inpaint):
        for guidance in (None, 2.0):
            (new, ppl), (old, ppl_old) = both_paths(model, text, prompt, guidance_scale=guidance)
            assert torch.equal(new, old)
            assert torch.equal(new[prompt[1]], prompt[0][prompt[1]])
            torch.testing.assert_close(ppl, ppl_old, rtol=1e-4, atol=1e-4)


def test_decoder_32x32_grid() -> None:
    """The official grid (D = 32, conv window clamped at the borders) with a tiny model."""
    model = grid_model("v3", 32)
    text = grid_captions(model, [0, 0])
    (new, _), (old, _) = both_paths(model, text, mode="static", guidance_scale=2.0)
    assert torch.equal(new, old)


def test_compiled_step_same_codes_and_reused() -> None:
    """compile=True (torch.compile of the static step, CPU inductor here): same codes; the compiled
    session is kept on the model and reused by the next call with the same shape. (v3 only: one
    compilation is enough; v2 runs the same static step, tested eagerly above.)"""
    torch.manual_seed(0)
    model = DalleModel(get_preset("tiny")).eval()
    model.init_weights(0.3)
    text = captions(model, 2)
    eager = sample_image_codes(model, text, seeds=[1, 2], guidance_scale=2.0, **KW)
    from torch._dynamo.utils import counters

    counters.clear()
    a = sample_image_codes(model, text, seeds=[1, 2], guidance_scale=2.0, compile=True, free_cache=False, **KW)
    assert torch.equal(a, eager)
    # freezing reached inductor: the weights became constants and the linears were packed
    assert counters["inductor"]["mkldnn_linear_weight_pack_matcher_count"] > 0
    kept = dict(model.__dict__["_holst_decode_sessions"])
    b = sample_image_codes(model, text, seeds=[1, 2], guidance_scale=2.0, compile=True, free_cache=False, **KW)
    assert torch.equal(b, eager) and list(kept.values()) == list(model.__dict__["_holst_decode_sessions"].values())
    with torch.inference_mode():  # the pipeline's mode: its own session, then back to the first one
        assert torch.equal(sample_image_codes(model, text, seeds=[1, 2], guidance_scale=2.0, compile=True, **KW), eager)
    assert torch.equal(sample_image_codes(model, text, seeds=[1, 2], guidance_scale=2.0, compile=True, **KW), eager)
    # frozen weights are constants of the compiled graph: changed weights must get a new session
    with torch.no_grad():
        for p in model.transformer.parameters():
            p.mul_(1.5)
    changed = sample_image_codes(model, text, seeds=[1, 2], guidance_scale=2.0, **KW)
    assert not torch.equal(changed, eager)
    assert torch.equal(sample_image_codes(model, text, seeds=[1, 2], guidance_scale=2.0, compile=True, **KW), changed)
    from holst.sampling import clear_decode_sessions

    clear_decode_sessions(model)
    assert "_holst_decode_sessions" not in model.__dict__
