"""VQGAN decode throughput (images/s) for 1024-code grids (32x32 codes -> 256 px), printed as JSON.

Compares, in the same run: ``holst`` decode (embedding lookup, fused SDPA attention) against a
reference-style decode (``one_hot @ embed`` and bmm + softmax attention, as taming/ruDALL-E do),
on the CPU, and on CUDA when present (fp32 and bf16). Weights are random: speed does not depend on them.

    .venv/bin/python bench/vqgan.py [--preset sber] [--grid 32] [--batch 1 4] [--iters 3] [--warmup 1] [--threads 0]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F

from holst.vqgan import VQGAN, get_vqgan_preset
from holst.vqgan.layers import AttnBlock


def _reference_attn(self: AttnBlock, x: torch.Tensor) -> torch.Tensor:
    # taming's AttnBlock.forward: explicit (B, N, N) weights via bmm + softmax.
    b, c, h, w = x.shape
    y = self.norm(x)
    q = self.q(y).reshape(b, c, h * w).permute(0, 2, 1)
    k = self.k(y).reshape(b, c, h * w)
    attn = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)
    v = self.v(y).reshape(b, c, h * w)
    out = torch.bmm(v, attn.permute(0, 2, 1)).reshape(b, c, h, w)
    return x + self.proj_out(out)


@contextlib.contextmanager
def reference_style():
    original = AttnBlock.forward
    AttnBlock.forward = _reference_attn
    try:
        yield
    finally:
        AttnBlock.forward = original


@torch.no_grad()
def reference_decode(model: VQGAN, codes: torch.Tensor) -> torch.Tensor:
    """ruDALL-E's decode: one_hot(codes) @ embed -> post_quant_conv -> decoder -> clamp -> [0, 1]."""
    b, h, w = codes.shape
    emb = model.quantize.embed.weight
    z = (F.one_hot(codes.flatten(1), emb.shape[0]).to(emb.dtype) @ emb).reshape(b, h, w, -1).permute(0, 3, 1, 2)
    with reference_style():
        x = model.decode_latents(z)
    return (x.clamp(-1, 1) + 1) / 2


def _time(fn, device: torch.device, iters: int, warmup: int) -> tuple[float, torch.Tensor]:
    """Mean seconds per call and the last output."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters, out


def run(preset: str, grid: int, batches: list[int], iters: int, warmup: int = 1) -> list[dict]:
    torch.manual_seed(0)
    model = VQGAN(get_vqgan_preset(preset)).eval()
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
        for dtype in dtypes:
            m = model.to(device=device, dtype=dtype)
            for b in batches:
                codes = torch.randint(0, m.config.n_embed, (b, grid, grid), device=device)
                ours, a = _time(lambda m=m, codes=codes: m.decode(codes), device, iters, warmup)
                ref, b_ = _time(lambda m=m, codes=codes: reference_decode(m, codes), device, iters, warmup)
                diff = (a.float() - b_.float()).abs().max().item()
                rows.append({"device": device.type, "dtype": str(dtype).replace("torch.", ""), "batch": b,
                             "codes": grid * grid, "image_px": grid * m.output_factor,
                             "holst_images_per_s": round(b / ours, 3), "reference_images_per_s": round(b / ref, 3),
                             "speedup": round(ref / ours, 3), "max_abs_diff": diff})
                print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="sber", help="VQGAN preset (sber, sber_dwt, emoji64, ...)")
    parser.add_argument("--grid", type=int, default=32, help="code grid side (32 -> 1024 codes)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls before timing")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.preset, args.grid, args.batch, args.iters, args.warmup)
    print(json.dumps({"bench": "vqgan_decode", "preset": args.preset, "threads": torch.get_num_threads(),
                      "results": rows}))


if __name__ == "__main__":
    main()
