"""Reconstruction and codebook metrics in pure torch: PSNR, SSIM, codebook usage.

Axis legend: B batch, C channels, H/W image size, K codebook size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image.

    Args:
        a: images (B, C, H, W) in [0, data_range].
        b: images of the same shape to compare with.
        data_range: the value of white (1 for images in [0, 1], 255 for bytes).
    Returns:
        (B,) float dB; identical images give +inf.
    """
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    x = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()  # (C, 1, k, k)


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0, window: int = 11,
         sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) per image.

    Gaussian 11x11 window, sigma 1.5, K1 0.01, K2 0.03, valid-region mean over pixels and channels.

    Args:
        a: images (B, C, H, W) in [0, data_range]; a smaller window is used for images under 11 px.
        b: images of the same shape to compare with.
        data_range: the value of white (1 for images in [0, 1], 255 for bytes).
        window: side of the Gaussian window.
        sigma: standard deviation of the Gaussian window.
    Returns:
        (B,) float in [-1, 1]; 1 for identical images.
    """
    a, b = a.float(), b.float()
    c = a.shape[1]
    window = min(window, a.shape[-1], a.shape[-2])
    w = _gaussian_window(window, sigma, c, a.device, a.dtype)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2

    def filt(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, groups=c)

    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def codebook_usage(codes: torch.Tensor, n_embed: int) -> dict[str, float]:
    """How evenly a set of codes uses the codebook.

    Args:
        codes: any-shaped long tensor of code indices in [0, n_embed).
        n_embed: codebook size K.
    Returns:
        {"perplexity": exp(entropy of the code histogram) in [1, K],
         "used_fraction": share of the K codes that occur at least once,
         "used": number of distinct codes}.
    """
    counts = torch.bincount(codes.flatten().long().cpu(), minlength=n_embed).double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    used = int((counts > 0).sum())
    return {"perplexity": math.exp(entropy), "used_fraction": used / n_embed, "used": used}


@torch.no_grad()
def evaluate_reconstruction(model: torch.nn.Module, images: torch.Tensor, *, batch_size: int = 32,
                            targets: torch.Tensor | None = None) -> tuple[dict[str, float], torch.Tensor]:
    """Encode (argmax) and decode held-out images; report PSNR, SSIM and codebook usage.

    Args:
        model: a ``holst.vqgan.VQGAN`` (any object with ``encode``, ``decode``, ``config.n_embed``).
        images: (N, 3, H, W) float in [0, 1], the encoder input.
        batch_size: images per forward.
        targets: what the output is compared with (default ``images``; the DWT decoder's output is
            twice the input size, so pass the larger originals there).
    Returns:
        ({"psnr", "ssim", "perplexity", "used_fraction", "used"}, reconstructions (N, 3, H', W') in [0, 1]).
    """
    targets = images if targets is None else targets
    device = next(model.parameters()).device
    recons, codes, ps, ss = [], [], [], []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device)
        c = model.encode(x)
        r = model.decode(c).float().cpu()
        t = targets[i:i + batch_size].float().cpu()
        ps.append(psnr(r, t))
        ss.append(ssim(r, t))
        recons.append(r)
        codes.append(c.cpu())
    stats = {"psnr": torch.cat(ps).clamp(max=100.0).mean().item(), "ssim": torch.cat(ss).mean().item()}
    stats.update(codebook_usage(torch.cat(codes), model.config.n_embed))
    return stats, torch.cat(recons)
