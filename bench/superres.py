"""Super-resolution throughput, 256 -> 1024 px (x4), holst's tiled upscale vs the reference's predict.

Model: ``models/default/superres`` (the converted Real-ESRGAN x4plus) when present, else a randomly
initialised x4plus-shaped RRDBNet (same cost). Methods timed in the same run:

* ``reference_predict``: ru-dalle's ``predict`` re-implemented here (research/reference.md §6): mirror-pad
  15, edge-pad to a multiple of 192, edge-pad 24, 240x240 patches on a 192 grid, batches of 4.
* ``holst_tiled``: ``holst.superres.upscale(tile=192, overlap=24)`` (windows clipped at the borders,
  reflect pre-pad 10).
* ``holst_whole``: ``upscale(tile=0)``, one pass (more memory).
* ``lanczos``: the fallback without a model.
* on CUDA also ``holst_tiled_bf16`` (bf16 weights, channels_last).

Also reports the PSNR of each output against ``holst_whole`` (tiling seams would show here).
Prints one JSON object.

    .venv/bin/python bench/superres.py [--size 256] [--batch 1] [--repeats 1] [--device auto] [--threads 0]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timing import timed_steps

from holst.config import SuperResConfig
from holst.superres import RRDBNet, lanczos_upscale, upscale
from holst.utils.runtime import resolve_device

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "models" / "default" / "superres"


def _symmetric_pad(x: torch.Tensor, p: int) -> torch.Tensor:
    """numpy.pad(mode='symmetric') on the last two axes."""
    x = torch.cat([x[..., :p, :].flip(-2), x, x[..., -p:, :].flip(-2)], dim=-2)
    return torch.cat([x[..., :p].flip(-1), x, x[..., -p:].flip(-1)], dim=-1)


def reference_predict(model: RRDBNet, image: torch.Tensor, batch_size: int = 4, patches_size: int = 192,
                      padding: int = 24, pad_size: int = 15) -> torch.Tensor:
    """ru-dalle ``RealESRGAN.predict`` on one (3, H, W) [0, 1] image -> (3, sH, sW) (uint8-truncated values)."""
    s = model.scale
    param = next(model.parameters())
    H, W = image.shape[-2:]
    x = _symmetric_pad(image[None], pad_size)  # mirror pad, border pixel repeated
    ph, pw = (-x.shape[-2]) % patches_size, (-x.shape[-1]) % patches_size
    x = F.pad(x, (0, pw, 0, ph), mode="replicate")
    x = F.pad(x, (padding,) * 4, mode="replicate")[0]
    gh, gw = (x.shape[-2] - 2 * padding) // patches_size, (x.shape[-1] - 2 * padding) // patches_size
    p = patches_size + 2 * padding
    patches = torch.stack([x[:, i * patches_size:i * patches_size + p, j * patches_size:j * patches_size + p]
                           for i in range(gh) for j in range(gw)])  # (gh*gw, 3, 240, 240)
    outs = []
    with torch.inference_mode():
        for i in range(0, len(patches), batch_size):
            y = model(patches[i:i + batch_size].to(param.device, param.dtype)).float().clamp(0, 1)
            outs.append(y[:, :, padding * s:-padding * s, padding * s:-padding * s].cpu())
    out = torch.cat(outs)  # (gh*gw, 3, 192s, 192s)
    q = patches_size * s
    out = out.reshape(gh, gw, 3, q, q).permute(2, 0, 3, 1, 4).reshape(3, gh * q, gw * q)  # tile the grid
    out = out[:, :(H + 2 * pad_size) * s, :(W + 2 * pad_size) * s]
    out = (out * 255).floor() / 255  # astype(uint8) truncation
    return out[:, pad_size * s:-pad_size * s, pad_size * s:-pad_size * s]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """PSNR in dB of images in [0, 1]; None when identical (JSON has no infinity)."""
    mse = float(((a.float().cpu() - b.float().cpu()) ** 2).mean())
    return None if mse == 0 else round(10 * math.log10(1.0 / mse), 2)


def timed(fn, repeats: int, device: torch.device):
    """(median wall seconds, median process CPU seconds, last output) over ``repeats`` calls.

    No warm-up call on CPU (one call takes minutes there). CPU seconds are reported because wall time
    on a shared machine depends on the other load.
    """
    t = timed_steps(fn, repeats, 1 if device.type == "cuda" else 0, device)
    return t["step_s"], t["cpu_s"], t["last"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_DIR), help="superres directory (random x4plus if missing)")
    ap.add_argument("--size", type=int, default=256, help="input side (output is 4x)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--skip", default="", help="comma-separated methods to skip, e.g. holst_whole")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if (Path(args.model) / "model.safetensors").is_file():
        model, source = RRDBNet.from_pretrained(args.model, device=device), args.model
    else:
        torch.manual_seed(0)
        model, source = RRDBNet(SuperResConfig()).to(device).eval(), "random x4plus-shaped RRDBNet"
    g = torch.Generator().manual_seed(0)
    # Smooth content with edges: low-res noise enlarged, plus a sharp square.
    images = F.interpolate(torch.rand(args.batch, 3, args.size // 8, args.size // 8, generator=g),
                           size=(args.size, args.size), mode="bicubic").clamp(0, 1)
    images[:, :, args.size // 4:args.size // 2, args.size // 4:args.size // 2] = 0.9
    images = images.to(device)
    skip = set(filter(None, args.skip.split(",")))
    methods = {
        "holst_whole": lambda: upscale(model, images, tile=0),
        "holst_tiled": lambda: upscale(model, images, tile=192, overlap=24, batch_size=4),
        "reference_predict": lambda: torch.stack([reference_predict(model, im) for im in images]),
        "lanczos": lambda: lanczos_upscale(images, 4),
    }
    if device.type == "cuda":
        fast = RRDBNet.from_pretrained(args.model, device=device, dtype=torch.bfloat16) if source == args.model \
            else model.to(torch.bfloat16)
        fast = fast.to(memory_format=torch.channels_last)
        methods["holst_tiled_bf16"] = lambda: upscale(fast, images, tile=192, overlap=24, batch_size=8)
    results, outputs = {}, {}
    for name, fn in methods.items():
        if name in skip:
            continue
        sec, cpu_sec, out = timed(fn, args.repeats, device)
        outputs[name] = out
        results[name] = {"s_per_image": round(sec / args.batch, 3), "cpu_s_per_image": round(cpu_sec / args.batch, 3),
                         "out_megapixels_per_s": round(out[0, 0].numel() * args.batch / sec / 1e6, 4)}
    ref = outputs.get("holst_whole")
    if ref is not None:
        for name, out in outputs.items():
            results[name]["psnr_vs_whole_db"] = psnr(out, ref)  # null = identical
    base = results.get("reference_predict", {}).get("cpu_s_per_image" if device.type == "cpu" else "s_per_image")
    if base:
        for r in results.values():
            r["speedup_vs_reference"] = round(base / r["cpu_s_per_image" if device.type == "cpu" else "s_per_image"], 2)
    print(json.dumps({
        "bench": "superres", "model": source, "device": str(device),
        "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
        "threads": torch.get_num_threads(), "input": [args.batch, 3, args.size, args.size],
        "output": list(next(iter(outputs.values())).shape) if outputs else None, "results": results,
        "numpy": np.__version__, "torch": torch.__version__,
    }, indent=2))


if __name__ == "__main__":
    main()
