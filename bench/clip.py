"""CLIP scoring and training-step timing: ours (fused SDPA, batch-first) vs the reference's layout.

The reference (ruCLIP / OpenAI CLIP) runs ``nn.MultiheadAttention`` on sequence-first tensors with an
explicit -inf mask for the text tower; the baseline here is that computation on the same weights
(``F.multi_head_attention_forward``), run in the same process. Prints one JSON object with images/s
for ``score`` (one caption against a batch of images, what the pipeline does) and seconds per
contrastive training step, plus the largest feature difference between the two paths.

    .venv/bin/python bench/clip.py [--preset emoji64] [--batch 64] [--steps 5] [--device auto] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from timing import timed

from holst.rerank.clip import CLIPModel, clip_preset, contrastive_loss
from holst.utils.runtime import resolve_device, resolve_dtype


def reference_tower(blocks, x: torch.Tensor, heads: int, mask: torch.Tensor | None) -> torch.Tensor:
    """The reference's Transformer on [S, B, W] (sequence first), nn.MultiheadAttention's kernel."""
    for b in blocks:
        h = b.ln_1(x)
        a = F.multi_head_attention_forward(h, h, h, x.shape[-1], heads, b.attn.in_proj_weight, b.attn.in_proj_bias,
                                           None, None, False, 0.0, b.attn.out_proj.weight, b.attn.out_proj.bias,
                                           training=False, need_weights=False, attn_mask=mask)[0]
        x = x + a
        x = x + b.mlp(b.ln_2(x))
    return x


def reference_features(model: CLIPModel, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    c, v = model.config, model.visual
    x = v.conv1(model.preprocess(images).to(v.conv1.weight.dtype))
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    x = torch.cat([v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1], dtype=x.dtype, device=x.device), x], 1)
    x = v.ln_pre(x + v.positional_embedding).permute(1, 0, 2)
    x = reference_tower(v.transformer.resblocks, x, c.num_vision_heads, None).permute(1, 0, 2)
    img = v.ln_post(x[:, 0]) @ v.proj
    L = ids.shape[1]
    mask = torch.full((L, L), float("-inf"), device=ids.device, dtype=img.dtype).triu_(1)
    t = (model.token_embedding(ids) + model.positional_embedding[:L]).permute(1, 0, 2)
    t = model.ln_final(reference_tower(model.transformer.resblocks, t, c.transformer_heads, mask).permute(1, 0, 2))
    txt = t[torch.arange(t.shape[0]), torch.where(ids == c.eos_id)[1]] @ model.text_projection
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="emoji64")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="fp32")
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    config = clip_preset(args.preset)
    torch.manual_seed(0)
    model = CLIPModel(config).to(device=device, dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    R, B = config.image_resolution, args.batch
    images = torch.rand(B, 3, R, R, generator=g).to(device)
    ids = torch.zeros(B, min(16, config.context_length), dtype=torch.long)
    ids[:, 0], ids[:, 1:-1] = 2, torch.randint(4, config.vocab_size, (B, ids.shape[1] - 2), generator=g)
    ids[:, -1] = config.eos_id
    ids = ids.to(device)

    with torch.no_grad():
        ref_img, ref_txt = reference_features(model, images, ids)
        diff = max((model.encode_image(images) - ref_img).abs().max().item(),
                   (model.encode_text(ids) - ref_txt).abs().max().item())
        ours_s = timed(lambda: model.score(images, ids[:1]), args.steps, device)
        ref_s = timed(lambda: reference_features(model, images, ids[:1]), args.steps, device)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def train_step() -> None:
        loss = contrastive_loss(model(images, ids))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train_s = timed(train_step, args.steps, device)
    print(json.dumps({
        "bench": "clip", "preset": args.preset, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(), "batch": B,
        "score_images_per_s": {"ours": round(B / ours_s, 1), "reference_layout": round(B / ref_s, 1)},
        "speedup": round(ref_s / ours_s, 2), "train_step_s": round(train_s, 3),
        "train_pairs_per_s": round(B / train_s, 1), "max_feature_diff": diff,
    }))


if __name__ == "__main__":
    main()
