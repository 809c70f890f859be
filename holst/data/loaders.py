"""Image-caption datasets: a folder of images + .txt captions, a JSONL/CSV/Parquet table, WebDataset tar shards.

Every dataset yields dicts ``{"image": (3, size, size) float in [0, 1], "caption": str, "lang": str,
"key": str}``. Images are decoded robustly (:func:`holst.data.images.decode_image`): bad files are
skipped and counted in ``dataset.report`` (a :class:`DataReport`) with a warning naming the file.

Map-style datasets (folder, table) cannot drop an index, so a bad item is replaced by the next good
one (index + 1, wrapping) and counted; :class:`WebDatasetShards` simply skips it. Trainers call
:meth:`ImageCaptionDataset.scan` first: every image is decoded once, the bad ones are dropped
(counted once per image, by reason), and the decoded images are kept in memory when they fit.

Captions: an image with no caption at all (no caption file, no caption column) is skipped as
``no_caption`` unless ``require_captions=False`` (image-only stages: VQGAN, super-resolution). A
caption that exists but is empty is a caption: the sample is kept with ``""`` (for the transformer
an unconditional sample, as ``empty_caption_prob`` makes) and counted in ``report.converted``
as ``empty_caption``.
"""

from __future__ import annotations

import csv
import glob
import json
import math
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from holst.data.builtin import unit_hash
from holst.data.images import (
    CROP_MODES,
    DEFAULT_MAX_PIXELS,
    BadSample,
    DataReport,
    decode_caption,
    decode_image,
    image_to_tensor,
    resize_crop,
)
from holst.errors import MissingPackageError
from holst.utils.runtime import get_logger

log = get_logger("holst.data")

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
SPLIT_CHOICES = ("train", "test", "test_concept", "test_style", "all")


def _check_common(size: int, crop: str, langs: Sequence[str]) -> None:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"size={size!r} must be a positive integer")
    if crop not in CROP_MODES:
        raise ValueError(f"crop={crop!r} is not allowed; choose one of {list(CROP_MODES)}")
    if not langs:
        raise ValueError("langs must name at least one caption language, e.g. ('ru',)")


def _item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """Per-item generator: the same (seed, epoch, index) gives the same random crop in any worker."""
    return torch.Generator().manual_seed(int(unit_hash(seed, epoch, index) * 2**62))


DEFAULT_CACHE_BYTES = 1 << 30  # decoded uint8 images a scanned dataset keeps in memory


