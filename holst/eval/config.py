"""EvalConfig: the settings of ``holst eval``, recorded in every report."""

from __future__ import annotations

import dataclasses

from holst.config import ConfigBase, _check, check_choice


@dataclasses.dataclass
class EvalConfig(ConfigBase):
    """Settings of ``holst eval``; each report records them so numbers are compared like with like.

    ``split``: held-out rows of the dataset folder (test = test_concept + test_style).
    ``lang``: caption language ('ru', 'en'; 'both' only for the dalle report). ``num_captions`` held-out
    captions (0 = all) x ``num_images`` images each for the pipeline / shapes reports.
    ``candidates``: captions per R-precision query (the true one + 99 others in the literature).
    ``fd_resolution``: side the images are resized to for FD-EffLite0 (224 = its ImageNet size);
    ``fd`` False skips FD and feature diversity. ``limit``: at most this many held-out images
    (vqgan / dalle reports; 0 = all). ``grid_rows``: captions shown in the grid PNGs.
    """

    split: str = "test"
    lang: str = "ru"
    num_captions: int = 32
    num_images: int = 4
    candidates: int = 100
    fd: bool = True
    fd_resolution: int = 224
    limit: int = 0
    batch_size: int = 16
    grid_rows: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        check_choice("split", self.split, ("train", "test", "test_concept", "test_style", "all"))
        check_choice("lang", self.lang, ("ru", "en", "both"))
        for name in ("num_captions", "limit", "grid_rows", "seed"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{name}={v!r} must be an integer >= 0")
        for name in ("num_images", "batch_size"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name}={v!r} must be an integer >= 1")
        _check(isinstance(self.candidates, int) and self.candidates >= 2,
               f"candidates={self.candidates!r} must be an integer >= 2 (100 = the usual R-precision)")
        _check(isinstance(self.fd_resolution, int) and self.fd_resolution >= 32,
               f"fd_resolution={self.fd_resolution!r} must be an integer >= 32")
        _check(isinstance(self.fd, bool), f"fd={self.fd!r} must be true or false")
