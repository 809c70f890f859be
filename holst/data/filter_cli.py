"""``holst prepare filter``: apply the paper's filters to a dataset and write a filtered JSONL table.

Input: a built dataset folder (``captions.jsonl``), a JSONL/CSV/Parquet table, or a folder of images with
same-named ``.txt`` captions. Output: a JSONL table that :class:`holst.data.TableDataset` reads (image
paths rewritten relative to the output file) plus ``<out>.report.json`` with removals by reason.
WebDataset .tar shards in (file, glob, brace range or folder of .tar) give shards out: ``--out`` is then
a folder of ``part-NNNNN.tar`` (kept samples, members unchanged) plus ``filter.report.json``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from holst.cli_common import add_runtime_arguments
from holst.data.filters import FilterOptions, clip_scorer, filter_pairs, filter_shards
from holst.data.images import BadSample, DataReport, decode_caption
from holst.data.loaders import IMAGE_EXTS, is_shard_source, read_table


def load_rows(source: Path, caption_key: str, scan: DataReport) -> tuple[list[dict], Path, list[str]]:
    """(rows, folder relative paths are resolved against, caption files that were not UTF-8).

    Table rows that cannot be read (not UTF-8, not JSON) are counted in ``scan``.
    """
    if source.is_dir() and (source / "captions.jsonl").is_file():
        return read_table(source / "captions.jsonl", scan), source, []
    if source.is_file():
        return read_table(source, scan), source.parent, []
    if not source.is_dir():
        raise FileNotFoundError(f"--input {source} does not exist")
    rows, bad = [], []
    for path in sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()):
        txt = next((t for t in (path.with_suffix(f".{caption_key}.txt"), path.with_suffix(".txt")) if t.is_file()),
                   None)
        row = {"file": str(path.relative_to(source))}
        if txt is not None:
            try:
                row[caption_key] = decode_caption(txt.read_bytes(), str(txt))
            except BadSample:
                bad.append(str(txt))
                row[caption_key] = txt.read_bytes()  # filter_pairs reports it as caption_not_utf8
        rows.append(row)
    return rows, source, bad


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``holst prepare filter``."""
    parser.add_argument("--input", required=True, help="dataset folder, table (.jsonl/.csv/.parquet) or image folder")
    parser.add_argument("--out", required=True, help="output JSONL table, e.g. data/emoji/filtered.jsonl")
    parser.add_argument("--lang", default="ru", help="caption column to check (default ru)")
    parser.add_argument("--min-caption-chars", type=int, default=3)
    parser.add_argument("--min-caption-words", type=int, default=1)
    parser.add_argument("--min-side", type=int, default=64, help="smallest allowed image side in px (0: off)")
    parser.add_argument("--max-aspect", type=float, default=3.0, help="largest long/short side ratio (0: off)")
    parser.add_argument("--no-exact-dedup", action="store_true", help="keep exact duplicate images")
    parser.add_argument("--near-dup-distance", type=int, default=4,
                        help="perceptual-hash Hamming distance counted as a near duplicate (-1: off)")
    parser.add_argument("--clip", default=None, help="CLIP directory (config.json, model.safetensors, tokenizer/)")
    parser.add_argument("--min-clip-score", type=float, default=None, help="drop pairs scoring below this")
    add_runtime_arguments(parser, device="cpu", dtype_flag=False)
    parser.add_argument("--samples-per-shard", type=int, default=10000, help="output shard size (tar input)")


def main(args: argparse.Namespace) -> int:
    """Run ``holst prepare filter``: write the kept rows (or filtered shards) and a report; prints its summary."""
    from holst.errors import ConfigError
    from holst.utils.runtime import resolve_device, set_threads

    source, out = Path(args.input), Path(args.out)
    if args.clip and args.min_clip_score is None:  # before the CLIP model is loaded
        raise ConfigError("--clip needs --min-clip-score (the score below which pairs are dropped)")
    set_threads(args.threads)
    options = FilterOptions(min_caption_chars=args.min_caption_chars, min_caption_words=args.min_caption_words,
                            min_side=args.min_side, max_aspect=args.max_aspect, exact_dedup=not args.no_exact_dedup,
                            near_dup_distance=None if args.near_dup_distance < 0 else args.near_dup_distance,
                            min_clip_score=args.min_clip_score)
    scorer = None
    if args.clip:
        scorer = clip_scorer(args.clip, str(resolve_device(args.device)))
    if is_shard_source(args.input):
        report = filter_shards([args.input], out, options=options, scorer=scorer,
                               samples_per_shard=args.samples_per_shard)
        (out / "filter.report.json").write_text(json.dumps({"input": args.input, "out": str(out),
                                                            **report.to_dict()}, indent=2, ensure_ascii=False) + "\n",
                                                encoding="utf-8")
        print(report.summary())
        return 0
    scan = DataReport()
    rows, root, bad_captions = load_rows(source, args.lang, scan)
    kept, report = filter_pairs(rows, root, caption_key=args.lang, options=options, scorer=scorer)
    for reason, n in scan.skipped.items():  # unreadable table rows count as read and removed
        report.read += n
        report.removed[f"table:{reason}"] += n
        report.examples[f"table:{reason}"].append(scan.examples[reason])
        bad_captions += [scan.examples[reason]] if reason == "caption_not_utf8" else []
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for row in kept:
            path = next(row[k] for k in ("file", "path", "image", "image_path", "filepath") if row.get(k))
            absolute = Path(path) if Path(path).is_absolute() else root / path
            row = {**row, "file": os.path.relpath(absolute.resolve(), out.parent.resolve())}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    summary = {"input": str(source), "out": str(out), **report.to_dict(), "caption_not_utf8_files": bad_captions[:20]}
    Path(str(out) + ".report.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    print(report.summary())
    return 0
