"""Training speed paths: block-sparse attention, the lean loss, compiled steps, precision 'auto'.

Each fast path is checked against the slow one it replaces (the dense masked attention and the
reference-exact 'math' kernel; the loss over the full logits tensor; eager steps; fp32).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import holst.dalle.model as dalle_model
from holst.config import DalleConfig
from holst.dalle import DalleModel, build_mask
from holst.dalle.attention import attention_math, attention_sparse, sparse_layout
from holst.presets import get_preset
from holst.train.optim import build_optimizer


def qkv(B: int, nh: int, S: int, hd: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, nh, S, hd, generator=g).requires_grad_() for _ in range(3)]


def grads_of(out: torch.Tensor, tensors: list[torch.Tensor], weight: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad((out * weight).sum(), tensors))


# ------------------------------------------------------------------------------ block-sparse attention


@pytest.mark.parametrize("version", ["v2", "v3"])
@pytest.mark.parametrize("T,D", [(16, 8), (6, 4), (128, 32)])
def test_sparse_layout_is_the_mask_band(version, T, D):
    layouts = {kind: sparse_layout(build_mask(kind, T, D, hf_version=version), T, D) for kind in ("row", "col", "conv")}
    row, col, conv = layouts["row"], layouts["col"], layouts["conv"]
    # row: the previous and the current image row; col: the own column only, in column order
    assert (row.window, row.transpose) == (1, False) and (col.window, col.transpose) == (0, True)
    # the v3 conv window (11 x 11, causal) spans 6 rows: a band only when that is a small part of the grid
    if version == "v3" and D == 32:
        assert (conv.window, conv.transpose) == (5, False)
    else:
        assert conv is None  # v2 wraps around the grid: no band; small grids: dense is as cheap


def test_sparse_layout_rejects_masks_it_cannot_cover():
    T, D = 6, 4
    S = T + D * D
    assert sparse_layout(torch.ones(S, S, dtype=torch.bool).tril(), T, D) is None  # full causal: no band
    m = build_mask("row", T, D).clone()
    m[T + 15, T] = True  # one far key: the band would miss it
    assert sparse_layout(m, T, D) is None
    assert sparse_layout(build_mask("row", T, D)[:-1, :-1], T, D) is None  # a partial sequence


@pytest.mark.parametrize("kind,T,D", [("row", 16, 8), ("col", 16, 8), ("row", 5, 4), ("col", 5, 4),
                                      ("conv", 12, 16)])
def test_sparse_attention_equals_dense_masked_attention(kind, T, D):
    mask = build_mask(kind, T, D)
    layout = sparse_layout(mask, T, D)
    assert layout is not None
    q, k, v = qkv(2, 3, T + D * D, 8)
    weight = torch.randn(2, 3, T + D * D, 8, generator=torch.Generator().manual_seed(1))
    out = attention_sparse(q, k, v, layout)
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    oracle = attention_math(q, k, v, mask, pb_relax=True)  # the reference's kernel, -10000 masking
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, oracle, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads_of(out, [q, k, v], weight), grads_of(oracle, [q, k, v], weight)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kernel", ["sparse", "dense"])
def test_attention_dropout_drops_and_rescales(kernel):
    """Attention dropout in training: the block-sparse kernel, and the dense (sdpa) one, which on a CPU
    writes the scores out for holst's dropout; eval mode and p = 0 are the plain kernels."""
    from holst.dalle.attention import attention_sdpa

    T, D = 6, 4
    if kernel == "sparse":
        layout = sparse_layout(build_mask("row", T, D), T, D)
        attend = lambda q, k, v, **kw: attention_sparse(q, k, v, layout, **kw)  # noqa: E731
    else:
        mask = build_mask("conv", T, D)
        attend = lambda q, k, v, **kw: attention_sdpa(q, k, v, mask, **kw)  # noqa: E731
    q, k, v = qkv(4, 2, T + D * D, 8)
    v_ones = torch.ones_like(v)
    torch.manual_seed(0)
    dropped = attend(q, k, v_ones, dropout_p=0.5, training=True)
    # with v = 1 each output is the sum of the kept probabilities x 2: some rows lose mass, some gain
    assert not torch.allclose(dropped, torch.ones_like(dropped))
    assert dropped.mean().item() == pytest.approx(1.0, abs=0.1)
    plain = attend(q, k, v)
    assert torch.equal(attend(q, k, v, dropout_p=0.5, training=False), plain)
    torch.testing.assert_close(attend(q, k, v, dropout_p=0.0, training=True), plain, atol=1e-5, rtol=1e-5)


CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                        reason="needs CUDA")])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("version", ["v2", "v3"])
def test_sparse_model_step_equals_math_model(version, device):
    c = get_preset("tiny", hf_version=version)
    torch.manual_seed(0)
    ref = DalleModel(c, attn_impl="math").to(device)
    fast = DalleModel(c, attn_impl="sparse").to(device)
    fast.load_state_dict(ref.state_dict())
    ids = sample_ids(c, 3).to(device)
    out_ref, out_fast = ref(ids), fast(ids)  # training mode, dropout 0 in the tiny preset
    torch.testing.assert_close(out_fast, out_ref, atol=1e-5, rtol=1e-5)
    ref.compute_loss(ids, logits=out_ref)[0].backward()  # the training loss: gradients of O(0.01..1)
    fast.compute_loss(ids, logits=out_fast)[0].backward()
    for (name, a), b in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4, msg=name)
    # a partial sequence (generation prefill) runs dense sdpa and still agrees
    with torch.no_grad():
        torch.testing.assert_close(fast(ids[:, :-5]), ref(ids[:, :-5]), atol=1e-5, rtol=1e-5)


def test_trainer_attends_block_sparse_by_default(tmp_path):
    """`holst train dalle` without an attn_impl (fresh or init_from) trains its row and column layers
    with band layouts; the v3 conv mask of an 8x8 grid has no band and stays dense."""
    from holst.dalle.attention import SparseLayout
    from holst.train.config import DalleTrainConfig
    from holst.train.dalle import build_model

    fresh = build_model(DalleTrainConfig(model="tiny", model_overrides={"image_tokens_per_dim": 8}))
    fresh.save_pretrained(tmp_path / "m")
    loaded = build_model(DalleTrainConfig(init_from=str(tmp_path / "m")))
    for model in (fresh, loaded):
        masks = model.attention_masks(model.config.total_seq_length, torch.device("cpu"))
        assert [type(masks[k]) for k in ("row", "col", "conv")] == [SparseLayout, SparseLayout, torch.Tensor]


