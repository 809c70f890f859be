"""CLIP (holst.rerank.clip): official ruCLIP layout and numerics, conversion, preprocessing, training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from holst.config import ClipConfig, ConfigError
from holst.convert.ruclip import load_ruclip_model
from holst.rerank.clip import CLIPModel, clip_preset, contrastive_loss, preprocess_images, retrieval_recall
from holst.utils.persist import CheckpointError

SMALL = dict(embed_dim=24, image_resolution=32, vision_layers=2, vision_width=128, vision_patch_size=8,
             context_length=10, vocab_size=50, transformer_width=16, transformer_heads=2,
             transformer_layers=2)


# ----------------------------------------------------------------------------------- reference
def official_state_dict(cfg: ClipConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random state dict with ruCLIP's key names and shapes (reference.md §5), built by hand."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    def tower(prefix: str, w: int, layers: int) -> dict[str, torch.Tensor]:
        out = {}
        for i in range(layers):
            p = f"{prefix}resblocks.{i}."
            out |= {p + "attn.in_proj_weight": r(3 * w, w), p + "attn.in_proj_bias": r(3 * w),
                    p + "attn.out_proj.weight": r(w, w), p + "attn.out_proj.bias": r(w),
                    p + "ln_1.weight": 1 + r(w), p + "ln_1.bias": r(w),
                    p + "mlp.c_fc.weight": r(4 * w, w), p + "mlp.c_fc.bias": r(4 * w),
                    p + "mlp.c_proj.weight": r(w, 4 * w), p + "mlp.c_proj.bias": r(w),
                    p + "ln_2.weight": 1 + r(w), p + "ln_2.bias": r(w)}
        return out

    C, W, P, E = cfg.vision_width, cfg.transformer_width, cfg.vision_patch_size, cfg.embed_dim
    n = (cfg.image_resolution // P) ** 2 + 1
    sd = {"visual.conv1.weight": r(C, 3, P, P), "visual.class_embedding": r(C), "visual.positional_embedding": r(n, C),
          "visual.ln_pre.weight": 1 + r(C), "visual.ln_pre.bias": r(C), "visual.ln_post.weight": 1 + r(C),
          "visual.ln_post.bias": r(C), "visual.proj": r(C, E)}
    sd |= tower("visual.transformer.", C, cfg.vision_layers)
    sd |= tower("transformer.", W, cfg.transformer_layers)
    sd |= {"token_embedding.weight": r(cfg.vocab_size, W), "positional_embedding": r(cfg.context_length, W),
           "ln_final.weight": 1 + r(W), "ln_final.bias": r(W), "text_projection": r(W, E),
           "logit_scale": torch.tensor(math.log(1 / 0.07))}
    return sd


def ref_block(x, sd, p, heads, mask):
    """OpenAI CLIP's ResidualAttentionBlock on a sequence-first [S, B, W] tensor (nn.MultiheadAttention path)."""
    w = x.shape[-1]
    ln = lambda t, n: F.layer_norm(t, (w,), sd[p + n + ".weight"], sd[p + n + ".bias"])  # noqa: E731
    h = ln(x, "ln_1")
    a, _ = F.multi_head_attention_forward(
        h, h, h, w, heads, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"], None, None, False, 0.0,
        sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"], training=False, need_weights=False,
        attn_mask=mask)
    x = x + a
    h = F.linear(ln(x, "ln_2"), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
    h = h * torch.sigmoid(1.702 * h)
    return x + F.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])