class ImageCaptionDataset(Dataset):
    """Shared logic of the folder and table datasets: records of (path, {lang: caption}, key)."""

    def __init__(self, records: list[tuple[Path, dict[str, str], str]], *, size: int, crop: str,
                 langs: Sequence[str], seed: int, max_pixels: int) -> None:
        _check_common(size, crop, langs)
        self.size, self.crop, self.langs, self.seed, self.max_pixels = size, crop, tuple(langs), seed, max_pixels
        # one sample per (record, language that the record has): "both languages" doubles the set
        self.items = [(r, lang) for r in range(len(records)) for lang in self.langs if lang in records[r][1]]
        self.records = records
        self.epoch = 0
        self.report = DataReport()
        self._seen: set[int] = set()
        self._bad: set[int] = set()
        self._cache: dict[int, torch.Tensor] = {}  # record -> (3, size, size) uint8, filled by scan()
        self.scanned = False

    def scan(self, *, cache_bytes: int = DEFAULT_CACHE_BYTES) -> DataReport:
        """Decode every image once: drop the bad ones and keep the decoded ones in memory if they fit.

        After a scan ``len(self)`` counts only good samples, ``self.report`` holds the complete
        count (read, kept, skipped by reason, once per image whatever the number of languages) and
        no later access can meet a bad image. Images are cached as uint8 up to ``cache_bytes``
        (not with ``crop='random'``, whose crop changes per epoch).

        Returns:
            The report (also ``self.report``).
        """
        report = DataReport().merge(getattr(self, "scan_report", DataReport()))
        if not hasattr(self, "scan_report"):
            report.read = report.kept = len(self.records)
        budget = cache_bytes if self.crop != "random" else 0
        bad: set[int] = set()
        used = set(r for r, _ in self.items)
        for r, (path, _, _) in enumerate(self.records):
            if r not in used:
                continue
            try:
                image = decode_image(path, max_pixels=self.max_pixels, report=report, key=str(path))
            except BadSample as e:
                bad.add(r)
                report.kept -= 1
                report.skip(e.reason, str(path))
                log.warning("skipping bad sample: %s", e)
                continue
            if budget >= 3 * self.size * self.size:
                budget -= 3 * self.size * self.size
                self._cache[r] = (image_to_tensor(resize_crop(image, self.size, self.crop)) * 255).round().byte()
        self.items = [(r, lang) for r, lang in self.items if r not in bad]
        self.report, self.scanned = report, True
        self._seen = set(range(len(self.items)))  # counted above: __getitem__ must not count again
        return report

    def set_epoch(self, epoch: int) -> None:
        """Change the random crops (``crop='random'``) deterministically per epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> dict:
        """The sample at ``index``; raises BadSample for a bad image (``__getitem__`` skips it)."""
        r, lang = self.items[index]
        path, captions, key = self.records[r]
        if r in self._cache:
            return {"image": self._cache[r].float().div_(255.0), "caption": captions[lang], "lang": lang, "key": key}
        image = decode_image(path, max_pixels=self.max_pixels, report=None if self.scanned else self.report,
                             key=str(path))
        gen = _item_generator(self.seed, self.epoch, index) if self.crop == "random" else None
        image = resize_crop(image, self.size, self.crop, generator=gen)
        return {"image": image_to_tensor(image), "caption": captions[lang], "lang": lang, "key": key}

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self.items):
            raise IndexError(f"index {index} out of range for {len(self.items)} samples")
        for step in range(min(len(self.items), 1000)):
            i = (index + step) % len(self.items)
            if i in self._bad:
                continue
            first = i not in self._seen  # the report counts each sample once, however many epochs
            self._seen.add(i)
            self.report.read += first
            try:
                sample = self.load(i)
            except BadSample as e:
                self._bad.add(i)
                self.report.skip(e.reason, str(self.records[self.items[i][0]][0]))
                log.warning("skipping bad sample: %s", e)
                continue
            self.report.kept += first
            return sample
        raise RuntimeError(f"no readable image found near index {index}: {self.report.summary()}")


_MapDataset = ImageCaptionDataset  # the old private name


# ---------------------------------------------------------------------------------------------
# Folder of images + same-named .txt captions
# ---------------------------------------------------------------------------------------------


class FolderDataset(ImageCaptionDataset):
    """Images in a folder tree, each with a caption file of the same stem.

    ``cat.jpg`` takes its caption for language ``ru`` from ``cat.ru.txt`` if present, else ``cat.txt``.
    Images without any caption file are skipped (counted as ``no_caption``) unless
    ``require_captions=False``; an empty caption file gives the caption ``""``; caption files that
    are not UTF-8 are counted as ``caption_not_utf8`` and reported with their path.

    Args:
        root: folder searched recursively for images.
        size: output side; crop: 'center' | 'random' | 'pad'; langs: caption languages to yield.
        seed: seed of the random crops; max_pixels: decompression-bomb guard.
        require_captions: False keeps images without a caption file (caption ``""``, first language).
    """

    def __init__(self, root: str | Path, *, size: int = 256, crop: str = "center", langs: Sequence[str] = ("ru",),
                 seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS, require_captions: bool = True) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {root} does not exist")
        scan = DataReport()
        records = []
        for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()):
            scan.read += 1
            captions, bad_caption = {}, False
            for lang in langs:
                for txt in (path.with_suffix(f".{lang}.txt"), path.with_suffix(".txt")):
                    if txt.is_file():
                        try:
                            text = decode_caption(txt.read_bytes(), str(txt))
                        except BadSample:
                            bad_caption = True
                            break
                        captions[lang] = text
                        break
            if bad_caption:
                log.warning("caption is not UTF-8: %s", path)
            if not captions and not require_captions:
                captions = {langs[0]: ""}
            elif not captions:
                scan.skip("caption_not_utf8" if bad_caption else "no_caption", str(path))
                continue
            elif not any(captions.values()):
                scan.converted["empty_caption"] += 1
            scan.kept += 1
            records.append((path, captions, str(path.relative_to(root).with_suffix(""))))
        super().__init__(records, size=size, crop=crop, langs=langs, seed=seed, max_pixels=max_pixels)
        self.scan_report = scan
        if sum(scan.skipped.values()):
            log.warning("%s: %s", root, scan.summary())


# ---------------------------------------------------------------------------------------------
# Tables: JSONL / CSV / Parquet of (path, caption)
# ---------------------------------------------------------------------------------------------

PATH_KEYS = ("file", "path", "image", "image_path", "filepath")


def _has_surrogates(value: object) -> bool:
    return isinstance(value, str) and any("\udc80" <= ch <= "\udcff" for ch in value)


def read_table(path: str | Path, report: DataReport | None = None) -> list[dict]:
    """Rows of a .jsonl/.json/.csv/.tsv/.parquet table as dicts (Parquet needs pyarrow).

    Rows that are not valid JSON or whose text is not UTF-8 are skipped, counted in ``report``
    (``bad_row`` / ``caption_not_utf8``, with the line number) and logged; the rest is read.
    """
    path = Path(path)
    report = report if report is not None else DataReport()
    suffix = path.suffix.lower()
    rows: list[dict] = []
    if suffix in (".jsonl", ".ndjson"):
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    report.skip("caption_not_utf8", f"{path}:{n}")
                    log.warning("%s:%d is not UTF-8; row skipped", path, n)
                    continue
                except json.JSONDecodeError as e:
                    report.skip("bad_row", f"{path}:{n}")
                    log.warning("%s:%d is not valid JSON (%s); row skipped", path, n, e)
                    continue
                if not isinstance(row, dict):
                    report.skip("bad_row", f"{path}:{n}")
                    continue
                rows.append(row)
        return rows
    if suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of rows")
        return data
    if suffix in (".csv", ".tsv"):
        # surrogateescape keeps undecodable bytes visible so that only those rows are dropped
        with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            for n, row in enumerate(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","), 2):
                if any(_has_surrogates(v) for v in row.values()):
                    report.skip("caption_not_utf8", f"{path}:{n}")
                    log.warning("%s:%d is not UTF-8; row skipped", path, n)
                    continue
                rows.append(row)
        return rows
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise MissingPackageError(f"reading {path} needs pyarrow (pip install pyarrow); "
                                      "or convert it to JSONL") from e
        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unknown table format {suffix!r}; use .jsonl, .json, .csv, .tsv or .parquet")


def _split_matches(row_split: str | None, split: str) -> bool:
    if split == "all":
        return True
    if row_split is None:
        return split == "train"
    return row_split == split or (split == "test" and str(row_split).startswith("test"))


def _row_caption(row: dict, lang: str) -> str | None:
    """The row's caption for ``lang`` (its column, else ``caption``/``text``); '' if only empty ones; None if none."""
    cells = [row[k] for k in (lang, "caption", "text") if isinstance(row.get(k), str)]
    return next((c for c in cells if c.strip()), cells[0] if cells else None)


