"""Degradations that turn a high-resolution crop into the low-resolution input a super-resolver sees.

Axis legend: B batch, C channels (3), H/W high-resolution sides, s scale, h = H/s, w = W/s.

The pipeline upscales what the VQGAN decoder produces, so the matching training input is the
VQGAN round trip of the shrunk image (:func:`vqgan_degrade`). Without a VQGAN, :func:`classic_degrade`
applies a first-order Real-ESRGAN-style chain: Gaussian blur, Gaussian noise, JPEG. Every random
draw comes from the ``generator`` argument.
"""

from __future__ import annotations

import io
import math
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


class ImageTokenizer(Protocol):
    """What :func:`vqgan_degrade` needs from a VQGAN (holst.vqgan.VQGAN fits; no import needed here)."""

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] -> codes."""

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes -> (B, 3, H, W) images in [0, 1]."""


def _uniform(low: float, high: float, n: int, generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def downscale(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Antialiased bicubic shrink by ``scale``: (B, C, H, W) -> (B, C, H/s, W/s), clamped to [0, 1]."""
    if hr.shape[-2] % scale or hr.shape[-1] % scale:
        raise ValueError(f"image sides {tuple(hr.shape[-2:])} must be multiples of scale={scale}")
    if scale == 1:
        return hr
    size = (hr.shape[-2] // scale, hr.shape[-1] // scale)
    return F.interpolate(hr, size=size, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per image (reflect padding).

    Args:
        images: (B, C, H, W).
        sigma: (B,) standard deviations in pixels (0 leaves an image unchanged).
    """
    B, C, H, W = images.shape
    radius = max(1, math.ceil(3 * float(sigma.max())))
    radius = min(radius, H - 1, W - 1) if min(H, W) > 1 else 0
    if radius == 0:
        return images
    x = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    s = sigma.to(images).clamp_min(1e-6)[:, None]  # (B, 1)
    k = torch.exp(-0.5 * (x[None] / s) ** 2)
    k = k / k.sum(1, keepdim=True)  # (B, K)
    k = torch.where((sigma.to(images.device) > 0)[:, None], k, (x == 0).to(k)[None].expand_as(k))
    weight = k.repeat_interleave(C, 0)  # (B*C, K): one kernel per (image, channel) group
    y = F.pad(images.reshape(1, B * C, H, W), (radius, radius, radius, radius), mode="reflect")
    y = F.conv2d(y, weight[:, None, None, :], groups=B * C)  # horizontal pass: (1, B*C, H+2r, W)
    y = F.conv2d(y, weight[:, None, :, None], groups=B * C)  # vertical pass:   (1, B*C, H, W)
    return y.reshape(B, C, H, W)


def jpeg(images: torch.Tensor, quality: list[int]) -> torch.Tensor:
    """JPEG round trip (PIL, 4:2:0) of each image at its own quality; (B, C, H, W) in [0, 1] -> same shape."""
    out = []
    for img, q in zip(images, quality):
        arr = img.detach().float().clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).cpu().numpy()
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="JPEG", quality=int(q))
        dec = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), dtype=np.float32) / 255.0
        out.append(torch.from_numpy(dec).permute(2, 0, 1))
    return torch.stack(out).to(images)


def classic_degrade(lr: torch.Tensor, *, blur_sigma: tuple[float, float] = (0.2, 1.5),
                    noise_std: tuple[float, float] = (0.0, 0.03), jpeg_quality: tuple[int, int] = (40, 95),
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Blur, add Gaussian noise and JPEG-compress each low-resolution image with random strengths.

    Args:
        lr: (B, C, h, w) float in [0, 1].
        blur_sigma: [min, max] Gaussian blur sigma, sampled uniformly per image.
        noise_std: [min, max] Gaussian noise standard deviation, sampled uniformly per image.
        jpeg_quality: [min, max] JPEG quality, sampled uniformly per image.
        generator: the source of every random draw.
    Returns:
        (B, C, h, w) float in [0, 1].
    """
    B = lr.shape[0]
    x = gaussian_blur(lr, _uniform(*blur_sigma, B, generator))
    std = _uniform(*noise_std, B, generator).to(x)
    noise = torch.randn(x.shape, generator=generator).to(x)
    x = (x + noise * std[:, None, None, None]).clamp(0, 1)
    qualities = torch.randint(int(jpeg_quality[0]), int(jpeg_quality[1]) + 1, (B,), generator=generator).tolist()
    return jpeg(x, qualities).clamp(0, 1)


@torch.no_grad()
def vqgan_degrade(lr: torch.Tensor, vqgan: ImageTokenizer) -> torch.Tensor:
    """Round-trip images through a VQGAN: ``decode(encode(lr))`` (what the pipeline's decoder outputs).

    Args:
        lr: (B, 3, h, w) float in [0, 1]; h and w multiples of the VQGAN's downsample factor.
        vqgan: anything with ``encode(images) -> codes`` and ``decode(codes) -> images`` (holst.vqgan.VQGAN).
    Returns:
        (B, 3, h, w) float in [0, 1] on the device of ``lr``.
    """
    f = int(getattr(vqgan, "downsample_factor", 1))
    if lr.shape[-2] % f or lr.shape[-1] % f:
        raise ValueError(f"VQGAN degradation: low-resolution sides {tuple(lr.shape[-2:])} must be multiples of "
                         f"the VQGAN downsample factor {f} (choose hr_size = scale * a multiple of {f})")
    param = next(vqgan.parameters(), None) if hasattr(vqgan, "parameters") else None
    x = lr if param is None else lr.to(device=param.device, dtype=param.dtype)
    out = vqgan.decode(vqgan.encode(x))
    if out.shape != lr.shape:
        raise ValueError(f"VQGAN round trip changed the shape {tuple(lr.shape)} -> {tuple(out.shape)}")
    return out.float().clamp(0, 1).to(lr.device)


def make_pair(hr: torch.Tensor, scale: int, *, mode: str = "classic", vqgan: ImageTokenizer | None = None,
              generator: torch.Generator | None = None, **classic: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(LR, HR) training pair from HR crops.

    Args:
        hr: (B, C, H, W) float in [0, 1]; sides multiples of ``scale``.
        scale: the super-resolution factor.
        mode: 'vqgan' (needs ``vqgan``) or 'classic'.
        vqgan: the image tokenizer for 'vqgan'.
        generator: randomness of the classic chain.
        classic: blur_sigma / noise_std / jpeg_quality ranges for :func:`classic_degrade`.
    Returns:
        lr (B, C, H/s, W/s), hr (B, C, H, W).
    """
    lr = downscale(hr, scale)
    if mode == "vqgan":
        if vqgan is None:
            raise ValueError("mode='vqgan' needs a vqgan")
        return vqgan_degrade(lr, vqgan), hr
    if mode != "classic":
        raise ValueError(f"mode={mode!r} is not allowed; choose 'vqgan' or 'classic'")
    return classic_degrade(lr, generator=generator, **classic), hr