def test_sparse_attention_under_activation_checkpointing_gives_the_same_step():
    """Checkpointed layers get the band layouts as arguments and recompute the same forward:
    the loss and every gradient equal those of the plain sparse model."""
    c = get_preset("tiny", image_tokens_per_dim=8)
    ids = sample_ids(c, 2)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = DalleModel(c, attn_impl="sparse").train()
        model.gradient_checkpointing = checkpointing
        calls = []
        model.transformer.layers[1].register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))  # col layer
        loss, _ = model(ids, return_loss=True)
        loss.backward()
        assert len(calls) == 1 + checkpointing  # checkpointed: its forward ran again in the backward
        grads.append([loss.detach()] + [p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------ lean loss


def sample_ids(c: DalleConfig, B: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(4, c.bpe_vocab_size, (B, c.text_seq_length), generator=g)
    text[0, 5:] = 0  # pads, scored as in the reference
    return torch.cat([text, torch.randint(0, c.image_vocab_size, (B, c.image_seq_length), generator=g)], 1)


@pytest.mark.parametrize("version,quirk", [("v2", False), ("v3", False), ("v3", True)])
@pytest.mark.parametrize("chunk", [None, 100])
def test_lean_loss_equals_loss_over_full_logits(version, quirk, chunk, monkeypatch):
    if chunk is not None:  # a few rows per chunk, so that several chunks add up
        monkeypatch.setattr(dalle_model, "LOSS_CHUNK_ELEMENTS", chunk * 64)
    c = get_preset("tiny", hf_version=version, v3_reference_loss=quirk, loss_img_weight=3.0)
    torch.manual_seed(0)
    model = DalleModel(c)
    ids = sample_ids(c, 3)
    dense, dparts = model.compute_loss(ids, logits=model(ids))
    dense_grads = torch.autograd.grad(dense, list(model.parameters()))
    lean, lparts = model(ids, return_loss=True)
    lean_grads = torch.autograd.grad(lean, list(model.parameters()))
    torch.testing.assert_close(lean, dense, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lparts["text"], dparts["text"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lparts["image"], dparts["image"], atol=1e-6, rtol=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), lean_grads, dense_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_lean_loss_under_bf16_autocast_matches_dense_and_keeps_fp32_grads():
    c = get_preset("tiny")
    torch.manual_seed(0)
    model = DalleModel(c)
    ids = sample_ids(c, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids)
        lean, _ = model(ids, return_loss=True)
    dense, _ = model.compute_loss(ids, logits=logits)
    assert lean.dtype == torch.float32
    assert abs(lean.item() - dense.item()) < 2e-2
    head = model.to_logits[1].weight
    g_lean, = torch.autograd.grad(lean, [head])
    g_dense, = torch.autograd.grad(dense, [head])
    assert g_lean.dtype == torch.float32
    assert F.cosine_similarity(g_lean.flatten(), g_dense.flatten(), dim=0).item() > 0.99


def test_lean_loss_keeps_lora_on_the_head():
    from holst.train.lora import apply_lora

    c = get_preset("tiny")
    torch.manual_seed(0)
    model = DalleModel(c)
    apply_lora(model, rank=2, alpha=4.0, targets=["to_logits.1"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.to_logits[1].lora_B.normal_()  # a non-zero update, so that skipping the hook would show
    ids = sample_ids(c, 2)
    lean, _ = model(ids, return_loss=True)
    dense, _ = model.compute_loss(ids, logits=model(ids))
    torch.testing.assert_close(lean, dense)


# ------------------------------------------------------------------------- compile, precision 'auto'


def fixed_pairs(c: DalleConfig) -> torch.Tensor:
    """Four captions, each with its own random image: a small task a model must memorise."""
    g = torch.Generator().manual_seed(0)
    text = torch.zeros(4, c.text_seq_length, dtype=torch.long)
    text[:, 0], text[:, 2] = 2, 3
    text[:, 1] = torch.tensor([10, 11, 12, 13])
    return torch.cat([text, torch.randint(0, c.image_vocab_size, (4, c.image_seq_length), generator=g)], 1)


def engine_steps(tmp_path, c: DalleConfig, steps: int, **train) -> tuple[list[float], DalleModel, str]:
    """``steps`` Engine steps of the lean loss on the fixed pairs; returns (losses, bare model, precision)."""
    from holst.config import TrainConfig
    from holst.train.engine import Engine
    from holst.train.optim import build_optimizer, build_scheduler

    train = {"lr": 3e-3, "device": "cpu", **train}
    cfg = TrainConfig(out_dir=str(tmp_path), tensorboard=False, warmup_steps=0, max_steps=steps,
                      min_lr_ratio=1.0, **train)
    engine = Engine(cfg, install_signal_handler=False)
    torch.manual_seed(0)
    bare = DalleModel(c, attn_impl="sparse")
    model, optimizer = engine.prepare(bare, lambda m: build_optimizer(m, cfg))
    scheduler = build_scheduler(optimizer, cfg)
    ids = fixed_pairs(c).to(engine.device)
    losses = []
    for _ in range(steps):
        with engine.autocast():
            loss, parts = model(ids, return_loss=True)
        engine.step(loss, optimizer, scheduler, model=model)
        losses.append(parts["image"].item())
    engine.close()
    return losses, bare, engine.precision


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_compiled_steps_equal_eager_steps(tmp_path, device):
    c = get_preset("tiny", num_layers=2)  # a row and a column layer: a small graph to compile
    # plain SGD: parameters move by lr x gradient (Adam would blow float noise in ~0 gradients up to lr)
    sgd = dict(precision="fp32", optimizer="sgd", lr=0.5, device=device)
    eager, m_eager, _ = engine_steps(tmp_path / "eager", c, 3, **sgd)
    compiled, m_compiled, _ = engine_steps(tmp_path / "compiled", c, 3, compile=True, **sgd)
    assert compiled == pytest.approx(eager, abs=1e-5)
    assert eager[-1] < eager[0]
    for (name, a), b in zip(m_eager.named_parameters(), m_compiled.parameters()):
        assert (a - b).abs().max().item() < 1e-5, name


def test_precision_auto_reads_the_cpu_flags(tmp_path, monkeypatch):
    from holst.train import engine as engine_mod

    with_bf16, without = tmp_path / "bf16", tmp_path / "plain"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n")
    without.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n")
    assert engine_mod.cpu_has_native_bf16(str(with_bf16))
    assert not engine_mod.cpu_has_native_bf16(str(without))
    assert not engine_mod.cpu_has_native_bf16(str(tmp_path / "missing"))
    cpu = torch.device("cpu")
    monkeypatch.setattr(engine_mod, "cpu_has_native_bf16", lambda: True)
    assert engine_mod.resolve_precision("auto", cpu) == "bf16"
    assert engine_mod.resolve_precision("fp32", cpu) == "fp32"
    monkeypatch.setattr(engine_mod, "cpu_has_native_bf16", lambda: False)
    assert engine_mod.resolve_precision("auto", cpu) == "fp32"


def test_tiny_model_learns_as_well_in_bf16_autocast_as_in_fp32(tmp_path):
    c = get_preset("tiny")
    fp32, _, p32 = engine_steps(tmp_path / "fp32", c, 120, precision="fp32")
    bf16, _, p16 = engine_steps(tmp_path / "bf16", c, 120, precision="bf16")
    assert (p32, p16) == ("fp32", "bf16")
    assert fp32[0] > 3.5 and bf16[0] > 3.5  # ~ln(64) at the start
    assert fp32[-1] < 0.3  # the images are memorised given their captions
    assert bf16[-1] < max(0.3, fp32[-1] + 0.1)  # and as well under bf16 autocast


# ---------------------------------------------------------------------------------------------- dropout
def test_cpu_dropout_rate_scale_gradient_and_independence():
    from holst.dalle.dropout import dropout, quantized_p

    p = quantized_p(0.1)
    assert p == 6554 / 65536
    x = torch.ones(1 << 20, requires_grad=True)
    torch.manual_seed(0)
    y = dropout(x, 0.1)
    kept = y != 0
    # 2**20 draws: the drop rate is within 5 standard deviations (0.0015) of p
    assert abs((~kept).float().mean().item() - p) < 1.5e-3
    assert torch.equal(y[kept], torch.full_like(y[kept], 1 / (1 - p)))  # one exact scale
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / (1 - p))
    # the four fields of one 64-bit draw are independent: neighbours drop together at rate p**2
    both = (~kept[:-1] & ~kept[1:]).float().mean().item()
    assert abs(both - p * p) < 5e-4
    in_draw = (~kept).view(-1, 4).float()
    assert abs((in_draw[:, 3].mean() - p).item()) < 3e-3  # the top field keeps its 16 random bits
    torch.manual_seed(0)
    assert torch.equal(dropout(x.detach(), 0.1), y.detach())  # torch's seed makes it reproducible
    assert dropout(x, 0.1, training=False) is x and dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))


def test_model_dropouts_are_holst_dropout_without_state():
    from holst.dalle.dropout import Dropout

    c = get_preset("tiny")
    model = DalleModel(c)
    kinds = [m for m in model.modules() if isinstance(m, torch.nn.Dropout | Dropout)]
    assert kinds and all(isinstance(m, Dropout) for m in kinds)
    assert not any(".dropout" in k or "output_dropout" in k for k in model.state_dict())
    with pytest.raises(ValueError):
        Dropout(1.5)


def test_compiled_cpu_dropout_draws_each_mask_once():
    """Under torch.compile on a CPU the mask comes from holst's opaque op: two dropouts of one tensor get
    their own masks (the compiler must not merge the calls), the backward pass uses the forward's mask
    (it must not draw again), with the rate and the exact scale of the eager path."""
    from holst.dalle.dropout import dropout, quantized_p

    p = quantized_p(0.1)
    x = torch.ones(1 << 18, requires_grad=True)
    a, b = torch.compile(lambda t: (dropout(t, 0.1), dropout(t, 0.1)), fullgraph=True)(x)
    (a + 2 * b).sum().backward()
    ka, kb = a != 0, b != 0
    assert not torch.equal(ka, kb)
    assert abs((~ka).float().mean().item() - p) < 3e-3 and abs((~kb).float().mean().item() - p) < 3e-3
    assert torch.equal(a[ka], torch.full_like(a[ka], 1 / (1 - p)))
    assert torch.equal(x.grad, (ka.float() + 2 * kb.float()) / (1 - p))



def test_compiled_cpu_dropout_under_checkpointing_recomputes_the_same_mask():
    from torch.utils.checkpoint import checkpoint

    from holst.dalle.dropout import dropout, quantized_p

    x = torch.ones(1 << 16, requires_grad=True)
    y = torch.compile(lambda t: checkpoint(lambda u: dropout(u * 2.0, 0.5), t, use_reentrant=False))(x)
    y.sum().backward()
    kept = y != 0
    assert 0.45 < kept.float().mean().item() < 0.55
    assert torch.equal(x.grad, 2.0 * kept.float() / (1 - quantized_p(0.5)))

def test_compiled_gelu_tanh_is_the_tanh_approximation():
    """The sigmoid form compiled for a CPU is GELU's tanh approximation, values and gradients."""
    from holst.dalle.model import gelu_tanh

    x = torch.linspace(-8, 8, 4099, dtype=torch.float64).float().requires_grad_()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    y = torch.compile(gelu_tanh, fullgraph=True)(x)
    y.backward(g)
    xr = x.detach().clone().requires_grad_()
    yr = F.gelu(xr, approximate="tanh")
    yr.backward(g)
    torch.testing.assert_close(y, yr, atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)


def test_compile_without_a_cpp_compiler_is_one_config_error(tmp_path, monkeypatch):
    from torch._inductor import cpp_builder, exc

    from holst.config import TrainConfig
    from holst.errors import ConfigError
    from holst.train.engine import Engine

    def no_compiler():
        raise exc.InvalidCxxCompiler

    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_compiler)
    engine = Engine(TrainConfig(out_dir=str(tmp_path), device="cpu", tensorboard=False, compile=True),
                    install_signal_handler=False)
    with pytest.raises(ConfigError, match="C\\+\\+ compiler"):
        engine.prepare(DalleModel(get_preset("tiny")))
    engine.close()


# ------------------------------------------------------------------------ CPU attention with a backward
@pytest.mark.parametrize("kind", ["none", "causal", "mask"])
def test_written_attention_equals_fused_attention(kind):
    from holst.utils.attention import written_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.rand(9, 9, generator=g) < 0.6
    mask[torch.arange(9), torch.arange(9)] = True  # every query sees a key
    mask = {"none": None, "causal": torch.ones(9, 9, dtype=torch.bool).tril(), "mask": mask}[kind]
    grad_out = torch.randn(2, 3, 9, 8, generator=g)
    written = written_attention(q, k, v, mask)
    fused = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(written, fused, atol=1e-5, rtol=1e-5)
    grads = torch.autograd.grad(written, (q, k, v), grad_out)
    for a, b in zip(grads, torch.autograd.grad(fused, (q, k, v), grad_out)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_cpu_bf16_training_attention_writes_scores_out(monkeypatch):
    """DALL-E, CLIP and the VQGAN call torch's fused attention in bf16 only where no backward follows
    (its CPU backward is slow), and in fp32 always."""
    from holst.dalle.attention import attention_sdpa
    from holst.rerank.clip import SelfAttention
    from holst.vqgan.layers import AttnBlock

    calls = []
    fused = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or fused(*a, **kw))
    clip_attn, vq_attn = SelfAttention(8, 2), AttnBlock(8, groups=4)
    for module in (clip_attn, vq_attn):
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.3)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    g = torch.Generator().manual_seed(0)
    q32, x32 = torch.randn(2, 2, 5, 4, generator=g), torch.randn(2, 5, 8, generator=g)
    image32 = torch.randn(2, 8, 3, 3, generator=g)

    def run(dtype):
        clip_attn.to(dtype), vq_attn.to(dtype)
        q = q32.to(dtype).requires_grad_()
        return [attention_sdpa(q, q, q, mask), clip_attn(x32.to(dtype), causal=True), vq_attn(image32.to(dtype))]

    outs = run(torch.bfloat16)
    sum(o.float().sum() for o in outs).backward()
    assert calls == []
    with torch.no_grad():
        again = run(torch.bfloat16)
    assert len(calls) == 3
    for a, b in zip(outs, again):
        torch.testing.assert_close(a.detach().float(), b.float(), atol=3e-2, rtol=3e-2)
    calls.clear()
    run(torch.float32)
    assert len(calls) == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_key_scores_equal_q_kt_with_a_row_major_key_gradient(dtype):
    """key_scores is q @ k^T (values and both gradients bit for bit) whose key gradient arrives
    [.., K, hd] row-major: autograd's own formula hands it over hd-major (a transpose), which the
    compiled kernels gathering it into the qkv gradient then read with scalar loops."""
    from holst.utils.attention import key_scores

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 5, 8, generator=g).to(dtype).requires_grad_()
    k = torch.randn(2, 3, 7, 8, generator=g).to(dtype).requires_grad_()
    grad_out = torch.randn(2, 3, 5, 7, generator=g).to(dtype)
    strides = []
    k_view = k * 1  # a non-leaf, so its hook sees the gradient as key_scores hands it over
    k_view.register_hook(lambda grad: strides.append(grad.stride()))
    out = key_scores(q, k_view)
    torch.testing.assert_close(out, q @ k.transpose(-1, -2), atol=0, rtol=0)
    dq, dk = torch.autograd.grad(out, (q, k), grad_out)
    ref_q, ref_k = torch.autograd.grad(q @ k.transpose(-1, -2), (q, k), grad_out)
    torch.testing.assert_close(dq, ref_q, atol=0, rtol=0)
    torch.testing.assert_close(dk, ref_k, atol=0, rtol=0)
    assert strides == [(3 * 7 * 8, 7 * 8, 8, 1)]
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 inputs: the product in bf16, fp32 gradients
        q32 = torch.randn(2, 5, 8, generator=g, requires_grad=True)
        mixed = key_scores(q32, torch.randn(2, 7, 8, generator=g))
    assert mixed.dtype == torch.bfloat16
    mixed.float().sum().backward()
    assert q32.grad.dtype == torch.float32


