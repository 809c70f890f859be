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

    split: str = dataclasses.field(default="test", metadata={
        "help": "held-out split: test, test_concept, test_style (default {default})"})
    lang: str = "ru"
    num_captions: int = dataclasses.field(default=32, metadata={
        "help": "held-out captions / specs to generate for, 0 = all (default {default})"})
    num_images: int = dataclasses.field(default=4, metadata={"help": "images per caption (default {default})"})
    candidates: int = dataclasses.field(default=100, metadata={
        "help": "captions per R-precision query (default {default})"})
    fd: bool = dataclasses.field(default=True, metadata={"help": "the FD-EffLite0 distance (--no-fd skips it)"})
    fd_resolution: int = dataclasses.field(default=224, metadata={
        "help": "images are resized to this for FD-EffLite0 (default {default})"})
    limit: int = dataclasses.field(default=0, metadata={"help": "at most this many held-out images (0 = all)"})
    batch_size: int = 16
    grid_rows: int = dataclasses.field(default=8, metadata={"help": "captions shown in the grid"})
    seed: int = dataclasses.field(default=0, metadata={"help": "seeds caption choice, sampling and distractors"})

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
