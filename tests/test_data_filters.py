"""The paper's filters and ``holst prepare filter`` on small generated fixtures."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from holst.data.filters import FilterOptions, NearDuplicateIndex, filter_pairs, hamming, phash
from holst.data.loaders import TableDataset


def picture(seed: int, size=(96, 96)) -> Image.Image:
    """A smooth random picture (blurry blobs), distinct per seed."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)


@pytest.fixture()
def pairs(tmp_path: Path) -> tuple[list[dict], Path]:
    rows = []

    def add(name: str, image: Image.Image, caption: str, fmt: str = "PNG", **kw) -> None:
        image.save(tmp_path / name, format=fmt, **kw)
        rows.append({"file": name, "ru": caption})

    for i in range(6):
        add(f"ok{i}.png", picture(i), f"хорошая подпись номер {i}")
    add("short.png", picture(10), "к")
    add("small.png", picture(11, (40, 40)), "маленькая картинка")
    add("wide.png", picture(12, (400, 100)), "очень широкая картинка")
    add("exact.png", picture(0), "копия первой картинки")  # same pixels as ok0
    add("near.jpg", picture(1).resize((90, 90)), "почти копия второй", "JPEG", quality=85)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    rows.append({"file": "broken.png", "ru": "сломанный файл"})
    rows.append({"file": "ok5.png", "ru": None})
    return rows, tmp_path


def test_each_filter_removes_its_pairs(pairs):
    rows, root = pairs
    kept, report = filter_pairs(rows, root, options=FilterOptions(min_side=64, max_aspect=3.0))
    assert [r["file"] for r in kept] == [f"ok{i}.png" for i in range(6)]
    assert dict(report.removed) == {"caption_too_short": 1, "image_too_small": 1, "extreme_aspect_ratio": 1,
                                    "exact_duplicate": 1, "near_duplicate": 1, "bad_image:not_image": 1,
                                    "no_caption": 1}
    assert report.read == len(rows) and report.kept == 6
    assert "exact.png = ok0.png" in report.examples["exact_duplicate"][0]
    assert "near.jpg ~ ok1.png" in report.examples["near_duplicate"][0]
    # switching filters off keeps those pairs
    loose = FilterOptions(min_caption_chars=0, min_side=0, max_aspect=0, exact_dedup=False, near_dup_distance=None)
    kept2, report2 = filter_pairs(rows, root, options=loose)
    assert len(kept2) == 11 and set(report2.removed) == {"bad_image:not_image", "no_caption"}


def test_clip_filter_uses_the_scorer(pairs):
    rows, root = pairs
    calls = []

    def scorer(images, captions):  # a fake CLIP: likes captions with an even number in them
        calls.append(len(images))
        assert all(isinstance(im, Image.Image) for im in images)
        return torch.tensor([1.0 if any(c in cap for c in "024") else -1.0 for cap in captions])

    opts = FilterOptions(min_clip_score=0.0, clip_batch_size=4)
    kept, report = filter_pairs(rows, root, options=opts, scorer=scorer)
    assert [r["file"] for r in kept] == ["ok0.png", "ok2.png", "ok4.png"]
    assert report.removed["clip_mismatch"] == 3 and sum(calls) == 6 and max(calls) <= 4
    assert all(r["clip_score"] == 1.0 and "_key" not in r for r in kept)
    with pytest.raises(ValueError, match="scorer"):
        filter_pairs(rows, root, options=opts)


def test_phash_is_robust_and_discriminative():
    a = picture(3)
    assert hamming(phash(a), phash(a.resize((64, 64)))) <= 4
    assert min(hamming(phash(picture(s)), phash(picture(s + 100))) for s in range(10)) > 8


def test_near_duplicate_index_matches_brute_force():
    rng = random.Random(0)
    base = [rng.getrandbits(64) for _ in range(60)]
    hashes = base + [h ^ (1 << rng.randrange(64)) ^ (1 << rng.randrange(64)) for h in base[:30]]
    for d in (0, 2, 4, 7):
        index = NearDuplicateIndex(d)
        for h in hashes:
            hit = index.query(h)
            brute = [i for i, g in enumerate(index.hashes) if hamming(g, h) <= d]
            assert (hit is None) == (not brute) and (hit is None or hit in brute)
            index.add(h)