# ------------------------------------------------------------------------------------------ bench helpers
def bench_module(monkeypatch, name: str):
    """bench/<name>.py as a module, with bench/ on the path (the scripts import their sibling ``timing``
    by name, as when run as scripts)."""
    import importlib.util
    import sys
    from pathlib import Path

    bench = Path(__file__).parents[1] / "bench"
    monkeypatch.syspath_prepend(str(bench))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", bench / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, f"bench_{name}", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bench_interleaved_steps_run_round_robin(monkeypatch):
    """bench/train.py --interleave: each set-up warmed up in turn, then step i of every one before step
    i + 1 of any; medians and last results per set-up."""
    timing = bench_module(monkeypatch, "timing")
    calls = []

    def make(name: str):
        return lambda: calls.append(name) or len(calls)

    out = timing.interleaved_steps([make("a"), make("b")], steps=3, warmup=2, device=torch.device("cpu"))
    assert calls == ["a", "a", "b", "b", "a", "b", "a", "b", "a", "b"]
    assert [o["last"] for o in out] == [9, 10]
    assert all(o["step_s"] >= 0 and o["cpu_s"] >= 0 and o["warmup_s"] >= 0 for o in out)


def test_bench_step_gemms_count_the_steps_matmul_flops(monkeypatch):
    """bench/train.py's matmul floor times exactly the dense matmuls of a training step: their FLOPs equal
    what torch's FLOP counter sees in mm/addmm over a lean-loss forward + backward."""
    from torch.utils.flop_counter import FlopCounterMode

    bench_train = bench_module(monkeypatch, "train")
    config = get_preset("tiny")
    torch.manual_seed(0)
    model = DalleModel(config, attn_impl="sdpa").train()  # fused attention: no bmm in the count
    batch = 3
    ids = torch.cat([torch.randint(4, config.bpe_vocab_size, (batch, config.text_seq_length)),
                     torch.randint(0, config.image_vocab_size, (batch, config.image_seq_length))], 1)
    with FlopCounterMode(display=False) as counter:
        loss, _ = model(ids, return_loss=True)
        loss.backward()
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    gemms = bench_train.step_gemms(config, batch)
    assert len(gemms) == 3 * (4 * config.num_layers + 2)
    assert counts["aten.mm"] + counts["aten.addmm"] == 2 * sum(m * k * n for m, k, n in gemms)