def ref_encode_image(sd, cfg, pixels):
    """ruCLIP VisionTransformer.forward, literally (pixels already normalised)."""
    C = cfg.vision_width
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=cfg.vision_patch_size)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([sd["visual.class_embedding"] + torch.zeros(x.shape[0], 1, C), x], dim=1)
    x = x + sd["visual.positional_embedding"]
    x = F.layer_norm(x, (C,), sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"]).permute(1, 0, 2)
    for i in range(cfg.vision_layers):
        x = ref_block(x, sd, f"visual.transformer.resblocks.{i}.", cfg.num_vision_heads, None)
    x = F.layer_norm(x.permute(1, 0, 2)[:, 0], (C,), sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
    return x @ sd["visual.proj"]


def ref_encode_text(sd, cfg, ids):
    """ruCLIP CLIP.encode_text, literally: causal -inf mask, feature at the eos (id 3) position."""
    L, W = cfg.context_length, cfg.transformer_width
    mask = torch.full((L, L), float("-inf")).triu_(1)
    x = (sd["token_embedding.weight"][ids] + sd["positional_embedding"]).permute(1, 0, 2)
    for i in range(cfg.transformer_layers):
        x = ref_block(x, sd, f"transformer.resblocks.{i}.", cfg.transformer_heads, mask)
    x = F.layer_norm(x.permute(1, 0, 2), (W,), sd["ln_final.weight"], sd["ln_final.bias"])
    return x[torch.arange(x.shape[0]), torch.where(ids == 3)[1]] @ sd["text_projection"]


def text_batch() -> torch.Tensor:
    rows = [[2, 10, 11, 12, 3], [2, 30, 3], [2, 5, 6, 7, 8, 9, 40, 41, 3], [2, 44, 3]]
    return torch.tensor([r + [0] * (10 - len(r)) for r in rows])


def write_official_dir(tmp_path, cfg: ClipConfig, sd: dict, extra: dict | None = None):
    d = tmp_path / "ruclip-small"
    d.mkdir()
    conf = {k: getattr(cfg, k) for k in ("embed_dim", "image_resolution", "vision_layers", "vision_width",
                                         "vision_patch_size", "context_length", "vocab_size", "transformer_width",
                                         "transformer_heads", "transformer_layers")}
    conf |= {"mean": list(cfg.mean), "std": list(cfg.std)} | (extra or {})
    (d / "config.json").write_text(json.dumps(conf))
    torch.save(sd, d / "pytorch_model.bin")
    return d


# ----------------------------------------------------------------------------------- tests
def test_official_keys_and_shapes_match_base_patch32_384():
    with torch.device("meta"):
        model = CLIPModel(clip_preset("ruclip-vit-base-patch32-384"))
    sd = model.state_dict()
    assert len(sd) == 302  # reference.md §5
    assert sum(v.numel() for v in sd.values()) == 151_350_273
    assert tuple(sd["visual.conv1.weight"].shape) == (768, 3, 32, 32)
    assert tuple(sd["visual.positional_embedding"].shape) == (145, 768)
    assert tuple(sd["visual.transformer.resblocks.11.attn.in_proj_weight"].shape) == (2304, 768)
    assert tuple(sd["token_embedding.weight"].shape) == (49408, 512)
    assert tuple(sd["text_projection"].shape) == (512, 512)
    assert sd["logit_scale"].shape == ()


def test_converted_official_dir_matches_reference_forward(tmp_path):
    cfg = ClipConfig(**SMALL)
    sd = official_state_dict(cfg)
    assert set(sd) == set(CLIPModel(cfg).state_dict())  # the hand-built layout is the model's layout
    d = write_official_dir(tmp_path, cfg, sd, extra={"unused_key": 1})
    model = load_ruclip_model(d)
    g = torch.Generator().manual_seed(1)
    images = torch.rand(4, 3, 32, 32, generator=g)
    ids = text_batch()
    pixels = preprocess_images(images, 32, cfg.mean, cfg.std)
    ref_img, ref_txt = ref_encode_image(sd, cfg, pixels), ref_encode_text(sd, cfg, ids)
    torch.testing.assert_close(model.image_features(images), ref_img, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model.text_features(ids), ref_txt, atol=1e-5, rtol=1e-4)
    ref_score = (F.normalize(ref_img, dim=-1) * F.normalize(ref_txt, dim=-1)).sum(-1) / 0.07
    torch.testing.assert_close(model.score(images, ids), ref_score, atol=1e-4, rtol=1e-4)
    logits = model(images, ids)
    torch.testing.assert_close(logits.diagonal(), ref_score, atol=1e-4, rtol=1e-4)
    # Padding after eos does not change a text feature (causal mask): truncating the pads is exact.
    torch.testing.assert_close(model.text_features(ids[:, :9]), ref_txt, atol=1e-5, rtol=1e-4)
    # Round trip through our own format is bit-exact.
    model.save_pretrained(tmp_path / "ours")
    again = CLIPModel.from_pretrained(tmp_path / "ours")
    assert torch.equal(again.score(images, ids), model.score(images, ids))


def test_converter_errors_name_the_problem(tmp_path):
    cfg = ClipConfig(**SMALL)
    sd = official_state_dict(cfg)
    sd["visual.proj"] = sd["visual.proj"][:, :5]
    del sd["ln_final.bias"]
    d = write_official_dir(tmp_path, cfg, sd)
    with pytest.raises(CheckpointError, match=r"visual\.proj.*|ln_final\.bias"):
        load_ruclip_model(d)
    (d / "config.json").write_text(json.dumps({"embed_dim": 8}))
    with pytest.raises(CheckpointError, match="missing ruCLIP config key"):
        load_ruclip_model(d)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_ruclip_model(tmp_path / "nope")


def test_load_ruclip_with_tokenizer(tmp_path):
    import holst.text as text
    from holst.convert.ruclip import convert_ruclip, load_ruclip

    cfg = ClipConfig(**{**SMALL, "vocab_size": 64})
    d = write_official_dir(tmp_path, cfg, official_state_dict(cfg))
    tok = text.BPETokenizer.train(["рыжий кот", "red cat", "синий шар", "blue ball"] * 4, vocab_size=40)
    tok.save(d / "bpe.model")
    model, tokenizer = load_ruclip(d)
    ids = tokenizer.encode_batch(["Рыжий кот", "blue ball"], model.config.context_length, keep_eos=True)
    assert (ids == 3).sum(dim=1).tolist() == [1, 1]
    dst = convert_ruclip(d, tmp_path / "clip")
    again = CLIPModel.from_pretrained(dst)
    tok2 = text.BPETokenizer.from_pretrained(dst / "tokenizer")
    ids2 = tok2.encode_batch(["Рыжий кот", "blue ball"], model.config.context_length, keep_eos=True)
    assert torch.equal(ids, ids2)
    images = torch.rand(2, 3, 40, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.score(images, ids2), model.score(images, ids))


def test_preprocess_matches_pil_crop_and_bilinear_resize():
    """ruCLIP's processor: centre square crop, PIL bilinear resize, mean/std. Ours agrees to ~1/255."""
    g = torch.Generator().manual_seed(0)
    cfg = ClipConfig(**SMALL)
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    for size in ((48, 72), (90, 60), (32, 32)):
        images = (torch.rand(1, 3, *size, generator=g) * 255).round() / 255  # exactly representable in uint8
        ours = preprocess_images(images, 32, cfg.mean, cfg.std)
        assert ours.shape == (1, 3, 32, 32)
        pil = Image.fromarray((images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        w, h = pil.size
        s = min(w, h)
        top, left = (h - s) // 2, (w - s) // 2
        pil = pil.crop((left, top, left + s, top + s)).resize((32, 32), Image.BILINEAR)
        ref = torch.from_numpy(np.array(pil)).permute(2, 0, 1).float() / 255
        assert (ours[0] * std + mean - ref).abs().max().item() < 1.5 / 255, size
    with pytest.raises(ValueError, match="images must be"):
        preprocess_images(torch.rand(3, 32, 32), 32, cfg.mean, cfg.std)


def test_config_validation_names_the_option():
    with pytest.raises(ConfigError, match="vision_patch_size"):
        ClipConfig(**{**SMALL, "vision_patch_size": 7})
    with pytest.raises(ConfigError, match="transformer_heads"):
        ClipConfig(**{**SMALL, "transformer_heads": 3})
    with pytest.raises(ConfigError, match="std"):
        ClipConfig(**{**SMALL, "std": (1.0, 0.0, 1.0)})
    model = CLIPModel(ClipConfig(**SMALL))
    with pytest.raises(ValueError, match="vocab_size"):
        model.encode_text(torch.tensor([[2, 99, 3]]))


def test_retrieval_recall_counts_duplicate_captions():
    emb = torch.eye(4)
    assert retrieval_recall(emb, emb)["i2t_r@1"] == 1.0
    shuffled = emb[[1, 0, 2, 3]]
    r = retrieval_recall(emb, shuffled, ks=(1, 2))
    assert r["i2t_r@1"] == 0.5 and r["i2t_r@2"] == 1.0
    assert retrieval_recall(emb, shuffled, ks=(1,), groups=torch.tensor([0, 0, 1, 2]))["t2i_r@1"] == 1.0


def test_tiny_clip_learns_matching_pairs():
    """Direct optimisation of a tiny CLIP on 8 colour/caption pairs: training pairs are retrieved, and
    the matching caption scores higher than a wrong one."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)  # init of the tiny model (test code, not library code)
    model = CLIPModel(clip_preset("tiny"))
    colours = torch.rand(8, 3, 1, 1, generator=g)
    images = colours.expand(8, 3, 16, 16).clone()
    ids = torch.zeros(8, 12, dtype=torch.long)
    ids[:, 0] = 2
    ids[:, 1] = 10 + torch.arange(8)
    ids[:, 2] = 3
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = contrastive_loss(model(images + 0.03 * torch.randn(images.shape, generator=g), ids))
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert loss.item() < 0.5 * first
    r = retrieval_recall(model.encode_image(images).detach(), model.encode_text(ids).detach())
    assert r["i2t_r@1"] >= 0.75 and r["t2i_r@1"] >= 0.75  # chance is 1/8
    right = model.score(images, ids)
    wrong = model.score(images, ids.roll(1, dims=0))
    assert (right > wrong).float().mean() >= 0.75


# ----------------------------------------------------------------------------------- trainer
COLOURS = [("красный", "red", (1.0, 0.1, 0.1)), ("зелёный", "green", (0.1, 0.9, 0.1)),
           ("синий", "blue", (0.1, 0.1, 1.0)), ("жёлтый", "yellow", (1.0, 0.9, 0.1)),
           ("чёрный", "black", (0.05, 0.05, 0.05)), ("белый", "white", (0.95, 0.95, 0.95))]
SHAPES = [("квадрат", "square"), ("круг", "circle")]


def toy_items(noise_seed: int) -> list[dict]:
    """12 (colour, shape) images 24x20 (non-square: exercises the crop), Russian and English captions."""
    g = torch.Generator().manual_seed(noise_seed)
    yy, xx = torch.meshgrid(torch.arange(24), torch.arange(20), indexing="ij")
    items = []
    for ru_c, en_c, rgb in COLOURS:
        for (ru_s, en_s) in SHAPES:
            if en_s == "circle":
                mask = (yy - 12) ** 2 + (xx - 10) ** 2 < 36
            else:
                mask = ((yy - 12).abs() < 6) & ((xx - 10).abs() < 6)
            img = torch.full((3, 24, 20), 0.5)
            img[:, mask] = torch.tensor(rgb).view(3, 1)
            img = (img + 0.02 * torch.randn(img.shape, generator=g)).clamp(0, 1)
            key = f"{en_c}-{en_s}"
            items.append({"image": img, "caption": f"{ru_c} {ru_s}", "lang": "ru", "key": key})
            items.append({"image": img, "caption": f"{en_c} {en_s}", "lang": "en", "key": key})
    return items


def test_train_clip_end_to_end(tmp_path):
    import holst.text as text
    from holst.config import ClipTrainConfig
    from holst.train.clip import PairSet, train_clip

    items = toy_items(0)
    pairs = PairSet.from_items(items, 16)
    assert len(pairs) == 12 and pairs.captions[0] == ["красный квадрат", "red square"]
    cfg = ClipTrainConfig(out_dir=str(tmp_path / "run"), model="tiny", max_steps=50, batch_size=12, lr=2e-3,
                          warmup_steps=5, eval_every=0, save_every=25, log_every=25, tokenizer_vocab_size=80,
                          weight_decay=0.0, tensorboard=False, num_threads=1)
    result = train_clip(cfg, train_data=items, eval_data=toy_items(1)).metrics
    fit = result["train_fit"]
    # 24 pairs; chance R@1 is 2/24 (the image's two captions). A trained tiny CLIP retrieves most pairs.
    assert fit["chance_r@1"] == pytest.approx(2 / 24)
    assert fit["i2t_r@1"] >= 0.5 and fit["t2i_r@1"] >= 0.5, fit
    assert result["heldout"]["i2t_r@5"] > 5 * result["heldout"]["chance_r@1"], result["heldout"]
    final = tmp_path / "run" / "final"
    model = CLIPModel.from_pretrained(final)
    tok = text.BPETokenizer.from_pretrained(final / "tokenizer")
    assert json.loads((final / "retrieval.json").read_text())["step"] == 50
    images = torch.stack([items[i]["image"] for i in range(0, 24, 2)])
    ids = tok.encode_batch([items[i]["caption"] for i in range(0, 24, 2)], model.config.context_length,
                           keep_eos=True)
    right, wrong = model.score(images, ids), model.score(images, ids.roll(2, dims=0))  # other colour
    assert (right > wrong).float().mean() >= 0.75
    # Resume: continues from the saved step and stops at the new max_steps.
    more = train_clip(cfg.replace(max_steps=55), train_data=items, eval_data=None, resume=True)
    assert more.step == 55