def test_filter_cli_writes_a_loadable_table(pairs, tmp_path):
    from holst.data import filter_cli

    rows, root = pairs
    with open(root / "captions.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    parser = argparse.ArgumentParser()
    filter_cli.add_arguments(parser)
    out = tmp_path / "out" / "filtered.jsonl"
    assert filter_cli.main(parser.parse_args(["--input", str(root), "--out", str(out)])) == 0
    ds = TableDataset(out, size=16, split="all")
    assert len(ds) == 6 and ds[0]["caption"] == "хорошая подпись номер 0"
    report = json.loads(Path(str(out) + ".report.json").read_text(encoding="utf-8"))
    assert report["kept"] == 6 and report["removed"]["near_duplicate"] == 1


def test_filter_cli_on_image_folder_reports_bad_caption(tmp_path):
    from holst.data import filter_cli

    picture(1).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("нормальная подпись", encoding="utf-8")
    picture(2).save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_bytes("подпись".encode("cp1251"))
    parser = argparse.ArgumentParser()
    filter_cli.add_arguments(parser)
    out = tmp_path / "f.jsonl"
    filter_cli.main(parser.parse_args(["--input", str(tmp_path), "--out", str(out)]))
    report = json.loads(Path(str(out) + ".report.json").read_text(encoding="utf-8"))
    assert report["removed"] == {"caption_not_utf8": 1} and report["caption_not_utf8_files"][0].endswith("b.txt")


def test_clip_scorer_from_a_holst_clip_directory(pairs, tmp_path):
    import holst.rerank.clip as clip_mod
    import holst.text as text_mod
    from holst.data.filters import clip_scorer

    rows, root = pairs
    torch.manual_seed(0)
    model = clip_mod.CLIPModel(clip_mod.clip_preset("tiny")).eval()
    model.save_pretrained(tmp_path / "clip")
    tok = text_mod.BPETokenizer.train([r["ru"] or "" for r in rows] * 5, vocab_size=model.config.vocab_size)
    tok.save_pretrained(tmp_path / "clip" / "tokenizer")
    scorer = clip_scorer(tmp_path / "clip")
    images = [picture(i) for i in range(3)]
    scores = scorer(images, ["хорошая подпись", "другая", "третья"])
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    with torch.no_grad():  # same numbers as the model's own score on the same tensors
        from holst.data.images import image_to_tensor, resize_crop

        r = model.config.image_resolution
        batch = torch.stack([image_to_tensor(resize_crop(im, r, "center")) for im in images])
        ids = tok.encode_batch(["хорошая подпись", "другая", "третья"], model.config.context_length, keep_eos=True)
        assert torch.allclose(scores, model.score(batch, ids).float(), atol=1e-5)
    threshold = float(scores.median())
    kept, report = filter_pairs(rows, root, options=FilterOptions(min_clip_score=threshold), scorer=scorer)
    assert report.removed["clip_mismatch"] >= 1 and all(r["clip_score"] >= threshold for r in kept)


def test_filter_cli_on_tar_shards(tmp_path):
    import io
    import tarfile

    from holst.data import WebDatasetShards, filter_cli

    def png(image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()

    samples = [("a", picture(0), "первая картинка"), ("b", picture(0), "копия первой"), ("c", picture(2), "к"),
               ("d", picture(3), "четвёртая картинка"), ("e", None, "сломанная картинка"),
               ("f", picture(5), "шестая картинка")]
    src = tmp_path / "in"
    src.mkdir()
    for s, chunk in enumerate((samples[:3], samples[3:])):
        with tarfile.open(src / f"{s:05d}.tar", "w") as tar:
            for key, image, caption in chunk:
                for ext, data in (("png", png(image) if image else b"junk"), ("txt", caption.encode()),
                                  ("json", b'{"k": 1}')):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    parser = argparse.ArgumentParser()
    filter_cli.add_arguments(parser)
    out = tmp_path / "out"
    args = ["--input", str(src), "--out", str(out), "--samples-per-shard", "2"]
    assert filter_cli.main(parser.parse_args(args)) == 0
    assert sorted(p.name for p in out.glob("*.tar")) == ["part-00000.tar", "part-00001.tar"]
    kept = list(WebDatasetShards(out, size=16))
    assert [s["key"].split(":")[1] for s in kept] == ["a", "d", "f"] and kept[1]["meta"] == {"k": 1}
    report = json.loads((out / "filter.report.json").read_text(encoding="utf-8"))
    assert report["removed"] == {"exact_duplicate": 1, "caption_too_short": 1, "bad_image:not_image": 1}
    assert report["read"] == 6 and report["kept"] == 3
