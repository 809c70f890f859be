"""The paper's data filters for image-caption pairs, each reporting how many pairs it removed and why.

ruDALL-E's data preparation (``research/reference.md``) drops pairs with too-short captions, too-small
images, extreme aspect ratios, exact and near duplicates, and image-text mismatch measured with CLIP.
:func:`filter_pairs` runs them in that order over a list of rows ``{"file": path, <caption column>: str, ...}``
and returns the kept rows plus a :class:`FilterReport`.

A CLIP scorer is any callable ``scorer(images: list[PIL.Image], captions: list[str]) -> (B,) scores``;
:func:`clip_scorer` builds one from a holst CLIP directory (``holst.rerank.clip.CLIPModel``).
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from holst.data.images import DEFAULT_MAX_PIXELS, BadSample, DataReport, decode_image
from holst.utils.runtime import get_logger

log = get_logger("holst.data.filters")

Scorer = Callable[[list[Image.Image], list[str]], torch.Tensor]


@dataclasses.dataclass
class FilterReport:
    """Rows read / kept and, per filter, how many were removed with a few example keys."""

    read: int = 0
    kept: int = 0
    removed: Counter = dataclasses.field(default_factory=Counter)
    examples: dict = dataclasses.field(default_factory=lambda: defaultdict(list))
    decode: DataReport = dataclasses.field(default_factory=DataReport)

    def remove(self, reason: str, key: str) -> None:
        """Count one removed row under ``reason``, keeping up to 5 example keys."""
        self.removed[reason] += 1
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(key)

    def to_dict(self) -> dict:
        """The report as a JSON-ready dict (removed counts, examples, image conversions)."""
        return {"read": self.read, "kept": self.kept, "removed": dict(self.removed),
                "removed_total": sum(self.removed.values()), "examples": dict(self.examples),
                "converted": dict(self.decode.converted)}

    def summary(self) -> str:
        """The report as text: totals, then one line per reason with examples."""
        lines = [f"read {self.read}, kept {self.kept}, removed {sum(self.removed.values())}"]
        for reason, n in self.removed.items():
            lines.append(f"  {reason}: {n} (e.g. {', '.join(self.examples[reason][:3])})")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Hashes
# ---------------------------------------------------------------------------------------------


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)


def phash(image: Image.Image) -> int:
    """64-bit perceptual hash: 8x8 low frequencies of the DCT of a 32x32 grey image, thresholded at their median.

    Robust to re-encoding, resizing and small colour shifts; Hamming distance compares.
    """
    grey = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.BILINEAR), dtype=np.float64)
    low = (_DCT32 @ grey @ _DCT32.T)[:8, :8].flatten()
    bits = low > np.median(low[1:])  # the DC term (overall brightness) would dominate the median
    return int("".join("1" if b else "0" for b in bits), 2)


def pixel_hash(image: Image.Image) -> str:
    """Hash of the decoded RGB pixels and size: equal for the same picture saved in any lossless way."""
    return hashlib.sha1(f"{image.size}".encode() + image.tobytes()).hexdigest()


def hamming(a: int, b: int) -> int:
    """Hamming distance between two 64-bit perceptual hashes."""
    return (a ^ b).bit_count()


class NearDuplicateIndex:
    """Find earlier hashes within Hamming distance ``max_distance`` (multi-index hashing).

    The 64 bits are split into ``max_distance + 1`` chunks: two hashes within the distance agree on at
    least one whole chunk (pigeonhole), so only hashes sharing a chunk are compared.
    """

    def __init__(self, max_distance: int) -> None:
        if not 0 <= max_distance < 32:
            raise ValueError(f"max_distance={max_distance} must lie in [0, 32)")
        self.max_distance = max_distance
        n = max_distance + 1
        edges = [round(i * 64 / n) for i in range(n + 1)]
        self.chunks = list(zip(edges[:-1], edges[1:]))
        self.tables: list[dict[int, list[int]]] = [defaultdict(list) for _ in self.chunks]
        self.hashes: list[int] = []

    def _parts(self, h: int) -> list[int]:
        return [(h >> lo) & ((1 << (hi - lo)) - 1) for lo, hi in self.chunks]

    def query(self, h: int) -> int | None:
        """Index of an earlier hash within the distance, or None."""
        for table, part in zip(self.tables, self._parts(h)):
            for i in table.get(part, ()):
                if hamming(self.hashes[i], h) <= self.max_distance:
                    return i
        return None

    def add(self, h: int) -> int:
        """Store a hash; returns its index."""
        i = len(self.hashes)
        self.hashes.append(h)
        for table, part in zip(self.tables, self._parts(h)):
            table[part].append(i)
        return i


# ---------------------------------------------------------------------------------------------
# The filter pass
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class FilterOptions:
    """Thresholds; a value of 0 / None switches that filter off."""

    min_caption_chars: int = 3
    min_caption_words: int = 1
    min_side: int = 64
    max_aspect: float = 3.0
    exact_dedup: bool = True
    near_dup_distance: int | None = 4
    min_clip_score: float | None = None
    clip_batch_size: int = 32
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.max_aspect and self.max_aspect < 1:
            raise ValueError(f"max_aspect={self.max_aspect} must be >= 1 (long side / short side) or 0 to disable")
        if self.near_dup_distance is not None and not 0 <= self.near_dup_distance < 32:
            raise ValueError(f"near_dup_distance={self.near_dup_distance} must lie in [0, 32) or be None")


def _resolve(row: dict, root: Path) -> Path:
    rel = next((row[k] for k in ("file", "path", "image", "image_path", "filepath") if row.get(k)), None)
    if rel is None:
        raise BadSample("no_image_column", f"row has no file/path column: {sorted(row)}")
    return Path(rel) if Path(rel).is_absolute() else root / rel


class PairFilter:
    """The filters as a stream: :meth:`add` pairs one by one, :meth:`take` the accepted ones in order.

    Pairs wait in a batch for the CLIP scorer when ``options.min_clip_score`` is set (call
    :meth:`flush` at the end); otherwise they are accepted or rejected at once. ``report`` counts
    every removal by reason, with example keys.
    """

    def __init__(self, options: FilterOptions | None = None, scorer: Scorer | None = None) -> None:
        self.opt = options or FilterOptions()
        if self.opt.min_clip_score is not None and scorer is None:
            raise ValueError("min_clip_score is set but no CLIP scorer was given (pass --clip DIR)")
        self.scorer = scorer
        self.report = FilterReport()
        self.seen_exact: dict[str, str] = {}
        self.near = NearDuplicateIndex(self.opt.near_dup_distance) if self.opt.near_dup_distance is not None else None
        self.near_keys: list[str] = []
        self.pending: list[tuple[str, object, dict, Image.Image, str]] = []  # awaiting a CLIP score
        self.accepted: list[tuple[object, dict]] = []

    def add(self, key: str, image_source: bytes | str | Path, caption: str | bytes | None, payload: object) -> None:
        """Filter one pair; ``payload`` comes back from :meth:`take` with an info dict if it is kept."""
        opt, report = self.opt, self.report
        report.read += 1
        if isinstance(caption, bytes):
            try:
                caption = caption.decode("utf-8")
            except UnicodeDecodeError:
                report.remove("caption_not_utf8", key)
                return
        if not isinstance(caption, str) or not caption.strip():
            report.remove("no_caption", key)
            return
        caption = " ".join(caption.split())
        if len(caption) < opt.min_caption_chars or len(caption.split()) < opt.min_caption_words:
            report.remove("caption_too_short", key)
            return
        try:
            image = decode_image(image_source, max_pixels=opt.max_pixels, report=report.decode, key=key)
        except BadSample as e:
            report.remove(f"bad_image:{e.reason}", key)
            return
        w, h = image.size
        if opt.min_side and min(w, h) < opt.min_side:
            report.remove("image_too_small", key)
            return
        if opt.max_aspect and max(w, h) / min(w, h) > opt.max_aspect:
            report.remove("extreme_aspect_ratio", key)
            return
        if opt.exact_dedup:
            digest = pixel_hash(image)
            if digest in self.seen_exact:
                report.remove("exact_duplicate", f"{key} = {self.seen_exact[digest]}")
                return
            self.seen_exact[digest] = key
        ph = phash(image)
        if self.near is not None:
            hit = self.near.query(ph)
            if hit is not None:
                report.remove("near_duplicate", f"{key} ~ {self.near_keys[hit]}")
                return
            self.near.add(ph)
            self.near_keys.append(key)
        info = {"phash": f"{ph:016x}", "width": w, "height": h}
        if opt.min_clip_score is None:
            self.accepted.append((payload, info))
            return
        self.pending.append((key, payload, info, image, caption))
        if len(self.pending) >= opt.clip_batch_size:
            self.flush()

    def flush(self) -> None:
        """Score the pairs waiting for CLIP and accept those at or above ``min_clip_score``."""
        if not self.pending:
            return
        with torch.no_grad():
            scores = self.scorer([p[3] for p in self.pending], [p[4] for p in self.pending])
        for (key, payload, info, _, _), s in zip(self.pending, torch.as_tensor(scores).flatten().tolist()):
            if s < self.opt.min_clip_score:
                self.report.remove("clip_mismatch", key)
            else:
                self.accepted.append((payload, {**info, "clip_score": round(float(s), 4)}))
        self.pending.clear()

    def take(self) -> list[tuple[object, dict]]:
        """The (payload, info) pairs accepted since the last call, in input order."""
        out, self.accepted = self.accepted, []
        self.report.kept += len(out)
        return out


def filter_pairs(rows: Sequence[dict], root: str | Path, *, caption_key: str = "ru",
                 options: FilterOptions | None = None, scorer: Scorer | None = None) -> tuple[list[dict], FilterReport]:
    """Run the filters over table rows.

    Args:
        rows: dicts with an image path column (``file``/``path``/...) and a caption column.
        root: folder that relative image paths are resolved against.
        caption_key: the caption column checked by the caption and CLIP filters (falls back to ``caption``).
        options: thresholds (:class:`FilterOptions`).
        scorer: CLIP scorer; with ``options.min_clip_score`` set, pairs scoring below it are removed.

    Returns:
        (kept rows, each with ``phash`` (hex) and ``width``/``height`` (and ``clip_score``) added; report).
    """
    pf = PairFilter(options, scorer)
    root = Path(root)
    kept: list[dict] = []
    for n, row in enumerate(rows):
        key = str(row.get("file") or row.get("path") or row.get("key") or n)
        caption = row.get(caption_key) if row.get(caption_key) is not None else row.get("caption")
        try:
            source = _resolve(row, root)
        except BadSample as e:
            pf.report.read += 1
            pf.report.remove(e.reason, key)
            continue
        pf.add(key, source, caption, row)
        kept += [{**r, **info} for r, info in pf.take()]
    pf.flush()
    kept += [{**r, **info} for r, info in pf.take()]
    return kept, pf.report


def filter_shards(shards: Sequence[str | Path], out: str | Path, *, caption_ext: str = "txt",
                  options: FilterOptions | None = None, scorer: Scorer | None = None,
                  samples_per_shard: int = 10000) -> FilterReport:
    """Filter WebDataset tar shards into new shards ``out/part-NNNNN.tar`` (members copied unchanged).

    Returns:
        The report (a corrupt input shard is counted as ``corrupt_shard`` and the rest of it skipped).
    """
    import io
    import tarfile

    from holst.data.loaders import expand_shards, iter_tar_samples

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pf = PairFilter(options, scorer)
    writer: list = [None, 0, 0]  # open tarfile, samples in it, shard index

    def write(samples: list[tuple[object, dict]]) -> None:
        for (key, files), _ in samples:
            if writer[0] is None or writer[1] >= samples_per_shard:
                if writer[0] is not None:
                    writer[0].close()
                writer[0] = tarfile.open(out / f"part-{writer[2]:05d}.tar", "w")
                writer[1], writer[2] = 0, writer[2] + 1
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                writer[0].addfile(info, io.BytesIO(data))
            writer[1] += 1

    scan = DataReport()
    for shard in expand_shards(list(shards)):
        for key, files in iter_tar_samples(Path(shard), scan):
            ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
            name = f"{Path(shard).name}:{key}"
            if ext is None:
                pf.report.read += 1
                pf.report.remove("no_image", name)
                continue
            pf.add(name, files[ext], files.get(caption_ext), (key, files))
            write(pf.take())
    pf.flush()
    write(pf.take())
    if writer[0] is not None:
        writer[0].close()
    for reason, n in scan.skipped.items():
        pf.report.removed[reason] += n
        pf.report.examples[reason].append(scan.examples[reason])
    return pf.report


def clip_scorer(clip_dir: str | Path, device: str = "cpu") -> Scorer:
    """A scorer from a holst CLIP directory (config.json + model.safetensors, tokenizer in ``tokenizer/``).

    Images are converted to (B, 3, R, R) tensors at the model's resolution; captions are encoded by
    :class:`holst.rerank.ranker.ClipRanker` (ruCLIP's ``keep_eos=True`` convention).
    """
    from holst.data.images import image_to_tensor, resize_crop
    from holst.rerank.ranker import ClipRanker

    ranker = ClipRanker.from_pretrained(clip_dir, device=device)
    resolution = ranker.config.image_resolution

    def score(images: list[Image.Image], captions: list[str]) -> torch.Tensor:
        batch = torch.stack([image_to_tensor(resize_crop(im, resolution, "center")) for im in images])
        return ranker.score(batch, captions)

    return score
