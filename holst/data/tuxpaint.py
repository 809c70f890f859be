"""``holst data tuxpaint``: Tux Paint stamps (photos and clip art) with Russian and English descriptions.

Source (``research/data.md`` §2): Debian ``tuxpaint-stamps-default`` 2022.06.04-1 (GPL-2), fetched with
``apt-get download`` and unpacked with ``dpkg -x`` (no maintainer scripts). Every stamp is an image
(``<name>.png`` or ``<name>.svg``) with ``<name>.txt``: the English description on the first line and
translations as ``<lang>.utf8=...`` lines; we keep stamps that have a Russian line.

Stamps have any aspect ratio, so images are letterboxed on white (``pad``): a crop would cut the object.
See :mod:`holst.data.builtin` for the output layout and split; ``style`` is ``photo`` (many colours) or
``clipart`` (SVG or few colours), ``category`` is the stamp folder (``animals/mammals``...).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from pathlib import Path

from PIL import Image

from holst.data.builtin import (
    add_package_build_arguments,
    assign_split,
    check_image_side,
    prepare_out_dir,
    render_svg,
    save_png_fast,
    write_index,
)
from holst.data.images import BadSample, DataReport, decode_image, resize_crop
from holst.data.packages import apt_download, cache_dir, extract_deb
from holst.utils.runtime import get_logger

log = get_logger("holst.data.tuxpaint")

PACKAGE = ("tuxpaint-stamps-default", "2022.06.04-1", "GPL-2")
STAMPS_DIR = "usr/share/tuxpaint/stamps"
PHOTO_MIN_COLOURS = 4096  # unique colours in the original PNG above which we call a stamp a photo


def parse_description(text: str) -> dict[str, str]:
    """Tux Paint ``.txt``: first line English, then ``lang.utf8=text`` lines -> {"en": ..., "ru": ...}."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    out: dict[str, str] = {}
    if lines and not re.match(r"^[A-Za-z_@]+\.utf8=", lines[0]):
        out["en"] = lines[0]
    for ln in lines[1:]:
        m = re.match(r"^([A-Za-z_@]+)\.utf8=(.*)$", ln)
        if m:
            out.setdefault(m.group(1), m.group(2).strip())
    return out


def clean_caption(text: str) -> str:
    """Collapse whitespace and drop one trailing full stop (captions are names, not sentences)."""
    text = " ".join(text.split())
    return text[:-1].rstrip() if text.endswith(".") and not text.endswith("..") else text


def is_photo(path: Path) -> bool:
    """Whether a stamp is a photo (at least ``PHOTO_MIN_COLOURS`` colours in a 256 px thumbnail) or clip art."""
    with Image.open(path) as im:
        im = im.convert("RGBA")
        im.thumbnail((256, 256))
        return len(im.getcolors(maxcolors=1 << 20) or []) >= PHOTO_MIN_COLOURS


def find_stamps(root: Path) -> list[tuple[Path, Path, str]]:
    """(description .txt, image file, kind 'png'|'svg') for every stamp with an image; PNG preferred."""
    stamps = []
    for txt in sorted(root.rglob("*.txt")):
        png, svg = txt.with_suffix(".png"), txt.with_suffix(".svg")
        if png.is_file():
            stamps.append((txt, png, "png"))
        elif svg.is_file():
            stamps.append((txt, svg, "svg"))
    return stamps


