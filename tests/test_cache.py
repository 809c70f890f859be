"""Incremental decoding: cached logits equal full-sequence logits (v2 and v3), cache sizes, int8, dtypes."""

from __future__ import annotations

import copy

import pytest
import torch

from holst.dalle import DalleModel
from holst.dalle.quant import Int8Linear, quantize_linear_layers, quantize_weight, weight_bytes
from holst.presets import get_preset


def make_model(hf_version: str = "v3", attn_impl: str = "sdpa", std: float = 0.3) -> DalleModel:
    torch.manual_seed(0)
    model = DalleModel(get_preset("tiny", hf_version=hf_version), attn_impl=attn_impl).eval()
    model.init_weights(std)  # large weights: peaky attention, so a wrong key set shows in the logits
    return model


def make_batch(model: DalleModel, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    text = torch.randint(4, cfg.bpe_vocab_size, (batch, cfg.text_seq_length), generator=g)
    text[:, 9:] = 0
    codes = torch.randint(0, cfg.image_vocab_size, (batch, cfg.image_seq_length), generator=g)
    return text, codes


def cached_logits(model: DalleModel, text: torch.Tensor, codes: torch.Tensor, n0: int, static: bool) -> torch.Tensor:
    """Image logits predicting tokens 0..N-1 through prefill(n0 known) + one decode step per token."""
    P = model.num_text_positions
    cache = model.new_cache(text.shape[0], static=static)
    out = [model.image_logits(model.prefill(text, codes[:, :n0], cache)[:, P - 1 :])]
    for j in range(n0, model.config.image_seq_length - 1):
        index = cache.index_table[j] if static else j
        out.append(model.image_logits(model.decode_step(codes[:, j : j + 1], index, cache)))
    return torch.cat(out, dim=1)  # (B, N, V)


@pytest.mark.parametrize("hf_version", ["v3", "v2"])
@pytest.mark.parametrize("static", [False, True])
def test_cached_logits_equal_full_forward(hf_version: str, static: bool) -> None:
    model = make_model(hf_version)
    text, codes = make_batch(model)
    cfg, P, N = model.config, model.num_text_positions, model.config.image_seq_length
    with torch.no_grad():
        full = model(torch.cat([text, codes], dim=1))[:, P - 1 : P - 1 + N, cfg.vocab_size :]  # predicts 0..N-1
        assert full.std() > 0.5  # the check below is not trivially satisfied by tiny logits
        for n0 in (0, 6):
            got = cached_logits(model, text, codes, n0, static)
            torch.testing.assert_close(got, full, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("hf_version", ["v3", "v2"])
def test_cached_logits_math_kernel(hf_version: str) -> None:
    """The reference-exact kernel (PB-relax, -10000 masking) through the cache."""
    model = make_model(hf_version, attn_impl="math")
    text, codes = make_batch(model, 2)
    P, N = model.num_text_positions, model.config.image_seq_length
    with torch.no_grad():
        full = model(torch.cat([text, codes], dim=1))[:, P - 1 : P - 1 + N, model.config.vocab_size :]
        torch.testing.assert_close(cached_logits(model, text, codes, 0, False), full, atol=2e-5, rtol=1e-5)


def test_v2_layer_positions_are_shifted() -> None:
    """v2 carries an extra BOS: image token j sits one layer position later than in v3."""
    assert make_model("v3").num_text_positions == 16
    assert make_model("v2").num_text_positions == 17


def test_cache_keeps_only_visible_keys() -> None:
    cfg = get_preset("small")  # 8 layers, D = 16, T = 32
    model = DalleModel(cfg)
    cache = model.new_cache(2)
    T, D, N = cfg.text_seq_length, cfg.image_tokens_per_dim, cfg.image_seq_length
    slots = {kind: {layer.k.shape[2] for layer, k2 in zip(cache.layers, model.transformer.mask_kinds) if k2 == kind}
             for kind in ("row", "col", "conv")}
    assert slots == {"row": {T + D + 1}, "col": {T + N}, "conv": {T + N}}
    col = next(layer for layer in cache.layers if layer.kind == "col")
    # pixel i = 3*D + 5 (row 3, col 5): text keys + rows 0..3 of column 5, column-major slots
    p = T + 3 * D + 5
    k = torch.zeros_like(col.k[:, :, :1])
    keys, _, mask = col.step_dynamic(k, k.clone(), p)
    assert mask is None and keys.shape[2] == T + 4
    assert col.gather_idx[p, T:].tolist()[:4] == [T + 5 * D + r for r in range(4)]
    full_bytes = 2 * cfg.num_layers * 2 * cfg.num_attention_heads * (T + N) * cfg.head_dim * 4
    assert cache.nbytes() < 0.6 * full_bytes


def test_bf16_cache_runs_close() -> None:
    model = make_model("v3", std=0.02)
    text, codes = make_batch(model, 2)
    with torch.no_grad():
        ref = cached_logits(model, text, codes, 0, False)
        model16 = copy.deepcopy(model).to(torch.bfloat16)
        got = cached_logits(model16, text, codes, 0, False).float()
    assert got.dtype == torch.float32
    assert (got - ref).abs().max() < 0.05 * ref.abs().max() + 0.05


def test_quantize_weight_roundtrip() -> None:
    w = torch.randn(7, 33)
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (7,)
    assert (q.float() * scale[:, None] - w).abs().max() <= scale.max() / 2 + 1e-6


def test_int8_logits_close_to_fp32() -> None:
    model = make_model("v3", std=0.02)
    text, codes = make_batch(model, 2)
    q = quantize_linear_layers(copy.deepcopy(model))
    assert isinstance(q.transformer.layers[0].attention.query_key_value, Int8Linear)
    assert isinstance(q.to_logits[1], Int8Linear)
    assert weight_bytes(q) < 0.4 * weight_bytes(model)  # int8 linears (+ fp32 embeddings / norms): measured 0.36
    # per output row, symmetric: every weight within half a step of its row's scale (a per-tensor scale is not)
    lin = torch.nn.Linear(64, 48)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-3, 0, 48)[:, None])  # rows of very different magnitude
    il = Int8Linear(lin)
    assert il.weight_int8.dtype == torch.int8 and il.scale.shape == (48,)
    deq = il.weight_int8.float() * il.scale.float()[:, None]
    row_max = lin.weight.detach().abs().amax(dim=1, keepdim=True)
    assert ((deq - lin.weight).abs() <= row_max / 254 * (1 + 1e-5)).all()  # half of the row's 1/127 step
    x = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(il(x), x @ deq.T + lin.bias, atol=1e-5, rtol=1e-5)
    ids = torch.cat([text, codes], dim=1)
    with torch.no_grad():
        ref, got = model(ids), q(ids)
        rel = (got - ref).norm() / ref.norm()
        assert rel < 0.02, rel
        # the cached path uses the head's image rows of the int8 matrix
        cached = cached_logits(q, text, codes, 0, False)
        P, N = q.num_text_positions, q.config.image_seq_length
        torch.testing.assert_close(cached, got[:, P - 1 : P - 1 + N, q.config.vocab_size :], atol=1e-4, rtol=1e-4)


