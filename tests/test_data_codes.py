"""VQGAN code shards: writing, reading, ``prepare_codes`` (with resume) and the VQGAN parity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from holst.data.codes import CodeShardDataset, read_code_shard, write_code_shard
from holst.data.loaders import TableDataset
from holst.data.prepare import prepare_codes


class PoolEncoder:
    """Stand-in VQGAN: 4x4 average pool of the red channel, quantised to 16 levels -> (B, H/4, W/4)."""

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        self.calls += images.shape[0]
        return (torch.nn.functional.avg_pool2d(images[:, :1], 4)[:, 0] * 15).round().long()


@pytest.fixture()
def dataset_dir(tmp_path: Path) -> Path:
    (tmp_path / "images").mkdir()
    with open(tmp_path / "captions.jsonl", "w", encoding="utf-8") as f:
        for i in range(10):
            Image.new("RGB", (16, 16), (i * 25, 0, 0)).save(tmp_path / "images" / f"{i}.png")
            f.write(json.dumps({"file": f"images/{i}.png", "ru": f"красный {i}", "en": f"red {i}",
                                "split": "train"}, ensure_ascii=False) + "\n")
        (tmp_path / "images" / "bad.png").write_bytes(b"")
        f.write(json.dumps({"file": "images/bad.png", "ru": "плохой", "en": "bad"}) + "\n")
    return tmp_path


@pytest.mark.parametrize("suffix", [".safetensors", ".npz"])
def test_shard_round_trip(tmp_path: Path, suffix: str):
    codes = torch.randint(0, 8192, (5, 3, 4))
    caps = {"ru": [f"текст {i}" for i in range(5)], "en": [f"text {i}" for i in range(5)]}
    path = write_code_shard(tmp_path / f"s{suffix}", codes, caps, keys=list("abcde"), n_embed=8192)
    back, meta = read_code_shard(path)
    assert back.dtype == torch.int16 and torch.equal(back.long(), codes)
    assert meta["captions"] == caps["ru"] and meta["captions_by_lang"]["en"] == caps["en"] and meta["keys"][4] == "e"
    big = write_code_shard(tmp_path / f"b{suffix}", codes + 40000, {"ru": caps["ru"]}, n_embed=50000)
    assert read_code_shard(big)[0].dtype == torch.int32
    ds = CodeShardDataset([path], langs=("ru", "en"))
    assert len(ds) == 10 and ds[1]["caption"] == "text 0" and torch.equal(ds[0]["codes"], codes[0].reshape(-1))
    assert ds[0]["codes"].dtype == torch.long and ds.grid == (3, 4)
    assert CodeShardDataset([path])[2]["caption"] == "текст 2"
    with pytest.raises(ValueError, match="captions"):
        write_code_shard(tmp_path / "x.safetensors", codes, {"ru": ["one"]})


def test_prepare_codes_and_resume(dataset_dir: Path, tmp_path: Path):
    ds = TableDataset(dataset_dir, split="all", size=16, langs=("ru", "en"))
    enc = PoolEncoder()
    out = tmp_path / "codes"
    index = prepare_codes(ds, enc, out, langs=["ru", "en"], batch_size=3, shard_size=4)
    assert index["images"] == 10 and [e["count"] for e in index["shards"]] == [4, 4, 2]
    assert index["report"]["skipped"] == {"empty": 1} and index["grid"] == [4, 4]
    assert enc.calls == 10  # each image encoded once, for both languages
    codes = CodeShardDataset(out, langs=("ru", "en"))
    assert len(codes) == 20
    for i in range(10):
        sample = codes[2 * i]
        assert sample["caption"] == f"красный {i}" and codes[2 * i + 1]["caption"] == f"red {i}"
        assert torch.all(sample["codes"] == round(i * 25 / 255 * 15))
    # interrupted run: the last shard is missing -> only its images are encoded again
    idx = json.loads((out / "index.json").read_text())
    (out / idx["shards"][-1]["file"]).unlink()
    enc2 = PoolEncoder()
    again = prepare_codes(ds, enc2, out, langs=["ru", "en"], batch_size=3, shard_size=4)
    assert enc2.calls == 2 and again["images"] == 10
    assert [codes2["caption"] for codes2 in CodeShardDataset(out, langs=("ru", "en"))] == \
        [codes[i]["caption"] for i in range(20)]


def test_prepare_codes_with_a_real_vqgan(dataset_dir: Path, tmp_path: Path):
    import holst.vqgan as vqgan
    torch.manual_seed(0)
    vq = vqgan.VQGAN(vqgan.get_vqgan_preset("tiny")).eval()
    ds = TableDataset(dataset_dir, split="all", size=32, langs=("ru",))
    prepare_codes(ds, vq, tmp_path / "c", langs=["ru"], batch_size=4, shard_size=100, fmt="npz",
                  n_embed=vq.config.n_embed)
    shard = CodeShardDataset(tmp_path / "c")
    images = torch.stack([ds[i]["image"] for i in range(3)])
    with torch.no_grad():
        direct = vq.encode(images)
    assert shard.grid == tuple(direct.shape[1:])
    for i in range(3):
        assert torch.equal(shard[i]["codes"], direct[i].reshape(-1))
