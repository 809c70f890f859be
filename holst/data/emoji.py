"""``holst data emoji``: emoji art in several styles with Russian and English CLDR names.

Sources (``research/data.md`` §1, versions pinned so a build is reproducible):

* captions: npm ``emojibase-data`` 17.0.0 (MIT; text from Unicode CLDR): ``ru/data.json``, ``en/data.json``
* art: Iconify JSON sets of SVG emoji, joined to the captions by code point (``chars.json``):
  noto (Apache-2.0), twemoji (CC-BY-4.0), openmoji (CC-BY-SA-4.0), fluent-flat (MIT), and
  fluent-3d (MIT, joined through fluent-flat's names, gradients; slower to render).

Regional-indicator letters and hair/skin components are left out (they are not pictures).
See :mod:`holst.data.builtin` for the output layout and the split.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from PIL import Image

from holst.data.builtin import (
    add_package_build_arguments,
    assign_split,
    check_image_side,
    prepare_out_dir,
    render_svg,
    require_rasteriser,
    save_png_fast,
    write_index,
)
from holst.data.images import DataReport
from holst.data.packages import cache_dir, npm_pack, read_tgz_member, read_tgz_members
from holst.utils.runtime import get_logger

log = get_logger("holst.data.emoji")

CAPTIONS_PACKAGE = ("emojibase-data", "17.0.0", "MIT")
# style -> (npm package, version, SPDX licence, style whose chars.json names the icons or None)
STYLES: dict[str, tuple[str, str, str, str | None]] = {
    "noto": ("@iconify-json/noto", "1.2.9", "Apache-2.0", None),
    "twemoji": ("@iconify-json/twemoji", "1.2.5", "CC-BY-4.0", None),
    "openmoji": ("@iconify-json/openmoji", "1.2.29", "CC-BY-SA-4.0", None),
    "fluent-flat": ("@iconify-json/fluent-emoji-flat", "1.2.6", "MIT", None),
    "fluent-3d": ("@iconify-json/fluent-emoji", "1.2.7", "MIT", "fluent-flat"),
}
DEFAULT_STYLES = ("noto", "twemoji", "openmoji", "fluent-flat")
COMPONENT_GROUP = 2  # emojibase group id of hair/skin components


def clean_label(text: str) -> str:
    """Tidy a CLDR label: collapse spaces, drop an empty list item ("кресле-коляске: , направленные")."""
    return " ".join(text.replace(": ,", ":").split())


def norm_hex(code: str) -> str:
    """'1f44b-fe0f' -> '1F44B': upper case, variation selector FE0F dropped (how sets differ)."""
    return "-".join(p for p in code.upper().replace("_", "-").split("-") if p and p != "FE0F")


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def load_captions(tgz: Path, *, skins: bool) -> dict[str, dict]:
    """Russian + English names per emoji from an emojibase-data tarball.

    Returns:
        normalised hexcode -> {"hexcode", "concept" (base hexcode), "emoji", "ru", "en", "ru_tags",
        "en_tags", "group", "group_ru", "tone"}; only emoji with both a ru and an en label.
    """
    files = read_tgz_members(tgz, ["ru/data.json", "en/data.json", "ru/messages.json", "en/messages.json"])
    ru = json.loads(files["ru/data.json"])
    en = {norm_hex(e["hexcode"]): e for e in json.loads(files["en/data.json"])}
    groups_ru = {g["order"]: g["message"] for g in json.loads(files["ru/messages.json"])["groups"]}
    groups_en = {g["order"]: g["key"] for g in json.loads(files["en/messages.json"])["groups"]}
    en_skins = {norm_hex(s["hexcode"]): s for e in en.values() for s in e.get("skins", [])}
    out: dict[str, dict] = {}
    for e in ru:
        group = e.get("group")
        if group is None or group == COMPONENT_GROUP:  # regional indicators have no group
            continue
        base = norm_hex(e["hexcode"])
        e_en = en.get(base)
        if e_en is None or not e.get("label") or not e_en.get("label"):
            continue
        common = {"concept": base, "group": groups_en.get(group, str(group)), "group_ru": groups_ru.get(group, ""),
                  "ru_tags": e.get("tags", []), "en_tags": e_en.get("tags", [])}
        out[base] = {"hexcode": base, "emoji": e["emoji"], "ru": clean_label(e["label"]),
                     "en": clean_label(e_en["label"]), "tone": 0, **common}
        if not skins:
            continue
        for s in e.get("skins", []):
            h = norm_hex(s["hexcode"])
            s_en = en_skins.get(h)
            if s_en is None or not s.get("label"):
                continue
            tone = s.get("tone", 0)
            out[h] = {"hexcode": h, "emoji": s["emoji"], "ru": clean_label(s["label"]),
                      "en": clean_label(s_en["label"]), "tone": tone if isinstance(tone, int) else list(tone), **common}
    return out


# ---------------------------------------------------------------------------------------------
# Iconify icon sets
# ---------------------------------------------------------------------------------------------


class IconSet:
    """An Iconify JSON icon set: resolves names (and aliases) to standalone SVG text."""

    def __init__(self, icons_json: dict, chars: dict[str, str]) -> None:
        self.icons = icons_json["icons"]
        self.aliases = icons_json.get("aliases", {})
        self.width = icons_json.get("width", 16)
        self.height = icons_json.get("height", 16)
        self.chars = {norm_hex(k): v for k, v in chars.items()}

    def name_of(self, hexcode: str) -> str | None:
        """The icon name of an emoji (hex code point sequence), or None when this set has no icon for it."""
        name = self.chars.get(hexcode)
        return name if name is not None and (name in self.icons or name in self.aliases) else None

    def resolve(self, name: str) -> tuple[dict, int, bool, bool]:
        """Icon data plus the accumulated alias transforms (quarter turns, hFlip, vFlip)."""
        rotate, hflip, vflip = 0, False, False
        for _ in range(8):  # aliases may chain; Iconify allows a few levels
            if name in self.icons:
                icon = self.icons[name]
                rotate += icon.get("rotate", 0)
                hflip ^= bool(icon.get("hFlip", False))
                vflip ^= bool(icon.get("vFlip", False))
                return icon, rotate % 4, hflip, vflip
            alias = self.aliases[name]
            rotate += alias.get("rotate", 0)
            hflip ^= bool(alias.get("hFlip", False))
            vflip ^= bool(alias.get("vFlip", False))
            name = alias["parent"]
        raise KeyError(f"alias chain too long for {name}")

    def render(self, name: str, size: int, report: DataReport | None = None) -> Image.Image:
        """Render one icon as an RGB image of ``size`` x ``size`` on white (alias rotations and flips applied)."""
        icon, rotate, hflip, vflip = self.resolve(name)
        w, h = icon.get("width", self.width), icon.get("height", self.height)
        left, top = icon.get("left", 0), icon.get("top", 0)
        svg = (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
               f'viewBox="{left} {top} {w} {h}" width="{size}" height="{size}">{icon["body"]}</svg>')
        image = render_svg(svg, size, report=report)
        if hflip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if vflip:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        if rotate:
            image = image.rotate(-90 * rotate)
        return image


def load_icon_sets(styles: list[str], cache: Path, offline: bool) -> tuple[dict[str, IconSet], dict[str, Path]]:
    """Icon sets of ``styles`` (fetching their tarballs) plus the tarball of every package read.

    A style whose chars.json lacks code points (fluent-3d) is joined through another style's names.
    """
    tarballs: dict[str, Path] = {}
    icons_of: dict[str, dict] = {}
    chars_of: dict[str, dict] = {}
    needed = list(dict.fromkeys([s for st in styles for s in (st, STYLES[st][3]) if s]))
    for style in needed:
        package, version, _, _ = STYLES[style]
        tarballs[style] = npm_pack(package, version, cache, offline=offline)
        files = read_tgz_members(tarballs[style], ["chars.json"] + (["icons.json"] if style in styles else []))
        chars_of[style] = json.loads(files["chars.json"])
        if style in styles:
            icons_of[style] = json.loads(files["icons.json"])
    sets = {style: IconSet(icons_of[style], chars_of[STYLES[style][3] or style]) for style in styles}
    return sets, tarballs


# ---------------------------------------------------------------------------------------------
# Licences
# ---------------------------------------------------------------------------------------------


def write_licenses(out: Path, styles: list[str], tarballs: dict[str, Path], captions_tgz: Path) -> None:
    """Write ``out/LICENSES/``: the licence texts of the captions package and of every art style used."""
    lic = out / "LICENSES"
    lic.mkdir(parents=True, exist_ok=True)
    name, version, spdx = CAPTIONS_PACKAGE
    text = read_tgz_member(captions_tgz, "LICENSE").decode("utf-8", "replace")
    (lic / "emojibase-data.txt").write_text(
        f"Captions: npm {name}@{version} ({spdx}); names and keywords from Unicode CLDR "
        f"(Unicode License v3, https://www.unicode.org/license.txt).\n\n{text}", encoding="utf-8")
    lines = ["# Emoji dataset: sources and licences", "",
             f"- captions: npm `{name}@{version}` ({spdx}), text from Unicode CLDR (Unicode-3.0)"]
    for style in styles:
        package, version, spdx, _ = STYLES[style]
        info = json.loads(read_tgz_member(tarballs[style], "info.json"))
        author = info.get("author", {})
        lic_info = info.get("license", {})
        entry = (f"Images in images/{style}/: npm {package}@{version}\n"
                 f"Artwork: {info.get('name', style)} by {author.get('name', '?')} ({author.get('url', '')})\n"
                 f"License: {lic_info.get('title', spdx)} (SPDX {lic_info.get('spdx', spdx)}) "
                 f"{lic_info.get('url', '')}\n"
                 "Rendered to PNG by holst (resvg); no other changes.\n")
        (lic / f"{style}.txt").write_text(entry, encoding="utf-8")
        lines.append(f"- images/{style}/: {info.get('name', style)} by {author.get('name', '?')}, "
                     f"{lic_info.get('spdx', spdx)} ({lic_info.get('url', '')}), npm `{package}@{version}`")
    lines += ["", "CC-BY / CC-BY-SA artwork requires attribution; CC-BY-SA derivatives must keep the licence."]
    (lic / "README.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Build
# ---------------------------------------------------------------------------------------------


def build_emoji(out: str | Path, *, size: int = 64, styles: list[str] | tuple[str, ...] = DEFAULT_STYLES,
                skins: bool = False, groups: list[str] | None = None, limit: int | None = None, seed: int = 0,
                heldout_concepts: float = 0.05, heldout_styles: float = 0.1, cache: str | Path | None = None,
                offline: bool = False, overwrite: bool = False) -> dict:
    """Build the emoji dataset into ``out``.

    Args:
        out: output folder (layout in :mod:`holst.data.builtin`).
        size: image side in pixels (SVGs are rendered at this size, not resized).
        styles: art styles, keys of :data:`STYLES`.
        skins: also render the skin-tone variants (about doubles the set).
        groups: keep only these emojibase groups (e.g. ``animals-nature``); None = all.
        limit: keep only the first ``limit`` concepts (emojibase order), for smoke tests.
        seed: seed of the fixed held-out split (:func:`assign_split`).
        heldout_concepts: fraction of concepts held out entirely (``test_concept``).
        heldout_styles: fraction of the other concepts with two or more styles that have one style held
            out (``test_style``).
        cache: package cache folder (default ``~/.cache/holst``).
        offline: never fetch; use the cache only.
        overwrite: replace an earlier build in ``out``.

    Returns:
        The meta dict written to ``out/meta.json`` (counts per split, packages, options, report).
    """
    t0 = time.time()
    unknown = [s for s in styles if s not in STYLES]
    if unknown:
        raise ValueError(f"unknown emoji style(s) {unknown}; choose from {sorted(STYLES)}")
    require_rasteriser()
    out, cache = Path(out), cache_dir(cache)
    prepare_out_dir(out, overwrite)
    captions_tgz = npm_pack(CAPTIONS_PACKAGE[0], CAPTIONS_PACKAGE[1], cache, offline=offline)
    captions = load_captions(captions_tgz, skins=skins)
    if groups:
        captions = {h: c for h, c in captions.items() if c["group"] in groups}
    if limit is not None:
        keep = list(dict.fromkeys(c["concept"] for c in captions.values()))[:limit]
        captions = {h: c for h, c in captions.items() if c["concept"] in set(keep)}
    sets, tarballs = load_icon_sets(list(styles), cache, offline)

    styles_of: dict[str, list[str]] = {}
    for style, iconset in sets.items():
        for h, c in captions.items():
            if h == c["concept"] and iconset.name_of(h) is not None:
                styles_of.setdefault(h, []).append(style)
    report = DataReport()
    records = []
    for style, iconset in sets.items():
        for h, c in captions.items():
            name = iconset.name_of(h)
            if name is None:
                continue
            report.read += 1
            rel = f"images/{style}/{h}.png"
            try:
                image = iconset.render(name, size, report=None)
            except (ValueError, KeyError, OSError) as e:  # a broken SVG must not stop the build
                report.skip("render_failed", f"{style}/{name}: {e}")
                continue
            save_png_fast(image, out / rel)
            report.kept += 1
            split = assign_split(c["concept"], style, styles_of.get(c["concept"], [style]), seed=seed,
                                 heldout_concepts=heldout_concepts, heldout_styles=heldout_styles)
            records.append({"file": rel, "ru": c["ru"], "en": c["en"], "split": split, "style": style,
                            "concept": c["concept"], "hexcode": h, "emoji": c["emoji"], "ru_tags": c["ru_tags"],
                            "en_tags": c["en_tags"], "group": c["group"], "group_ru": c["group_ru"],
                            "tone": c["tone"]})
        log.info("emoji style %s: %d images so far", style, len(records))
    write_licenses(out, list(styles), tarballs, captions_tgz)
    meta = {"dataset": "emoji", "size": size, "styles": list(styles), "skins": skins, "groups": groups,
            "limit": limit, "seed": seed, "heldout_concepts": heldout_concepts, "heldout_styles": heldout_styles,
            "packages": {CAPTIONS_PACKAGE[0]: CAPTIONS_PACKAGE[1],
                         **{STYLES[s][0]: STYLES[s][1] for s in tarballs}},
            "report": report.to_dict(), "build_seconds": round(time.time() - t0, 1)}
    return write_index(out, records, meta)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``holst data emoji``."""
    parser.add_argument("--out", required=True, help="output folder, e.g. data/emoji")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--styles", default=",".join(DEFAULT_STYLES),
                        help=f"comma-separated art styles from {sorted(STYLES)} (default %(default)s)")
    parser.add_argument("--skins", action="store_true", help="also include skin-tone variants")
    parser.add_argument("--groups", default=None,
                        help="comma-separated emojibase groups, e.g. animals-nature,food-drink")
    parser.add_argument("--limit", type=int, default=None, help="only the first N concepts (smoke tests)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fixed held-out split")
    parser.add_argument("--heldout-concepts", type=float, default=0.05, help="fraction of concepts held out entirely")
    parser.add_argument("--heldout-styles", type=float, default=0.1,
                        help="fraction of concepts with one style rendering held out")
    add_package_build_arguments(parser, offline_help="use cached packages only")


def main(args: argparse.Namespace) -> int:
    """Run ``holst data emoji``: build the emoji dataset; prints the counts as JSON."""
    check_image_side(args.size)
    meta = build_emoji(args.out, size=args.size, styles=[s for s in args.styles.split(",") if s], skins=args.skins,
                       groups=args.groups.split(",") if args.groups else None, limit=args.limit, seed=args.seed,
                       heldout_concepts=args.heldout_concepts, heldout_styles=args.heldout_styles,
                       cache=args.cache, offline=args.offline, overwrite=args.overwrite)
    print(json.dumps({"out": str(args.out), "counts": meta["counts"], "concepts": meta["concepts"],
                      "skipped": meta["report"]["skipped"], "seconds": meta["build_seconds"]}, ensure_ascii=False))
    return 0