class TableDataset(ImageCaptionDataset):
    """Rows of (image path, caption[s]) from a JSONL / CSV / Parquet table, or a built dataset folder.

    The image column is the first of ``file, path, image, image_path, filepath``; relative paths are
    resolved against the table's folder. Caption columns are the language codes (``ru``, ``en``); a
    table with one ``caption`` (or ``text``) column serves it for every language asked for.

    Args:
        source: a table file, or a folder holding ``captions.jsonl`` (what ``holst data emoji`` writes).
        split: 'train' | 'test' (all held-out) | 'test_concept' | 'test_style' | 'all'; rows without a
            ``split`` column count as train.
        size, crop, langs, seed, max_pixels, require_captions: as :class:`FolderDataset`; a caption
            cell that is present but empty gives ``""``.
    """

    def __init__(self, source: str | Path, *, split: str = "train", size: int = 256, crop: str = "center",
                 langs: Sequence[str] = ("ru",), seed: int = 0, max_pixels: int = DEFAULT_MAX_PIXELS,
                 require_captions: bool = True) -> None:
        source = Path(source)
        if source.is_dir():
            source = source / "captions.jsonl"
        if not source.is_file():
            raise FileNotFoundError(f"table {source} does not exist")
        if split not in SPLIT_CHOICES:
            raise ValueError(f"split={split!r} is not allowed; choose one of {list(SPLIT_CHOICES)}")
        scan = DataReport()
        rows = read_table(source, scan)
        if rows and not any(k in rows[0] for k in PATH_KEYS):
            raise ValueError(f"{source}: no image column; expected one of {list(PATH_KEYS)}, got {sorted(rows[0])}")
        records = []
        for n, row in enumerate(rows):
            if not _split_matches(row.get("split"), split):
                continue
            scan.read += 1
            rel = next((row[k] for k in PATH_KEYS if row.get(k)), None)
            if rel is None:
                scan.skip("no_image_path", f"{source} row {n + 1}")
                continue
            path = Path(rel) if Path(rel).is_absolute() else source.parent / rel
            captions = {}
            for lang in langs:
                text = _row_caption(row, lang)
                if text is not None:
                    captions[lang] = " ".join(text.split())
            if not captions and not require_captions:
                captions = {langs[0]: ""}
            elif not captions:
                scan.skip("no_caption", str(rel))
                continue
            elif not any(captions.values()):
                scan.converted["empty_caption"] += 1
            scan.kept += 1
            records.append((path, captions, str(row.get("key") or rel)))
        super().__init__(records, size=size, crop=crop, langs=langs, seed=seed, max_pixels=max_pixels)
        self.rows = rows
        self.scan_report = scan
        if sum(scan.skipped.values()):
            log.warning("%s: %s", source, scan.summary())


