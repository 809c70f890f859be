"""DataConfig: the image-caption training data ``holst.data.build_dataset`` reads."""

from __future__ import annotations

import dataclasses

from holst.config import ConfigBase, _check, check_choice


@dataclasses.dataclass
class DataConfig(ConfigBase):
    """Image-caption data for training: ``holst.data.build_dataset(cfg)``.

    ``sources``: built dataset folders (``holst data emoji|tuxpaint|shapes``, with captions.jsonl),
    JSONL/CSV/Parquet tables, image folders with .txt captions, or .tar shards (all sources .tar, or
    none). ``split`` selects rows of built sets / tables: train, test (every held-out split),
    test_concept, test_style or all. ``langs``: caption languages; each image yields one sample per
    language it has. ``crop``: center, random (seeded per epoch) or pad (letterbox on white).
    ``require_captions``: False keeps images that have no caption at all (image-only stages); an
    empty caption is a caption (kept as ``""``) either way.
    """

    sources: tuple[str, ...] = ("data/emoji", "data/tuxpaint")
    image_size: int = 64
    crop: str = "center"
    langs: tuple[str, ...] = ("ru", "en")
    split: str = "train"
    seed: int = 0
    max_pixels: int = 8192 * 8192
    require_captions: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.sources, str):
            self.sources = (self.sources,)
        if isinstance(self.langs, str):
            self.langs = (self.langs,)
        self.sources, self.langs = tuple(self.sources), tuple(self.langs)
        _check(len(self.sources) > 0 and all(isinstance(s, str) and s for s in self.sources),
               f"sources={self.sources!r} must be a non-empty list of paths")
        _check(len(self.langs) > 0 and all(isinstance(s, str) and s for s in self.langs),
               f"langs={self.langs!r} must be a non-empty list of language codes, e.g. ['ru', 'en']")
        _check(isinstance(self.image_size, int) and self.image_size >= 8,
               f"image_size={self.image_size!r} must be an integer >= 8")
        check_choice("crop", self.crop, ("center", "random", "pad"))
        check_choice("split", self.split, ("train", "test", "test_concept", "test_style", "all"))
        _check(isinstance(self.max_pixels, int) and not isinstance(self.max_pixels, bool) and self.max_pixels > 0,
               f"max_pixels={self.max_pixels!r} must be a positive integer")
        _check(isinstance(self.require_captions, bool),
               f"require_captions={self.require_captions!r} must be true or false")
