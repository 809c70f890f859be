"""Tiled super-resolution with bounded memory, and the Lanczos fallback.

Axis legend: B batch, C channels (3), H/W input height/width, s scale, t tile side, o overlap.

Tiling: the image is cut into a grid of near-equal tiles of at most ``t x t``; each tile is run with
``o`` extra pixels of real image context on every side (clipped at the image border, where the
network's own zero padding applies exactly as in an untiled run), and only the tile's own output is kept.
When ``o`` covers the network's receptive field the result equals the untiled one; for the full
RRDBNet (whose field spans hundreds of pixels) tiles see less context than a whole-image pass and
their output differs from it slightly, everywhere rather than at seams (x4plus vs the whole pass:
256 px input, tile 192, overlap 24: 42.0 dB PSNR; 64 px input, tile 32: 29.9 dB). ``tile=0`` runs the
image whole when memory allows (for 256 px also ~25% less compute than 2x2 tiles).
Peak memory grows with ``(t + 2o)^2``, not with the image.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from holst.utils.runtime import get_logger

logger = get_logger("holst.superres")


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor (B, C, H, W) in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got dtype {images.dtype}")


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _windows(size: int, tile: int, overlap: int, unit: int) -> list[tuple[int, int, int, int]]:
    """Tiles along one axis: (tile_start, tile_end, window_start, window_end), windows clipped to [0, size].

    The axis is split into ``ceil(size / tile)`` near-equal tiles (multiples of ``unit``) rather than
    full tiles plus a sliver, so windows share shapes (one batched forward) and no compute is wasted.
    """
    if not tile or tile >= size:
        return [(0, size, 0, size)]
    step = _round_up(-(-size // -(-size // tile)), unit)
    out = []
    for start in range(0, size, step):
        end = min(start + step, size)
        out.append((start, end, max(start - overlap, 0), min(end + overlap, size)))
    return out


@torch.inference_mode()
def upscale(model: nn.Module, images: torch.Tensor, *, tile: int = 192, overlap: int = 24,
            batch_size: int = 4, pre_pad: int = 10) -> torch.Tensor:
    """Super-resolve images with an RRDBNet-like model, tile by tile.

    Args:
        model: a network mapping (b, C, h, w) in [0, 1] to (b, C, s*h, s*w); it has ``scale`` and
            optionally ``unshuffle_factor`` (inputs padded to a multiple of it by reflection).
        images: (B, C, H, W) float in [0, 1], any device.
        tile: tile side in input pixels; 0 (or a tile larger than the image) runs the image whole.
        overlap: context pixels added on each side of a tile (>= 0).
        batch_size: how many equally shaped windows go through the model at once.
        pre_pad: reflect-pad the whole image by this much first and crop it off the output, as
            realesrgan-ncnn-vulkan does (10): the borders then look like the interior, and the
            output matches that runtime's to 1/255.
    Returns:
        (B, C, s*H, s*W) float32 in [0, 1] on the device of ``images``.
    """
    _check_images(images)
    if min(tile, overlap, pre_pad) < 0 or batch_size < 1:
        raise ValueError(f"tile={tile}, overlap={overlap}, pre_pad={pre_pad} must be >= 0 "
                         f"and batch_size={batch_size} >= 1")
    param = next(model.parameters())
    s = int(model.scale)
    u = int(getattr(model, "unshuffle_factor", 1))
    B, C, H, W = images.shape
    p = min(pre_pad, H - 1, W - 1)  # reflection needs pad < side
    x = F.pad(images.float(), (p, p, p, p), mode="reflect") if p else images
    # pixel_unshuffle needs sides (and tile boundaries) on multiples of u: pad, crop at the end.
    ph, pw = _round_up(x.shape[-2], u) - x.shape[-2], _round_up(x.shape[-1], u) - x.shape[-1]
    if ph or pw:
        x = F.pad(x.float(), (0, pw, 0, ph), mode="reflect" if min(x.shape[-2:]) > max(ph, pw) else "replicate")
    Hp, Wp = x.shape[-2:]
    overlap = _round_up(overlap, u)
    out = torch.empty(B, C, s * Hp, s * Wp, dtype=torch.float32, device=images.device)

    # Group windows by shape so that equal ones share a forward pass (batched over images and tiles).
    groups: dict[tuple[int, int], list[tuple]] = {}
    for ty in _windows(Hp, tile, overlap, u):
        for tx in _windows(Wp, tile, overlap, u):
            groups.setdefault((ty[3] - ty[2], tx[3] - tx[2]), []).append((ty, tx))
    for windows in groups.values():
        jobs = [(b, ty, tx) for ty, tx in windows for b in range(B)]
        for i in range(0, len(jobs), batch_size):
            chunk = jobs[i:i + batch_size]
            batch = torch.stack([x[b, :, ty[2]:ty[3], tx[2]:tx[3]] for b, ty, tx in chunk])  # (n, C, wh, ww)
            y = model(batch.to(device=param.device, dtype=param.dtype)).float().clamp_(0, 1)  # (n, C, s*wh, s*ww)
            for y_i, (b, ty, tx) in zip(y, chunk):
                oy, ox = s * (ty[0] - ty[2]), s * (tx[0] - tx[2])  # where the tile starts inside its window
                hh, ww = s * (ty[1] - ty[0]), s * (tx[1] - tx[0])
                out[b, :, s * ty[0]:s * ty[1], s * tx[0]:s * tx[1]] = y_i[:, oy:oy + hh, ox:ox + ww].to(out.device)
    return out[:, :, s * p:s * (p + H), s * p:s * (p + W)]


def lanczos_upscale(images: torch.Tensor, scale: float) -> torch.Tensor:
    """Plain Lanczos resampling (PIL, per channel in float precision): the fallback without an SR model.

    Args:
        images: (B, C, H, W) float in [0, 1].
        scale: output size / input size (> 0).
    Returns:
        (B, C, round(scale*H), round(scale*W)) float32 in [0, 1] on the device of ``images``.
    """
    _check_images(images)
    if not scale > 0:
        raise ValueError(f"scale={scale!r} must be > 0")
    B, C, H, W = images.shape
    size = (max(1, round(W * scale)), max(1, round(H * scale)))
    arr = images.detach().float().cpu().numpy()
    out = np.empty((B, C, size[1], size[0]), dtype=np.float32)
    for b in range(B):
        for c in range(C):
            out[b, c] = np.asarray(Image.fromarray(arr[b, c], mode="F").resize(size, Image.Resampling.LANCZOS))
    return torch.from_numpy(out).clamp_(0, 1).to(images.device)


@dataclasses.dataclass
class SuperResOutput:
    """Result of :func:`super_resolve`: ``images`` (B, C, sH, sW) float32 in [0, 1] and the ``method`` used.

    ``method``: 'rrdbnet' (the model at its own scale), 'rrdbnet+downscale' (the model, then an
    antialiased bicubic shrink to a smaller asked scale) or 'lanczos' (no model, or a scale above the model's).
    """

    images: torch.Tensor
    method: str

    @property
    def used_fallback(self) -> bool:
        """True when no network was used (plain Lanczos resampling)."""
        return self.method == "lanczos"


def super_resolve(model: nn.Module | None, images: torch.Tensor, scale: int | None = None, *,
                  tile: int = 192, overlap: int = 24, batch_size: int = 4) -> SuperResOutput:
    """Upscale with ``model`` when it can, else with Lanczos, and say which (warning + ``method``).

    Args:
        model: an RRDBNet, or None.
        images: (B, C, H, W) float in [0, 1].
        scale: wanted integer factor; None = the model's own. Below the model's scale the model runs
            and its output is shrunk; above it (or without a model) Lanczos is used with a warning.
        tile: tile side in input pixels; 0 runs the image whole (see :func:`upscale`).
        overlap: context pixels added on each side of a tile.
        batch_size: how many equally shaped windows go through the model at once.
    Returns:
        SuperResOutput(images (B, C, scale*H, scale*W) float32 in [0, 1], method).
    """
    _check_images(images)
    if scale is None:
        if model is None:
            raise ValueError("super_resolve: scale is required when no super-resolution model is given")
        scale = int(model.scale)
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale={scale!r} must be a positive integer")
    scale = int(scale)
    if model is not None and scale <= int(model.scale):
        out = upscale(model, images, tile=tile, overlap=overlap, batch_size=batch_size)
        if scale == int(model.scale):
            return SuperResOutput(out, "rrdbnet")
        size = (images.shape[-2] * scale, images.shape[-1] * scale)
        out = F.interpolate(out, size=size, mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
        return SuperResOutput(out, "rrdbnet+downscale")
    if model is None:
        logger.warning("no super-resolution model: upscaling x%d with Lanczos resampling instead", scale)
    else:
        logger.warning("the super-resolution model is x%d but x%d was asked: using Lanczos resampling instead",
                       int(model.scale), scale)
    return SuperResOutput(lanczos_upscale(images, float(scale)), "lanczos")
