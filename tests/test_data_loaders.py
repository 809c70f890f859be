"""Loaders and bad-input handling on small generated fixtures (no network)."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from holst.data import BadSample, DataReport, FolderDataset, TableDataset, WebDatasetShards, decode_image, resize_crop
from holst.data.loaders import collate, expand_shards, open_dataset


def png_bytes(image: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def solid(colour, size=(40, 30)) -> Image.Image:
    return Image.new("RGB", size, colour)


def bomb_png(width: int = 40000, height: int = 40000) -> bytes:
    """A valid-looking PNG whose header claims a huge size (a decompression bomb's signature)."""
    data = bytearray(png_bytes(Image.new("L", (1, 1))))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def bad_files() -> dict[str, bytes]:
    noisy = png_bytes(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)))
    return {
        "empty": b"",
        "not_image": b"this is not an image at all\n" * 10,
        "truncated": noisy[: len(noisy) // 2],
        # the header decodes, the pixel data does not (64 bytes in the middle of the compressed stream garbled)
        "corrupt": noisy[: len(noisy) // 2] + bytes(b ^ 0x5A for b in noisy[len(noisy) // 2:][:64])
        + noisy[len(noisy) // 2 + 64:],
        "too_large": bomb_png(),
    }


# ---------------------------------------------------------------------------------------------
# decode_image
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reason", ["empty", "not_image", "truncated", "corrupt", "too_large"])
def test_bad_images_raise_badsample_with_reason(reason):
    data = bad_files()[reason]
    with pytest.raises(BadSample) as e:
        decode_image(data, key=f"x/{reason}.png")
    assert e.value.reason == reason, (e.value.reason, str(e.value))


def test_max_pixels_guard_refuses_before_decoding():
    with pytest.raises(BadSample) as e:
        decode_image(png_bytes(solid((1, 2, 3), (200, 200))), max_pixels=100 * 100)
    assert e.value.reason == "too_large"


def test_unusual_modes_are_converted_and_counted():
    report = DataReport()
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))  # pure red in CMYK
    out = decode_image(png_bytes(cmyk, "JPEG", quality=95), report=report)
    r, g, b = out.getpixel((4, 4))
    assert out.mode == "RGB" and r > 230 and g < 30 and b < 30
    grey16 = Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16))  # 32896 / 257 = 128
    out16 = decode_image(png_bytes(grey16), report=report)
    assert out16.getpixel((0, 0)) == (128, 128, 128)
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    pal.info["transparency"] = 0  # index 0 fully transparent -> white
    out_p = decode_image(png_bytes(pal, transparency=0), report=report)
    assert out_p.getpixel((0, 0)) == (255, 255, 255)
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    assert decode_image(png_bytes(rgba), report=report).getpixel((0, 0)) == (255, 255, 255)
    assert report.converted["cmyk"] == 1 and report.converted["16bit"] == 1
    assert report.converted["palette"] == 1 and report.converted["alpha"] == 1


def test_resize_crop_modes():
    image = Image.new("RGB", (100, 50), (255, 0, 0))
    image.paste((0, 0, 255), (0, 0, 10, 50))  # blue strip on the far left
    c = resize_crop(image, 32, "center")
    assert c.size == (32, 32) and c.getpixel((0, 16))[2] < 100  # strip cropped away
    p = resize_crop(image, 32, "pad")
    assert p.size == (32, 32) and p.getpixel((16, 0)) == (255, 255, 255)  # letterbox
    assert p.getpixel((0, 16))[2] > 150  # whole width kept: strip visible
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = np.asarray(resize_crop(image, 32, "random", g1))
    b = np.asarray(resize_crop(image, 32, "random", g2))
    assert np.array_equal(a, b)
    with pytest.raises(ValueError, match="crop"):
        resize_crop(image, 32, "stretch")


# ---------------------------------------------------------------------------------------------
# Folder and table datasets
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0), (0, 0, 255)]):
        solid(colour, (48, 32)).save(root / f"good{i}.png")
        (root / f"good{i}.txt").write_text(f"  цвет   {i} \n", encoding="utf-8")
    (root / "good0.en.txt").write_text("colour 0", encoding="utf-8")
    solid((9, 9, 9)).save(root / "sub" / "nocaption.jpg")
    for reason, data in bad_files().items():
        (root / f"bad_{reason}.png").write_bytes(data)
        (root / f"bad_{reason}.txt").write_text("плохой файл", encoding="utf-8")
    solid((1, 1, 1)).save(root / "sub" / "cp1251.png")
    (root / "sub" / "cp1251.txt").write_bytes("привет".encode("cp1251"))
    return root