def test_bench_foreach_adamw_matches_the_fused_one(monkeypatch):
    """The bench baseline's optimizer (foreach AdamW, holst's CPU optimizer before the fused kernel) keeps
    every group's hyper-parameters and takes the same steps as the fused one it replaces."""
    from types import SimpleNamespace

    bench_train = bench_module(monkeypatch, "train")
    # eps 1e-3: Adam would blow the rounding noise of (mathematically) zero gradients, such as the key bias's,
    # up to full steps, differently in each optimizer
    cfg = SimpleNamespace(lr=1e-2, betas=(0.9, 0.99), eps=1e-3, weight_decay=0.1, optimizer="adamw", freeze=())
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(DalleModel(get_preset("tiny")))
    fused = build_optimizer(models[0], cfg)
    foreach = bench_train.foreach_adamw(build_optimizer(models[1], cfg))
    assert [g["weight_decay"] for g in foreach.param_groups] == [g["weight_decay"] for g in fused.param_groups]
    assert all(g["foreach"] and not g["fused"] for g in foreach.param_groups)
    assert all(g["fused"] for g in fused.param_groups)
    ids = torch.randint(0, 64, (2, get_preset("tiny").total_seq_length))
    ids[:, :16] += 4
    for _ in range(3):
        for model, opt in zip(models, (fused, foreach)):
            opt.zero_grad()
            loss, _ = model(ids, return_loss=True)
            loss.backward()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # steps are 1e-2: moved alike


