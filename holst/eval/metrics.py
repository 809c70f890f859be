"""Evaluation metrics in pure torch: Fréchet distance, R-precision, diversity; PSNR/SSIM/codebook usage.

PSNR, SSIM and codebook usage are the VQGAN stage's own functions (``holst.vqgan.metrics``),
re-exported here so that every number of ``holst eval`` comes from one place.

Axis legend: N samples, D feature size, M captions, K candidates per R-precision query.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from holst.errors import InputError
from holst.vqgan.metrics import codebook_usage, psnr, ssim

__all__ = ["codebook_usage", "diversity", "feature_stats", "frechet_distance", "frechet_distance_features",
           "psnr", "r_precision", "ssim"]


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of a feature set, in float64.

    Args:
        features: (N, D) with N >= 2.
    Returns:
        (mu (D,), sigma (D, D)): the unbiased covariance (divides by N - 1), as pytorch-fid does.
    """
    if features.dim() != 2 or features.shape[0] < 2:
        raise InputError(f"feature_stats needs (N >= 2, D) features, got {tuple(features.shape)}")
    x = features.double()
    mu = x.mean(0)
    xc = x - mu
    return mu, xc.t() @ xc / (x.shape[0] - 1)


def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues -> 0)."""
    vals, vecs = torch.linalg.eigh((matrix + matrix.t()) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.t()


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """Fréchet distance between two Gaussians, ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2).

    Tr((S1 S2)^1/2) is computed as the sum of square roots of the eigenvalues of the symmetric
    PSD matrix S1^1/2 S2 S1^1/2 (same spectrum as S1 S2), which avoids scipy's non-symmetric
    sqrtm and its complex round-off. Exact for singular covariances (few samples), in float64.

    Args:
        mu1: (D,) mean of the first set.
        sigma1: (D, D) covariance of the first set.
        mu2: (D,) mean of the second set.
        sigma2: (D, D) covariance of the second set.
    Returns:
        The distance (>= 0 up to round-off; 0 for identical statistics).
    """
    mu1, mu2, sigma1, sigma2 = (t.double() for t in (mu1, mu2, sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.numel(), mu1.numel()):
        raise InputError(f"mismatched statistics: mu {tuple(mu1.shape)} / {tuple(mu2.shape)}, "
                         f"sigma {tuple(sigma1.shape)} / {tuple(sigma2.shape)}")
    root1 = _sqrt_psd(sigma1)
    inner = root1 @ sigma2 @ root1  # (D, D) symmetric PSD
    tr_covmean = torch.linalg.eigvalsh((inner + inner.t()) / 2).clamp_min(0).sqrt().sum()
    value = (mu1 - mu2).pow(2).sum() + sigma1.trace() + sigma2.trace() - 2 * tr_covmean
    return max(float(value), 0.0)


def frechet_distance_features(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (N_a, D) and (N_b, D)."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


def r_precision(image_emb: torch.Tensor, text_emb: torch.Tensor, true_index: torch.Tensor, *,
                candidates: int = 100, generator: torch.Generator | None = None,
                text_groups: torch.Tensor | None = None) -> dict[str, float]:
    """R-precision (R = 1): does each image rank its own caption above ``candidates - 1`` others?

    The protocol of AttnGAN / CLIP-R-Precision: for every image, its caption and ``candidates - 1``
    captions drawn at random (without replacement) from the other captions are scored by cosine
    similarity; the image counts as a hit when its own caption scores strictly highest.

    Args:
        image_emb: (N, E) image embeddings (any scale; cosine is used).
        text_emb: (M, E) caption embeddings, one row per distinct caption.
        true_index: (N,) long, the row of ``text_emb`` that is image n's caption.
        candidates: captions per query including the true one (100 in the literature); with fewer
            captions available, all of them are used and the result says so.
        generator: draws the distractors (a fixed seed keeps runs comparable).
        text_groups: (M,) long; captions of one group are synonyms and never used as distractors
            of each other (default: every caption is its own group).
    Returns:
        {"r_precision": hit rate in [0, 1], "candidates": candidates actually used (the minimum over
        queries), "chance": 1 / that number, "n": N}.
    """
    if image_emb.shape[0] != true_index.shape[0]:
        raise InputError(f"{image_emb.shape[0]} image embeddings for {true_index.shape[0]} caption indices")
    if candidates < 2:
        raise InputError(f"candidates={candidates} must be >= 2")
    M = text_emb.shape[0]
    groups = torch.arange(M) if text_groups is None else text_groups.cpu().long()
    sims = F.normalize(image_emb.double(), dim=-1) @ F.normalize(text_emb.double(), dim=-1).t()  # (N, M)
    hits, used = 0, candidates
    for n, t in enumerate(true_index.tolist()):
        others = torch.nonzero(groups != groups[t]).flatten()
        k = min(candidates - 1, others.numel())
        if k == 0:
            raise InputError("R-precision needs at least two distinct captions")
        pick = others[torch.randperm(others.numel(), generator=generator)[:k]]
        used = min(used, k + 1)
        hits += int(bool((sims[n, pick] < sims[n, t]).all()))
    n_images = max(true_index.shape[0], 1)
    return {"r_precision": hits / n_images, "candidates": used, "chance": 1.0 / used, "n": int(true_index.shape[0])}


def diversity(features: torch.Tensor, groups: torch.Tensor) -> float:
    """Mean pairwise cosine distance (1 - cos) between the images of one caption, averaged over captions.

    Args:
        features: (N, D) image features.
        groups: (N,) long caption id of each image; captions with a single image are skipped.
    Returns:
        Mean over captions of the mean over image pairs, in [0, 2]; NaN if no caption has two images.
    """
    f = F.normalize(features.double(), dim=-1)
    per_caption = []
    for g in torch.unique(groups):
        x = f[groups == g]
        n = x.shape[0]
        if n < 2:
            continue
        cos = x @ x.t()  # (n, n)
        per_caption.append(float((1 - cos).sum() / (n * (n - 1))))  # diagonal contributes 0
    return sum(per_caption) / len(per_caption) if per_caption else math.nan