def test_folder_dataset_skips_and_reports(folder: Path):
    ds = FolderDataset(folder, size=16, langs=("ru",))
    assert ds.scan_report.skipped["no_caption"] == 1
    assert ds.scan_report.skipped["caption_not_utf8"] == 1
    assert "cp1251.png" in ds.scan_report.examples["caption_not_utf8"]
    assert len(ds) == 3 + 5
    samples = [ds[i] for i in range(len(ds))]
    assert all(s["image"].shape == (3, 16, 16) and 0 <= s["image"].min() <= s["image"].max() <= 1 for s in samples)
    assert samples[ds.records.index(next(r for r in ds.records if r[2] == "good1"))]["caption"] == "цвет 1"
    assert dict(ds.report.skipped) == {"empty": 1, "not_image": 1, "truncated": 1, "corrupt": 1, "too_large": 1}
    # a bad index is replaced by the next good one, never by a crash
    bad_index = next(i for i, (r, _) in enumerate(ds.items) if "bad_" in ds.records[r][2])
    assert ds[bad_index]["key"].startswith(("good", "bad")) and "read 1" not in ds.report.summary()


def test_folder_dataset_language_specific_captions(folder: Path):
    ds = FolderDataset(folder, size=8, langs=("ru", "en"))
    by_key = {(ds.records[r][2], lang): ds.records[r][1][lang] for r, lang in ds.items}
    assert by_key[("good0", "en")] == "colour 0" and by_key[("good0", "ru")] == "цвет 0"
    assert by_key[("good1", "en")] == "цвет 1"  # falls back to the plain .txt