def test_prefill_rejects_full_image() -> None:
    model = make_model()
    text, codes = make_batch(model, 1)
    with pytest.raises(ValueError, match="at most N - 1"):
        model.prefill(text, codes, model.new_cache(1))


@pytest.mark.parametrize("hf_version", ["v3", "v2"])
@pytest.mark.parametrize("static", [False, True])
def test_cached_logits_12x12_grid(hf_version: str, static: bool) -> None:
    """D = 12 > 2 x 5 + 1: the conv layer really masks keys (v3 clamped, v2 wrapped around the edges),
    and row/col layers run their ring and column gathers over many rows."""
    from holst.config import DalleConfig
    from holst.dalle.masks import build_mask

    cfg = DalleConfig(num_layers=3, hidden_size=32, num_attention_heads=2, text_seq_length=8, image_tokens_per_dim=12,
                      vocab_size=64 + 8, image_vocab_size=32, embedding_dropout_prob=0.0, attention_dropout_prob=0.0,
                      output_dropout_prob=0.0, hf_version=hf_version)
    conv = build_mask("conv", 8, 12, hf_version=hf_version)
    assert not torch.equal(conv, torch.ones_like(conv).tril())  # the window hides some causal keys
    torch.manual_seed(0)
    model = DalleModel(cfg).eval()
    model.init_weights(0.3)
    text, codes = make_batch(model, 2)
    P, N = model.num_text_positions, cfg.image_seq_length
    with torch.no_grad():
        full = model(torch.cat([text, codes], dim=1))[:, P - 1 : P - 1 + N, cfg.vocab_size :]
        torch.testing.assert_close(cached_logits(model, text, codes, 0, static), full, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(cached_logits(model, text, codes, 30, static), full, atol=2e-5, rtol=1e-5)


# ------------------------------------------------------------------ shared-prefix decoder (holst/dalle/decode.py)
def decoder_logits(model: DalleModel, text: torch.Tensor, codes: torch.Tensor, static: bool) -> torch.Tensor:
    """Image logits predicting tokens 0..N-1 through Decoder: text once per distinct caption, then
    one pixel per step (teacher forcing). Rows are [text 0] x G + [text 1] x G ... (text (U, T))."""
    from holst.dalle.decode import Decoder

    cfg = model.config
    U, G = text.shape[0], codes.shape[0] // text.shape[0]
    R, D, N = codes.shape[0], cfg.image_tokens_per_dim, cfg.image_seq_length
    dec = Decoder(model, R, G, torch.device("cpu"), torch.float32)
    hidden, pixels = dec.prefill_text(text, list(range(U)))
    rows = torch.arange(R) // G
    pix = (lambda p: torch.tensor(p)) if static else (lambda p: p)
    out = []
    if cfg.hf_version == "v2":  # the last text token is mask pixel 0
        out.append(model.image_logits(dec.step(pixels.index_select(0, rows), pix(0))))
        off = 1
    else:
        out.append(model.image_logits(hidden[:, -1:]).index_select(0, rows))
        off = 0
    for j in range(N - 1):
        jt = torch.tensor(j)
        x = model.image_embeddings(codes[:, j : j + 1]) + model.image_row_embeddings(jt // D) + \
            model.image_col_embeddings(jt % D)
        out.append(model.image_logits(dec.step(x, pix(j + off))))
    return torch.cat(out, dim=1)  # (R, N, V)


def grid_model(hf_version: str, D: int, image_vocab_size: int = 32) -> DalleModel:
    """A 3-layer (row, column, conv) model on a D x D grid, seeded weights, no dropout (also used by test_sampling)."""
    from holst.config import DalleConfig

    cfg = DalleConfig(num_layers=3, hidden_size=32, num_attention_heads=2, text_seq_length=8, image_tokens_per_dim=D,
                      vocab_size=64 + 8, image_vocab_size=image_vocab_size, embedding_dropout_prob=0.0,
                      attention_dropout_prob=0.0, output_dropout_prob=0.0, hf_version=hf_version)
    torch.manual_seed(0)
    model = DalleModel(cfg).eval()
    model.init_weights(0.3)
    return model


@pytest.mark.parametrize("hf_version", ["v3", "v2"])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("D", [4, 12])
def test_decoder_logits_equal_full_forward(hf_version: str, static: bool, D: int) -> None:
    """Shared text keys (2 captions x 2 rows each), row ring, column view, conv window: the logits of
    every step equal the plain forward of each row's own sequence."""
    model = make_model(hf_version) if D == 4 else grid_model(hf_version, D)
    text, codes = make_batch(model, 4)
    text = text[[0, 0, 1, 1]]
    cfg, P, N = model.config, model.num_text_positions, model.config.image_seq_length
    with torch.no_grad():
        full = model(torch.cat([text, codes], dim=1))[:, P - 1 : P - 1 + N, cfg.vocab_size :]
        assert full.std() > 0.5
        got = decoder_logits(model, text[[0, 2]], codes, static)
    torch.testing.assert_close(got, full, atol=2e-5, rtol=1e-5)


def test_decoder_keeps_only_visible_keys() -> None:
    """Per row: D + 1 ring slots (row), N (col, conv); text once per caption, not per row."""
    from holst.dalle.decode import Decoder, DecodeTables

    cfg = get_preset("small")  # 8 layers, D = 16, T = 32
    model = DalleModel(cfg)
    T, D = cfg.text_seq_length, cfg.image_tokens_per_dim
    dec = Decoder(model, 8, 8, torch.device("cpu"), torch.float32)
    old = model.new_cache(8)
    assert dec.nbytes() < 0.8 * old.nbytes()
    assert all(kt.shape[0] == 1 for kt in dec.kt)  # one caption's text keys for 8 rows
    tables = DecodeTables(T, D, "v3", torch.device("cpu"), torch.float32)
    assert max(len(x) for x in tables.conv_lists) == 5 * 11 + 6  # 11x11 window, causal half
    i = 5 * D + 7  # row 5, column 7: rows 0..5 of the window, columns 2..12
    expected = [r * D + c for r in range(0, 6) for c in range(2, 13) if r * D + c <= i]
    assert tables.conv_lists[i].tolist() == expected


def test_text_group_size() -> None:
    from holst.dalle.decode import text_group_size

    t = torch.tensor([[1], [1], [2], [2], [2], [2]])
    assert text_group_size(t) == 2
    assert text_group_size(t[:5]) == 1
    assert text_group_size(t[2:]) == 4