# ---------------------------------------------------------------------------------------------
# WebDataset tar shards (img2dataset layout)
# ---------------------------------------------------------------------------------------------


def expand_shards(spec: str | Path | Sequence[str | Path]) -> list[Path]:
    """Shard paths from a folder (all .tar inside), a glob, a brace range 'x-{000..009}.tar', or a list."""
    if isinstance(spec, (list, tuple)):
        return [p for s in spec for p in expand_shards(s)]
    text = str(spec)
    if "{" in text and ".." in text:
        head, rest = text.split("{", 1)
        rng, tail = rest.split("}", 1)
        lo, hi = rng.split("..")
        return [p for i in range(int(lo), int(hi) + 1) for p in expand_shards(f"{head}{i:0{len(lo)}d}{tail}")]
    path = Path(text)
    if path.is_dir():
        return sorted(path.glob("*.tar"))
    if any(c in text for c in "*?["):
        return [Path(p) for p in sorted(glob.glob(text))]
    if not path.is_file():
        raise FileNotFoundError(f"shard {path} does not exist")
    return [path]


def iter_tar_samples(path: Path, report: DataReport) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Stream one tar: consecutive members with the same key (name up to the first dot) form a sample."""
    key, files, broken = None, {}, False
    try:
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name
                base = name.rsplit("/", 1)[-1]
                if base.startswith(".") or "." not in base:
                    continue
                dot = name.rfind("/") + 1 + base.index(".")
                k, ext = name[:dot], name[dot + 1:].lower()
                if k != key and key is not None:
                    yield key, files
                    files = {}
                key = k
                f = tar.extractfile(member)
                files[ext] = f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        broken = True
        report.skip("corrupt_shard", f"{path}: {e}")
        log.warning("shard %s is corrupt or truncated after key %s: %s", path, key, e)
    if key is not None and files:
        yield key, files
    if not broken and not _has_end_marker(path):
        report.skip("corrupt_shard", f"{path}: no end-of-archive marker (truncated?)")
        log.warning("shard %s has no end-of-archive marker: truncated after key %s?", path, key)


def _has_end_marker(path: Path) -> bool:
    """Whether a tar file is complete: a whole number of 512-byte blocks ending with two zero blocks.

    tarfile's stream reader stops silently at a header cut short, so truncation is checked here.
    """
    try:
        size = path.stat().st_size
        if size < 1024 or size % 512:
            return False
        with open(path, "rb") as f:
            f.seek(size - 1024)
            return f.read(1024) == bytes(1024)
    except OSError:
        return False


class WebDatasetShards(IterableDataset):
    """Stream samples from img2dataset-style tar shards (``key.jpg|png|webp`` + ``key.txt`` + ``key.json``).

    Sharding: the stream of samples (shards in order, shuffled per epoch when ``shuffle_shards``) is
    dealt round-robin over all readers (``world_size`` ranks x DataLoader workers): reader ``w`` of
    ``n`` takes samples ``j`` with ``j % n == w``; when the shard count is a multiple of ``n``, each
    reader opens only its own shards instead (same positions, less reading).

    Resume: ``start_sample`` is how many samples (bad ones included) the whole job consumed in this
    epoch; every reader skips exactly the ones it had produced before.

    Args:
        shards: folder, glob, brace range or list of .tar paths.
        size, crop, seed, max_pixels: as :class:`FolderDataset`.
        rank, world_size: this process in a distributed job (defaults: torch.distributed, else 0/1).
        start_sample: resume position; epoch: selects the shard order when ``shuffle_shards``.
        caption_ext: extension of the caption member (``txt``; ``ru.txt`` for a language-suffixed one).
    """

    def __init__(self, shards, *, size: int = 256, crop: str = "center", seed: int = 0,
                 rank: int | None = None, world_size: int | None = None, start_sample: int = 0, epoch: int = 0,
                 shuffle_shards: bool = False, caption_ext: str = "txt",
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        super().__init__()
        _check_common(size, crop, ("txt",))
        self.shards = expand_shards(shards)
        if not self.shards:
            raise FileNotFoundError(f"no .tar shards found for {shards!r}")
        if rank is None or world_size is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if ready else 0 if rank is None else rank
            world_size = dist.get_world_size() if ready else 1 if world_size is None else world_size
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
        self.size, self.crop, self.seed, self.max_pixels = size, crop, seed, max_pixels
        self.rank, self.world_size = rank, world_size
        self.start_sample, self.epoch, self.shuffle_shards = start_sample, epoch, shuffle_shards
        self.caption_ext = caption_ext
        self.report = DataReport()

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        """Set the epoch (it picks the shard order when ``shuffle_shards``) and the sample to resume at."""
        self.epoch, self.start_sample = epoch, start_sample

    def _shard_order(self) -> list[Path]:
        if not self.shuffle_shards:
            return list(self.shards)
        gen = torch.Generator().manual_seed(self.seed * 1000003 + self.epoch)
        perm = torch.randperm(len(self.shards), generator=gen)
        return [self.shards[i] for i in perm.tolist()]

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        n = self.world_size * workers
        reader = self.rank * workers + worker
        shards = self._shard_order()
        shard_level = len(shards) % n == 0 and n > 1
        # readers skip their own samples j < start_sample (j % n == reader)
        to_skip = max(0, math.ceil((self.start_sample - reader) / n))
        j = 0  # position in this reader's sample stream
        for s, shard in enumerate(shards):
            if shard_level and s % n != reader:
                continue
            for key, files in iter_tar_samples(shard, self.report):
                if not shard_level:
                    j_global = j
                    j += 1
                    if j_global % n != reader:
                        continue
                    position = j_global // n
                else:
                    position = j
                    j += 1
                if position < to_skip:
                    continue
                sample = self._decode(f"{shard.name}:{key}", files, position * n + reader)
                if sample is not None:
                    yield sample
        if sum(self.report.skipped.values()):
            log.info("reader %d/%d: %s", reader, n, self.report.summary())

    def _decode(self, key: str, files: dict[str, bytes], stream_index: int) -> dict | None:
        self.report.read += 1
        ext = next((e for e in ("jpg", "jpeg", "png", "webp") if e in files), None)
        try:
            if ext is None:
                raise BadSample("no_image", f"{key}: members {sorted(files)}")
            if self.caption_ext not in files:
                raise BadSample("no_caption", f"{key}: no .{self.caption_ext}")
            caption = decode_caption(files[self.caption_ext], key)
            image = decode_image(files[ext], max_pixels=self.max_pixels, report=self.report, key=key)
        except BadSample as e:
            self.report.skip(e.reason, key)
            log.warning("skipping bad sample: %s", e)
            return None
        # unique per (reader, position): the same sample gets the same crop when a run is resumed
        gen = _item_generator(self.seed, self.epoch, stream_index) if self.crop == "random" else None
        image = resize_crop(image, self.size, self.crop, generator=gen)
        meta = {}
        if "json" in files:
            try:
                meta = json.loads(files["json"].decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                self.report.converted["bad_json_meta"] += 1
        self.report.kept += 1
        return {"image": image_to_tensor(image), "caption": caption, "lang": "txt", "key": key, "meta": meta}


def is_shard_source(source: str | Path) -> bool:
    """Whether ``source`` names tar shards (a .tar file, a brace range, a glob of .tar files or a folder of them)."""
    text = str(source)
    path = Path(text)
    if text.endswith(".tar") or ("{" in text and ".." in text):
        return True
    if any(c in text for c in "*?["):
        return text.endswith(".tar") or all(p.endswith(".tar") for p in glob.glob(text))
    return path.is_dir() and not (path / "captions.jsonl").is_file() and any(path.glob("*.tar"))


_MAP_ONLY = ("langs", "split", "require_captions")  # options of the map-style loaders only


def open_dataset(source: str | Path | Sequence[str | Path], **kwargs) -> Dataset:
    """Pick the loader for ``source``.

    A built-set folder (with captions.jsonl) or a table file -> :class:`TableDataset`; .tar shards (a
    file, brace range, glob, or a folder of .tar) -> :class:`WebDatasetShards`; any other folder ->
    :class:`FolderDataset`. A list of sources gives one dataset: WebDatasetShards when all are shards,
    else a ``ConcatDataset`` of the map-style ones. ``kwargs`` go to the loaders (``split`` and
    ``langs`` are dropped for shards).
    """
    if isinstance(source, (list, tuple)):
        if len(source) == 1:
            return open_dataset(source[0], **kwargs)
        if all(is_shard_source(s) for s in source):
            return WebDatasetShards(list(source), **{k: v for k, v in kwargs.items() if k not in _MAP_ONLY})
        if any(is_shard_source(s) for s in source):
            raise ValueError(f"cannot mix .tar shards with other sources in one dataset: {list(source)}")
        return torch.utils.data.ConcatDataset([open_dataset(s, **kwargs) for s in source])
    if is_shard_source(source):
        return WebDatasetShards(source, **{k: v for k, v in kwargs.items() if k not in _MAP_ONLY})
    path = Path(source)
    if path.is_dir() and not (path / "captions.jsonl").is_file():
        return FolderDataset(path, **{k: v for k, v in kwargs.items() if k != "split"})
    return TableDataset(path, **kwargs)


def build_dataset(config) -> Dataset:
    """The training dataset described by a :class:`holst.config.DataConfig`.

    Args:
        config: sources, image size, crop, languages, split, seed, max_pixels, require_captions.
    Returns:
        A FolderDataset / TableDataset / WebDatasetShards, or a ConcatDataset of map-style ones.
    """
    kwargs = dict(size=config.image_size, crop=config.crop, langs=config.langs, split=config.split, seed=config.seed,
                  max_pixels=config.max_pixels)
    if not config.require_captions:
        kwargs["require_captions"] = False
    return open_dataset(list(config.sources), **kwargs)


def collate(samples: list[dict]) -> dict:
    """Batch samples: images stacked to (B, 3, H, W), other fields as lists."""
    out = {"image": torch.stack([s["image"] for s in samples])}
    for k in samples[0]:
        if k != "image":
            out[k] = [s[k] for s in samples]
    return out
