"""``holst prepare codes``: encode a dataset with a VQGAN into code shards, once.

Each image is encoded once (whatever the number of caption languages); a shard holds ``--shard-size``
images. Re-running with the same options skips shards that are already complete, so an interrupted
run resumes. ``index.json`` in the output folder records the VQGAN, sizes, counts and the skip report.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from holst.data.codes import write_code_shard
from holst.data.images import BadSample, DataReport, image_to_tensor, resize_crop
from holst.data.loaders import ImageCaptionDataset, WebDatasetShards, open_dataset
from holst.utils.runtime import get_logger

log = get_logger("holst.data.prepare")


def iter_images(dataset, report: DataReport, skip: int = 0) -> Iterator[tuple[torch.Tensor, dict[str, str], str]]:
    """(image (3, H, W), {lang: caption}, key) once per image of a loader, bad images skipped and counted.

    ``skip`` records are passed over without decoding (resuming after complete shards).
    """
    if isinstance(dataset, ImageCaptionDataset):
        from holst.data.images import decode_image

        for path, captions, key in dataset.records[skip:]:
            report.read += 1
            try:
                image = decode_image(path, max_pixels=dataset.max_pixels, report=report, key=str(path))
            except BadSample as e:
                report.skip(e.reason, str(path))
                log.warning("skipping bad sample: %s", e)
                continue
            report.kept += 1
            image = resize_crop(image, dataset.size, "pad" if dataset.crop == "pad" else "center")
            yield image_to_tensor(image), captions, key
    elif isinstance(dataset, WebDatasetShards):
        dataset.report = report
        for n, sample in enumerate(dataset):
            if n >= skip:
                yield sample["image"], {"txt": sample["caption"]}, sample["key"]
    else:
        raise TypeError(f"cannot iterate images of {type(dataset).__name__}")


def prepare_codes(dataset, encoder, out: str | Path, *, langs: Sequence[str], batch_size: int = 32,
                  shard_size: int = 10000, fmt: str = "safetensors", device: str | torch.device = "cpu",
                  n_embed: int | None = None, extra: dict | None = None) -> dict:
    """Encode ``dataset`` with ``encoder.encode(images (B,3,H,W) [0,1]) -> (B,h,w)`` into shards in ``out``.

    Args:
        dataset: a TableDataset / FolderDataset / WebDatasetShards (its ``size`` must suit the VQGAN).
        encoder: a VQGAN (or anything with that ``encode``), already on ``device`` and in eval mode.
        out: output folder (``codes-00000.safetensors`` + ``.json``, ..., ``index.json``).
        langs: caption languages stored per image (``txt`` for tar shards).
        batch_size: images per encode call.
        shard_size: images per shard.
        fmt: ``safetensors`` or ``npz``.
        device: where the images go before ``encoder.encode``.
        n_embed: codebook size (int16 vs int32 storage).
        extra: more fields for index.json (source, split).

    Returns:
        The index dict written to ``out/index.json``.
    """
    if fmt not in ("safetensors", "npz"):
        raise ValueError(f"fmt={fmt!r} is not allowed; choose 'safetensors' or 'npz'")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    done = 0  # complete shards from an earlier run are kept (resume); counted by records, not images
    index_path = out / "index.json"
    old = json.loads(index_path.read_text(encoding="utf-8")) if index_path.is_file() else {}
    shards: list[str] = []
    for entry in old.get("shards", []):
        if (out / entry["file"]).is_file() and entry.get("complete"):
            shards.append(entry["file"])
            done = entry["records_end"]
        else:
            break
    entries = old.get("shards", [])[: len(shards)]
    report = DataReport()
    buf_codes: list[torch.Tensor] = []
    buf_caps: dict[str, list[str]] = {lang: [] for lang in langs}
    buf_keys: list[str] = []
    batch: list[torch.Tensor] = []
    pending_meta: list[tuple[dict[str, str], str]] = []
    grid = None

    def encode_batch() -> None:
        nonlocal grid
        if not batch:
            return
        with torch.no_grad():
            codes = encoder.encode(torch.stack(batch).to(device))  # (B, h, w)
        grid = tuple(codes.shape[1:])
        buf_codes.append(codes.cpu())
        for captions, key in pending_meta:
            for lang in langs:
                buf_caps[lang].append(captions.get(lang, ""))
            buf_keys.append(key)
        batch.clear()
        pending_meta.clear()

    def write_shard(records_end: int) -> None:
        encode_batch()
        if not buf_keys:
            return
        name = f"codes-{len(shards):05d}.{fmt}"
        write_code_shard(out / name, torch.cat(buf_codes), buf_caps, buf_keys, n_embed=n_embed)
        shards.append(name)
        entries.append({"file": name, "count": len(buf_keys), "records_end": records_end, "complete": True})
        buf_codes.clear()
        buf_keys.clear()
        for lang in langs:
            buf_caps[lang].clear()
        log.info("wrote %s (%d images, %.0f s)", name, entries[-1]["count"], time.time() - t0)

    records_seen = done
    for image, captions, key in iter_images(dataset, report, skip=done):
        records_seen = done + report.read if isinstance(dataset, ImageCaptionDataset) else records_seen + 1
        batch.append(image)
        pending_meta.append((captions, key))
        if len(batch) >= batch_size:
            encode_batch()
        if len(buf_keys) + len(batch) >= shard_size:
            write_shard(records_seen)
    if isinstance(dataset, ImageCaptionDataset):
        records_seen = done + report.read
    write_shard(records_seen)
    index = {"shards": entries, "images": sum(e["count"] for e in entries), "langs": list(langs),
             "grid": list(grid) if grid else old.get("grid"), "size": getattr(dataset, "size", None),
             "report": report.to_dict(), "seconds": round(time.time() - t0, 1), **(extra or {})}
    index_path.write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return index


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``holst prepare codes``."""
    parser.add_argument("--vqgan", required=True, help="VQGAN directory (config.json + model.safetensors)")
    parser.add_argument("--data", required=True,
                        help="dataset: built folder (captions.jsonl), table, image folder or .tar shards")
    parser.add_argument("--out", required=True, help="output folder for code shards")
    parser.add_argument("--size", type=int, required=True, help="image side fed to the VQGAN (e.g. 64 or 256)")
    parser.add_argument("--split", default="train",
                        help="rows of a built set / table: train (default) | test | test_concept | test_style | all")
    parser.add_argument("--langs", default="ru,en", help="caption languages to store (default ru,en)")
    parser.add_argument("--crop", default="center", choices=["center", "pad"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=10000, help="images per shard")
    parser.add_argument("--format", default="safetensors", choices=["safetensors", "npz"])
    parser.add_argument("--device", default="auto")


def main(args: argparse.Namespace) -> int:
    """Run ``holst prepare codes``: encode a dataset with a VQGAN into code shards."""
    from holst.utils.runtime import resolve_device
    from holst.vqgan import VQGAN

    device = resolve_device(args.device)
    langs = [x for x in args.langs.split(",") if x]
    vq = VQGAN.from_pretrained(args.vqgan).to(device).eval()
    dataset = open_dataset(args.data, size=args.size, crop=args.crop, langs=langs, split=args.split)
    if isinstance(dataset, WebDatasetShards):
        langs = ["txt"]
    index = prepare_codes(dataset, vq, args.out, langs=langs, batch_size=args.batch_size,
                          shard_size=args.shard_size, fmt=args.format, device=device, n_embed=vq.config.n_embed,
                          extra={"data": str(args.data), "split": args.split, "vqgan": str(args.vqgan)})
    print(json.dumps({k: index[k] for k in ("images", "grid", "langs", "seconds")} | {"report": index["report"]},
                     ensure_ascii=False))
    return 0