def test_bench_rounds_merge_into_medians(monkeypatch):
    """bench/train.py --rounds: each row is its median round, its ratio the median of the rounds' ratios
    (not the ratio of medians), shares come from the merged rows, and every round is listed."""
    bench_train = bench_module(monkeypatch, "train")
    rounds = []
    for base_s, fast_s in [(2.0, 1.0), (3.0, 1.1), (2.2, 0.8)]:
        rows = [{"change": "base", "step_s": base_s, "tokens_per_s": 100 / base_s},
                {"change": "fast", "step_s": fast_s, "tokens_per_s": 100 / fast_s}]
        bench_train.add_ratios(rows)
        rounds.append(rows)
    base, fast = bench_train.merge_rounds(rounds)
    assert base["step_s"] == 2.2 and fast["step_s"] == 1.0
    assert fast["speedup_vs_baseline"] == 2.727  # median of 2.0, 2.727, 2.75
    assert fast["rounds"] == {"step_s": [1.0, 1.1, 0.8], "speedup_vs_baseline": [2.0, 2.727, 2.75]}
    assert fast["share_of_gain"] == 1.0 and base["share_of_gain"] == 0.0


# ------------------------------------------------------------------------------------------ memory reuse
MALLOC_PROBE = r"""
import resource, sys
import torch
from holst.utils.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else False
def step():  # a training step's pattern: large buffers written, then all freed at once
    bufs = [torch.ones(6 * 2**20) for _ in range(8)]  # 8 x 24 MiB
    del bufs
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_keep_freed_memory_stops_the_page_faults_of_reallocated_buffers():
    """After keep_freed_memory, a third round of allocating and freeing 192 MiB faults (almost) no pages in
    (now and then one block lands on fresh heap: 1/8 of the pages). glibc's default unmaps the blocks and
    faults most or all of the ~49k pages back each round, but how many depends on its adaptive thresholds,
    so the default is only printed. Without the mmap threshold every round faults all pages (tried)."""
    import platform
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = {mode: subprocess.run([sys.executable, "-c", MALLOC_PROBE, mode], env=env, capture_output=True, text=True,
                                check=True).stdout.split() for mode in ("keep", "default")}
    print("page faults of the third round:", {mode: int(o[1]) for mode, o in out.items()})
    pages = 8 * 24 * 2**20 // 4096
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert out["keep"][0] == "True"
        assert int(out["keep"][1]) < pages // 4
    else:
        assert out["keep"][0] == "False"


def test_keep_freed_memory_leaves_the_users_malloc_settings(monkeypatch):
    from holst.utils.runtime import keep_freed_memory

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert keep_freed_memory() is False


def test_cpu_engine_keeps_freed_memory(tmp_path, monkeypatch):
    from holst.config import TrainConfig
    from holst.train import engine as engine_mod

    calls = []
    monkeypatch.setattr(engine_mod, "keep_freed_memory", lambda: calls.append(1) or True)
    engine_mod.Engine(TrainConfig(out_dir=str(tmp_path), device="cpu", tensorboard=False), install_signal_handler=False)
    assert calls == [1]


def test_bench_attention_pairs_each_sparse_row_with_its_sdpa_row(monkeypatch):
    """bench/train_attention.py: per grid, fp32 and bf16 each with sdpa then sparse; a sparse row's
    speed-up is over the sdpa row of its own precision, and both kernels start from the same loss."""
    bench = bench_module(monkeypatch, "train_attention")
    monkeypatch.setitem(bench.GRIDS, "tiny8", ("tiny", {"image_tokens_per_dim": 8}, 2))
    rows = bench.bench_grid("tiny8", steps=1, warmup=0, device="cpu")
    assert [(r["precision"], r["attn_impl"]) for r in rows] == [
        ("fp32", "sdpa"), ("fp32", "sparse"), ("bf16", "sdpa"), ("bf16", "sparse")]
    for dense, sparse in zip(rows[0::2], rows[1::2]):
        assert sparse["speedup_vs_sdpa"] == round(dense["step_s"] / sparse["step_s"], 3)
        assert "speedup_vs_sdpa" not in dense
    assert abs(rows[0]["loss"] - rows[1]["loss"]) < 1e-4  # one step of the same model: the same numbers
