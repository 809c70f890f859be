"""The recognisability measure (holst.eval.recognise): hand-made features whose hits are known, the
leave-one-out ceiling, the chance formula, the compact reference, and the report / CLI plumbing."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from holst.eval.recognise import (
    RealReference,
    ceiling_hits,
    chance_rate,
    concept_ranks,
    load_reference,
    median_rank_chance,
    nearest_hits,
    recognise,
)


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


# reference on the unit circle: concept 0 at 0 and 10 degrees, concept 1 at 90 and 100, concept 2 at 200
REF = torch.tensor([_unit(0), _unit(10), _unit(90), _unit(100), _unit(200)])
REF_C = torch.tensor([0, 0, 1, 1, 2])


def test_nearest_hits_of_hand_made_features():
    queries = torch.tensor([_unit(5), _unit(95), _unit(95), _unit(150), _unit(150)])
    concepts = torch.tensor([0, 0, 1, 2, 2])
    # k=1: 5 deg -> 0 or 10 (concept 0) hit; 95 -> concept 1: miss for 0, hit for 1;
    # 150 -> nearest is 100 (50 deg) not 200 (50 deg tie broken?) -> use k where it is unambiguous below
    assert nearest_hits(queries[:3], concepts[:3], REF, REF_C, k=1).tolist() == [True, False, True]
    # k=3 from 95 deg: 90, 100, then 10 (85 deg) -> concept 0 is among them
    assert nearest_hits(queries[1:2], concepts[1:2], REF, REF_C, k=3).tolist() == [True]
    # from 160 deg: 200 (40) beats 100 (60): concept 2 hit with k=1, concept 1 needs k=2
    q = torch.tensor([_unit(160), _unit(160), _unit(160)])
    assert nearest_hits(q, torch.tensor([2, 1, 1]), REF, REF_C, k=1).tolist() == [True, False, False]
    assert nearest_hits(q[1:], torch.tensor([1, 0]), REF, REF_C, k=2).tolist() == [True, False]


def test_nearest_hits_uses_cosine_not_distance():
    far = REF.clone()
    far[4] *= 100.0  # a long vector in the same direction: same cosine, much larger Euclidean distance
    q, c = torch.tensor([_unit(190)]), torch.tensor([2])
    assert nearest_hits(q, c, far, REF_C, k=1).tolist() == [True]


def test_leave_one_out_ceiling():
    # each of concepts 0 and 1 has a second image nearby: all four hit; concept 2 has one image: 0
    hits = ceiling_hits(REF, REF_C, [0, 1, 2], k=1)
    assert hits.tolist() == [True, True, True, True, False]
    assert ceiling_hits(REF, REF_C, [2], k=1).tolist() == [False]
    # without leaving itself out an image is always its own nearest neighbour
    assert nearest_hits(REF, REF_C, REF, REF_C, k=1).all()
    assert not nearest_hits(REF[4:], REF_C[4:], REF, REF_C, k=1, exclude=torch.tensor([4])).any()
    # exclude=-1 means none
    assert nearest_hits(REF[4:], REF_C[4:], REF, REF_C, k=1, exclude=torch.tensor([-1])).all()


def test_chance_is_k_times_concept_share():
    ref_c = torch.tensor([0, 0] + [1] * 8)  # R = 10: concept 0 has 2 images, concept 1 has 8
    assert chance_rate(ref_c, torch.tensor([0, 0, 1]), k=1) == pytest.approx((0.2 + 0.2 + 0.8) / 3)
    assert chance_rate(ref_c, torch.tensor([0]), k=5) == pytest.approx(1.0)  # 5 * 2 / 10
    assert chance_rate(ref_c, torch.tensor([1]), k=5) == pytest.approx(1.0)  # capped: 5 * 8 / 10 > 1
    assert chance_rate(ref_c, torch.tensor([0, 1]), k=2) == pytest.approx((0.4 + 1.0) / 2)


def test_random_features_hit_at_about_chance():
    g = torch.Generator().manual_seed(0)
    R, n_concepts = 2000, 200
    ref = torch.randn(R, 32, generator=g)
    ref_c = torch.arange(R) % n_concepts
    q_c = torch.randint(0, n_concepts, (4000,), generator=g)
    hits = nearest_hits(torch.randn(4000, 32, generator=g), q_c, ref, ref_c, k=5)
    chance = chance_rate(ref_c, q_c, k=5)  # 5 * 10 / 2000 = 0.025
    assert chance == pytest.approx(0.025)
    assert abs(hits.float().mean().item() - chance) < 0.01


def _reference(dim: int = 16) -> RealReference:
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(3, dim, generator=g)  # rank-3 data in 16 dims
    coeffs = torch.stack([torch.eye(3)[i] + 0.05 * j * torch.eye(3)[(i + 1) % 3] for i in range(3) for j in range(3)])
    feats = coeffs @ centres  # (9, dim)
    concepts = [c for c in ("a", "b", "c") for _ in range(3)]
    info = {"a": {"ru": "а", "en": "a", "splits": ["train"], "n": 3},
            "b": {"ru": "б", "en": "b", "splits": ["train", "test_style"], "n": 3},
            "c": {"ru": "в", "en": "c", "splits": ["test_concept"], "n": 3}}
    return RealReference(feats, concepts, info, source="hand-made")


def test_reference_groups_compact_round_trip_and_extra_images(tmp_path):
    ref = _reference()
    assert ref.concepts_of("train") == ["a", "b"] and ref.concepts_of("heldout") == ["c"]
    assert ref.concepts_of("train", min_images=4) == []
    small = ref.compact(3)  # rank 3: the projection keeps every inner product
    assert small.features.shape == (9, 3) and small.basis.shape == (16, 3)
    unit = torch.nn.functional.normalize
    full_sims = unit(ref.features, dim=1) @ unit(ref.features, dim=1).T
    small_sims = unit(small.features, dim=1) @ unit(small.features, dim=1).T
    assert torch.allclose(full_sims, small_sims, atol=1e-4)
    new = torch.randn(2, 16)
    assert torch.allclose(small.project(new) @ small.project(new).T, new @ small.basis @ small.basis.T @ new.T)
    small.save(tmp_path / "ref.safetensors")
    back = RealReference.load(tmp_path / "ref.safetensors")
    assert back.concepts == small.concepts and back.info == small.info and back.source == "hand-made"
    assert torch.allclose(back.features, small.features, atol=1e-2) and torch.equal(back.basis, small.basis)
    more = back.with_images(torch.randn(4, 16), "mine", caption="моя штука")
    assert more.features.shape == (13, 3) and more.info["mine"]["n"] == 4 and more.concepts[-1] == "mine"
    assert "mine" not in back.index  # the original is unchanged
    with pytest.raises(ValueError, match="compact already"):
        back.compact(2)
    with pytest.raises(FileNotFoundError):
        RealReference.load(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------------------
# With images: a dataset folder in the built layout, a stub pipeline, the CLI
# ------------------------------------------------------------------------------------------------

SHAPES = {"квадрат": "square", "круг": "circle", "крест": "cross"}


def _draw(shape: str, shift: int, size: int = 32) -> Image.Image:
    from PIL import ImageDraw

    im = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(im)
    box = (4 + shift, 4, 26 + shift, 26)
    if shape == "квадрат":
        d.rectangle(box, fill=(200, 30, 30))
    elif shape == "круг":
        d.ellipse(box, fill=(30, 60, 210))
    else:
        d.line((box[0], box[1], box[2], box[3]), fill=(20, 150, 40), width=5)
        d.line((box[0], box[3], box[2], box[1]), fill=(20, 150, 40), width=5)
    return im


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    """3 concepts x 3 images (the cross is held out)."""
    root = tmp_path_factory.mktemp("shapes")
    (root / "images").mkdir()
    rows = []
    for ru, en in SHAPES.items():
        for j in range(3):
            name = f"images/{en}{j}.png"
            _draw(ru, j).save(root / name)
            rows.append({"file": name, "ru": ru, "en": en, "concept": en,
                         "split": "test_concept" if en == "cross" else "train"})
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    return root


class CountingNet(torch.nn.Module):
    """Colour histogram-ish features (distinguish the three drawings); counts its calls."""

    fingerprint = "counting"

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        pooled = torch.nn.functional.adaptive_avg_pool2d(1 - x, 4)  # (B, 3, 4, 4): where the ink is
        return pooled.flatten(1)


class StubPipe:
    """Generates, for a caption, copies of the real drawings of ``answer[caption]`` (or a blank)."""

    image_size = 32
    source = "stub"

    def __init__(self, answer: dict[str, str]) -> None:
        self.answer = answer

    def __call__(self, caption, num_images, seed, rerank, upscale, **kw):
        shape = self.answer.get(caption)
        images = [_draw(shape, j % 3) if shape else Image.new("RGB", (32, 32), "white") for j in range(num_images)]
        return SimpleNamespace(images=images, seeds=[seed + j for j in range(num_images)], settings={"stub": True})


def test_load_reference_is_cached_and_recognise_counts_hits(shapes_data, tmp_path):
    net = CountingNet()
    ref = load_reference(shapes_data, net, size=32, cache_dir=tmp_path)
    assert ref.concepts_of("train") == ["circle", "square"] and ref.info["cross"]["ru"] == "крест"
    calls = net.calls
    again = load_reference(shapes_data, net, size=32, cache_dir=tmp_path)
    assert net.calls == calls and torch.equal(again.features, ref.features)  # from the cache
    # a generator that draws the right concept: every image hits; chance 5 x 3 / 9 capped -> use k=1
    right = StubPipe({"квадрат": "квадрат", "круг": "круг", "крест": "крест"})
    res = recognise(right, ref, ["square", "circle", "cross"], net, num_images=2, k=1)
    assert res["hit_rate"] == 1.0 and res["n_images"] == 6 and res["chance"] == pytest.approx(1 / 3)
    assert res["ceiling"] == 1.0 and res["n_real_ceiling"] == 9
    assert [p["hits"] for p in res["per_caption"]] == [2, 2, 2]
    # one that draws the wrong concept for two captions: only the third hits
    wrong = StubPipe({"квадрат": "круг", "круг": "крест", "крест": "крест"})
    res = recognise(wrong, ref, ["square", "circle", "cross"], net, num_images=2, k=1)
    assert res["hit_rate"] == pytest.approx(1 / 3) and [p["hits"] for p in res["per_caption"]] == [0, 0, 2]


def test_eval_recognise_report_and_cli(shapes_data, tmp_path, capsys):
    from holst.cli import main
    from holst.eval.recognise import eval_recognise

    net = CountingNet()
    ref = load_reference(shapes_data, net, size=32, cache_dir=tmp_path)
    rep = eval_recognise(StubPipe({"квадрат": "квадрат", "круг": "круг", "крест": "круг"}), ref, tmp_path / "r",
                         net, num_images=2, k=1)
    assert rep["train"]["hit_rate"] == 1.0 and rep["heldout"]["hit_rate"] == 0.0
    for name in ("recognise.json", "recognise.md", "recognise_train_grid.png", "recognise_heldout_grid.png"):
        assert (tmp_path / "r" / name).is_file()
    # the CLI on an untrained tiny pipeline with the real feature net (small resolution), then from a compact file
    out, compact = tmp_path / "cli", tmp_path / "ref.safetensors"
    rc = main(["eval", "recognise", "--model", "random:tiny", "--data", str(shapes_data), "--out", str(out),
               "-n", "1", "--fd-resolution", "32", "--cache-dir", str(tmp_path / "c"), "--save-reference",
               str(compact), "--reference-dim", "4"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 <= summary["train_hit_rate"] <= 1 and summary["train_chance"] == pytest.approx(1.0)  # 5 x 3 / 9 capped
    assert RealReference.load(compact).features.shape == (9, 4)
    rc = main(["eval", "recognise", "--model", "random:tiny", "--reference", str(compact), "--out", str(out),
               "-n", "1", "--fd-resolution", "32"])
    assert rc == 0
    capsys.readouterr()
    rc = main(["eval", "recognise", "--model", "random:tiny", "--out", str(out)])
    assert rc == 2 and "--data" in capsys.readouterr().err


def test_concept_ranks_and_their_chance():
    # from 95 deg: 90 (concept 1) is nearest, then 100 (1), 10 (0), 200 (2) at 105, 0 (0) at 95 -> order 90,100,10,0,200
    q = torch.tensor([_unit(95)] * 3)
    assert concept_ranks(q, torch.tensor([1, 0, 2]), REF, REF_C).tolist() == [1, 3, 5]
    # leave-one-out: the image at 0 deg finds its concept's other image (10 deg) first; 200 has none left
    ranks = concept_ranks(REF, REF_C, REF, REF_C, exclude=torch.arange(5))
    assert ranks.tolist() == [1, 1, 1, 1, 6]
    # a hit is a rank <= k
    for k in (1, 2, 3):
        assert torch.equal(concept_ranks(q, torch.tensor([1, 0, 2]), REF, REF_C) <= k,
                           nearest_hits(q, torch.tensor([1, 0, 2]), REF, REF_C, k=k))
    # random order: the median first position of n of R rows is about R (1 - 2^(-1/n))
    g = torch.Generator().manual_seed(0)
    R, n_concepts = 2000, 500  # 4 rows per concept
    ref_c = torch.arange(R) % n_concepts
    q_c = torch.randint(0, n_concepts, (3000,), generator=g)
    ranks = concept_ranks(torch.randn(3000, 32, generator=g), q_c, torch.randn(R, 32, generator=g), ref_c)
    chance = median_rank_chance(ref_c, q_c)
    assert chance == pytest.approx(2000 * (1 - 0.5 ** 0.25))  # 318
    assert abs(float(ranks.double().median()) - chance) < 0.1 * chance