def build_tuxpaint(out: str | Path, *, size: int = 64, limit: int | None = None, seed: int = 0,
                   heldout_concepts: float = 0.05, cache: str | Path | None = None, offline: bool = False,
                   overwrite: bool = False, stamps_root: str | Path | None = None) -> dict:
    """Build the Tux Paint dataset into ``out``.

    Args:
        out: output folder.
        size: image side in pixels (letterboxed on white).
        limit: only the first ``limit`` stamps (sorted by path), for smoke tests.
        seed: seed of the fixed held-out split by stamp (:func:`holst.data.builtin.assign_split`).
        heldout_concepts: fraction of stamps held out.
        cache: package cache.
        offline: never fetch; use the cache only.
        overwrite: replace an earlier build.
        stamps_root: use an already unpacked stamps folder instead of the Debian package (tests).

    Returns:
        The meta dict written to ``out/meta.json``.
    """
    t0 = time.time()
    out = Path(out)
    if stamps_root is None:
        cache = cache_dir(cache)
        deb = apt_download(PACKAGE[0], PACKAGE[1], cache, offline=offline)
        root = extract_deb(deb, cache / "deb" / f"{PACKAGE[0]}_{PACKAGE[1]}") / STAMPS_DIR
        copyright_file = root.parents[1] / "doc" / PACKAGE[0] / "copyright"
    else:
        root, copyright_file = Path(stamps_root), None
    prepare_out_dir(out, overwrite)
    stamps = find_stamps(root)[:limit] if limit is not None else find_stamps(root)
    report = DataReport()
    records = []
    for txt, image_path, kind in stamps:
        report.read += 1
        rel_name = txt.relative_to(root).with_suffix("")
        key = str(rel_name)
        try:
            desc = parse_description(txt.read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            report.skip("caption_not_utf8", key)
            continue
        if "ru" not in desc or "en" not in desc:
            report.skip("no_ru_or_en_caption", key)
            continue
        try:
            if kind == "svg":
                image = render_svg(image_path.read_text(encoding="utf-8", errors="replace"), size, report=report)
                style = "clipart"
            else:
                image = resize_crop(decode_image(image_path, report=report, key=key), size, "pad")
                style = "photo" if is_photo(image_path) else "clipart"
        except (BadSample, ValueError, OSError, ImportError) as e:
            report.skip("image_failed", f"{key}: {e}")
            continue
        rel = f"images/{rel_name.as_posix()}.png"
        save_png_fast(image, out / rel)
        report.kept += 1
        category = rel_name.parent.as_posix()
        split = assign_split(key, style, [style], seed=seed, heldout_concepts=heldout_concepts, heldout_styles=0.0)
        records.append({"file": rel, "ru": clean_caption(desc["ru"]), "en": clean_caption(desc["en"]), "split": split,
                        "style": style, "concept": key, "category": category, "source_kind": kind})
    lic = out / "LICENSES"
    lic.mkdir(parents=True, exist_ok=True)
    header = (f"Images and descriptions in this folder come from the Debian package {PACKAGE[0]} {PACKAGE[1]} "
              f"(Tux Paint stamps, (c) 2002-2022 Bill Kendrick and contributors), licence {PACKAGE[2]}.\n"
              "Rescaled/letterboxed to PNG by holst; descriptions: trailing full stop removed.\n"
              "The dataset is a derivative work and is distributed under the GPL-2 (or later).\n\n")
    body = copyright_file.read_text(encoding="utf-8") if copyright_file and copyright_file.is_file() else ""
    (lic / "tuxpaint-stamps.txt").write_text(header + body, encoding="utf-8")
    common = Path("/usr/share/common-licenses/GPL-2")
    if common.is_file():
        shutil.copyfile(common, lic / "GPL-2.txt")
    meta = {"dataset": "tuxpaint", "size": size, "limit": limit, "seed": seed, "heldout_concepts": heldout_concepts,
            "packages": {PACKAGE[0]: PACKAGE[1]}, "report": report.to_dict(),
            "build_seconds": round(time.time() - t0, 1)}
    return write_index(out, records, meta)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``holst data tuxpaint``."""
    parser.add_argument("--out", required=True, help="output folder, e.g. data/tuxpaint")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N stamps (smoke tests)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fixed held-out split")
    parser.add_argument("--heldout-concepts", type=float, default=0.05, help="fraction of stamps held out")
    add_package_build_arguments(parser, offline_help="use the cached .deb only")


def main(args: argparse.Namespace) -> int:
    """Run ``holst data tuxpaint``: build the Tux Paint dataset; prints the counts as JSON."""
    check_image_side(args.size)
    meta = build_tuxpaint(args.out, size=args.size, limit=args.limit, seed=args.seed,
                          heldout_concepts=args.heldout_concepts, cache=args.cache, offline=args.offline,
                          overwrite=args.overwrite)
    print(json.dumps({"out": str(args.out), "counts": meta["counts"], "concepts": meta["concepts"],
                      "skipped": meta["report"]["skipped"], "converted": meta["report"]["converted"],
                      "seconds": meta["build_seconds"]}, ensure_ascii=False))
    return 0
