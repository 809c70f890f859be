"""Offline evaluation: FD-EffLite0, R-precision, diversity, PSNR/SSIM, and the ``holst eval`` reports.

Importing this package is cheap: the EfficientNet-Lite0 weights load only when a report needs them.
"""

from holst.eval.metrics import (
    codebook_usage,
    diversity,
    feature_stats,
    frechet_distance,
    frechet_distance_features,
    psnr,
    r_precision,
    ssim,
)

__all__ = ["codebook_usage", "diversity", "feature_stats", "frechet_distance", "frechet_distance_features", "psnr",
           "r_precision", "ssim"]
