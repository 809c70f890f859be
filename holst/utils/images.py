"""PIL <-> tensor conversion, image grids and PNG saving (Pillow + numpy only)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float tensor (3, H, W) in [0, 1]. Alpha is composited on white."""
    image = to_rgb(image)
    arr = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB; transparent pixels become white (not black)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(image, dtype=np.float64)
        arr = (arr / max(arr.max(), 1.0) * 255.0).round().astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")
    return image.convert("RGB")


def tensor_to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Float images (B, 3, H, W) or (3, H, W) in [0, 1] -> list of RGB PIL images (rounded)."""
    if images.dim() == 3:
        images = images.unsqueeze(0)
    arr = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a, mode="RGB") for a in arr]


def make_grid(images: list[Image.Image], nrow: int | None = None, padding: int = 2,
              background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Tile images (all the size of the first) into a grid with ``nrow`` images per row."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    n = len(images)
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol_rows = math.ceil(n / nrow)
    w, h = images[0].size
    grid = Image.new("RGB", (nrow * w + (nrow + 1) * padding, ncol_rows * h + (ncol_rows + 1) * padding), background)
    for i, img in enumerate(images):
        r, c = divmod(i, nrow)
        if img.size != (w, h):
            img = img.resize((w, h), Image.Resampling.LANCZOS)
        grid.paste(to_rgb(img), (padding + c * (w + padding), padding + r * (h + padding)))
    return grid


def save_png(image: Image.Image, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """Save a PNG deterministically (same pixels and metadata -> same bytes)."""
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for k, v in (metadata or {}).items():
        info.add_itxt(k, v)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", pnginfo=info, optimize=False)
