"""Data loading throughput: holst loaders vs a naive PIL loop, tar streaming, code shards, shapes checker.

Uses a built dataset folder when given (``--data data/emoji``), else a generated fixture of random
PNGs. Baseline in the same run: ``Image.open(path).convert('RGB').resize(...)`` + to tensor per sample
(no bad-input handling). Prints one JSON object (samples/s, single process).

    .venv/bin/python bench/data.py [--data data/emoji] [--size 64] [--n 2000]
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from holst.data import TableDataset, WebDatasetShards
from holst.data.codes import CodeShardDataset, write_code_shard
from holst.data.images import image_to_tensor
from holst.data.shapes import all_specs, check, render


def fixture(root: Path, n: int) -> Path:
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    with open(root / "captions.jsonl", "w", encoding="utf-8") as f:
        for i in range(n):
            small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
            Image.fromarray(small).resize((96, 96), Image.Resampling.BICUBIC).save(root / "images" / f"{i}.png")
            f.write(json.dumps({"file": f"images/{i}.png", "ru": f"картинка {i}", "split": "train"}) + "\n")
    return root


def rate(fn, n: int) -> float:
    t0 = time.perf_counter()
    fn()
    return n / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=None)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="holst-bench-data-"))
    root = Path(args.data) if args.data else fixture(tmp / "fixture", args.n)
    ds = TableDataset(root, split="all", size=args.size, langs=("ru",))
    n = min(args.n, len(ds))
    paths = [ds.records[r][0] for r, _ in ds.items[:n]]

    def naive() -> None:
        for p in paths:
            image_to_tensor(Image.open(p).convert("RGB").resize((args.size, args.size), Image.Resampling.LANCZOS))

    def ours() -> None:
        for i in range(n):
            ds[i]

    # tar shards of the same images, 4 shards
    shard_dir = tmp / "shards"
    shard_dir.mkdir()
    per = (n + 3) // 4
    for s in range(4):
        with tarfile.open(shard_dir / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per, min(n, (s + 1) * per)):
                for ext, data in (("png", paths[i].read_bytes()), ("txt", f"картинка {i}".encode())):
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    shards = WebDatasetShards(shard_dir, size=args.size)
    write_code_shard(tmp / "codes.safetensors", torch.randint(0, 8192, (n, 32, 32)), {"ru": ["x"] * n})
    codes = CodeShardDataset(tmp / "codes.safetensors")
    specs = all_specs()[::max(1, len(all_specs()) // 200)]
    images = [render(s, 64) for s in specs]
    t0 = time.perf_counter()
    for image, spec in zip(images, specs):
        check(image, spec)
    check_ms = (time.perf_counter() - t0) / len(specs) * 1000
    result = {
        "machine": "cpu, 1 thread", "samples": n, "size": args.size, "data": str(args.data or "fixture 96px png"),
        "baseline_pil_loop_per_s": round(rate(naive, n), 1),
        "table_dataset_per_s": round(rate(ours, n), 1),
        "tar_shards_per_s": round(rate(lambda: sum(1 for _ in shards), n), 1),
        "code_shards_32x32_per_s": round(rate(lambda: [codes[i] for i in range(n)], n), 1),
        "shapes_check_ms_64px": round(check_ms, 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