def test_table_dataset_jsonl_csv_and_splits(tmp_path: Path):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(6):
        solid((40 * i, 10, 10), (20, 20)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"file": f"img/{i}.png", "ru": f"картинка {i}", "en": f"picture {i}",
                     "split": ["train", "train", "train", "test_concept", "test_style", "train"][i]})
    with open(tmp_path / "t.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    train = TableDataset(tmp_path / "t.jsonl", size=8, langs=("ru", "en"))
    assert len(train) == 8 and {train[0]["caption"], train[1]["caption"]} == {"картинка 0", "picture 0"}
    assert len(TableDataset(tmp_path / "t.jsonl", split="test", size=8)) == 2
    assert len(TableDataset(tmp_path / "t.jsonl", split="test_style", size=8)) == 1
    assert len(TableDataset(tmp_path / "t.jsonl", split="all", size=8)) == 6
    (tmp_path / "t.csv").write_text("path,caption\n" + "".join(f"img/{i}.png,пример {i}\n" for i in range(3)),
                                    encoding="utf-8")
    csv_ds = TableDataset(tmp_path / "t.csv", size=8, langs=("ru",))
    assert len(csv_ds) == 3 and csv_ds[2]["caption"] == "пример 2"
    batch = collate([csv_ds[0], csv_ds[1]])
    assert batch["image"].shape == (2, 3, 8, 8) and batch["caption"] == ["пример 0", "пример 1"]
    assert isinstance(open_dataset(tmp_path / "t.jsonl", size=8), TableDataset)
    with pytest.raises(ValueError, match="split"):
        TableDataset(tmp_path / "t.jsonl", split="valid")


def test_table_dataset_parquet(tmp_path: Path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    solid((1, 2, 3)).save(tmp_path / "a.png")
    pq.write_table(pa.table({"path": ["a.png"], "caption": ["текст"]}), tmp_path / "t.parquet")
    assert TableDataset(tmp_path / "t.parquet", size=8)[0]["caption"] == "текст"


def test_random_crop_is_reproducible_per_epoch(tmp_path: Path):
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (40, 80, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("x y", encoding="utf-8")
    ds = FolderDataset(tmp_path, size=16, crop="random", seed=5)
    a, b = ds[0]["image"], ds[0]["image"]
    assert torch.equal(a, b)
    crops = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        crops.add(ds[0]["image"].sum().item())
    assert len(crops) > 1


# ---------------------------------------------------------------------------------------------
# WebDataset tar shards
# ---------------------------------------------------------------------------------------------


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture()
def shards(tmp_path: Path) -> Path:
    d = tmp_path / "shards"
    d.mkdir()
    n = 0
    for s in range(3):
        samples = []
        for _ in range(5):
            ext = ["jpg", "png", "webp"][n % 3]
            fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}[ext]
            samples.append((f"{n:06d}", {ext: png_bytes(solid((n * 15, 100, 50), (24, 24)), fmt),
                                         "txt": f"образец {n}".encode(), "json": json.dumps({"n": n}).encode()}))
            n += 1
        write_shard(d / f"part-{s:05d}.tar", samples)
    write_shard(d / "part-00003.tar", [("bad0", {"jpg": b"", "txt": b"x"}), ("bad1", {"png": png_bytes(solid(0)),
                                       "txt": "строка".encode("cp1251")}), ("000015", {"png": png_bytes(solid(9)),
                                                                                       "txt": b"ok"})])
    return d


def keys_of(ds) -> list[str]:
    return [s["key"].split(":")[1] for s in ds]


def test_webdataset_reads_all_and_skips_bad(shards: Path):
    ds = WebDatasetShards(shards, size=16)
    samples = list(ds)
    assert [s["key"].split(":")[1] for s in samples] == [f"{i:06d}" for i in range(16)]
    assert samples[3]["caption"] == "образец 3" and samples[3]["meta"] == {"n": 3}
    assert samples[0]["image"].shape == (3, 16, 16)
    assert ds.report.read == 18 and ds.report.kept == 16
    assert ds.report.skipped["empty"] == 1 and ds.report.skipped["caption_not_utf8"] == 1


def test_webdataset_ranks_partition_and_resume(shards: Path):
    full = keys_of(WebDatasetShards(shards, size=8))
    for world in (2, 3, 4):  # 4 shards: world 2/4 use shard-level, 3 sample-level assignment
        parts = [keys_of(WebDatasetShards(shards, size=8, rank=r, world_size=world)) for r in range(world)]
        assert sorted(k for p in parts for k in p) == sorted(full)
        assert sum(len(p) for p in parts) == len(full)
    # resume: rank r skips exactly what it had produced before position p
    for world, p in ((1, 7), (3, 6), (2, 8)):
        for r in range(world):
            before = keys_of(WebDatasetShards(shards, size=8, rank=r, world_size=world))
            after = keys_of(WebDatasetShards(shards, size=8, rank=r, world_size=world, start_sample=p))
            assert before[len(before) - len(after):] == after and len(after) < len(before)
    assert keys_of(WebDatasetShards(shards, size=8, start_sample=7)) == full[7:]


def test_webdataset_dataloader_workers(shards: Path):
    ds = WebDatasetShards(shards, size=8)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate)
    keys = [k.split(":")[1] for batch in loader for k in batch["key"]]
    assert sorted(keys) == [f"{i:06d}" for i in range(16)]


def test_webdataset_truncated_shard_is_counted(tmp_path: Path, shards: Path):
    data = (shards / "part-00000.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) * 2 // 3])
    ds = WebDatasetShards(tmp_path / "cut.tar", size=8)
    got = list(ds)
    with tarfile.open(shards / "part-00000.tar") as tar:  # the samples whose every file ends before the cut
        ends: dict[str, int] = {}
        for m in tar.getmembers():
            key = m.name.split(".")[0]
            ends[key] = max(ends.get(key, 0), m.offset_data + m.size)
    whole = [k for k, end in ends.items() if end <= len(data) * 2 // 3]
    assert 1 <= len(whole) < 5 and keys_of(got) == whole  # every whole sample kept, in order
    assert dict(ds.report.skipped) == {"corrupt_shard": 1}  # and the cut counted as exactly that
    assert len(expand_shards(str(shards / "part-{00000..00002}.tar"))) == 3
    assert len(expand_shards(str(shards / "*.tar"))) == 4


def test_table_rows_that_are_not_utf8_or_json_are_reported(tmp_path: Path):
    solid((5, 5, 5)).save(tmp_path / "a.png")
    lines = [json.dumps({"file": "a.png", "ru": "хорошо"}, ensure_ascii=False).encode(),
             '{"file": "a.png", "ru": "плохо"}'.encode("cp1251"), b"{not json", b'{"file": "a.png"}']
    (tmp_path / "t.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    ds = TableDataset(tmp_path / "t.jsonl", size=8)
    assert len(ds) == 1 and ds[0]["caption"] == "хорошо"
    assert dict(ds.scan_report.skipped) == {"caption_not_utf8": 1, "bad_row": 1, "no_caption": 1}
    assert ds.scan_report.examples["caption_not_utf8"].endswith("t.jsonl:2")
    (tmp_path / "t.csv").write_bytes("file,ru\na.png,да\n".encode() + "a.png,нет\n".encode("cp1251"))
    csv_ds = TableDataset(tmp_path / "t.csv", size=8)
    assert len(csv_ds) == 1 and csv_ds.scan_report.examples["caption_not_utf8"].endswith("t.csv:3")


def test_webdataset_random_crops_survive_resume(tmp_path: Path):
    d = tmp_path / "s"
    d.mkdir()
    rng = np.random.default_rng(0)
    write_shard(d / "0.tar", [(f"{i:03d}", {"png": png_bytes(Image.fromarray(
        rng.integers(0, 255, (30, 60, 3), dtype=np.uint8))), "txt": b"x"}) for i in range(6)])
    full = list(WebDatasetShards(d, size=16, crop="random", seed=1))
    tail = list(WebDatasetShards(d, size=16, crop="random", seed=1, start_sample=4))
    assert [s["key"] for s in tail] == [s["key"] for s in full[4:]]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(tail, full[4:]))
    other = list(WebDatasetShards(d, size=16, crop="random", seed=2))
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(other, full))
