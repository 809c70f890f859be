"""Shapes: Russian grammar of captions, rendering, the colour-segmentation checker, held-out specs."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
import torch

from holst.data.loaders import TableDataset
from holst.data.shapes import (
    POSITIONS,
    SIZES,
    Obj,
    ShapeSpec,
    all_specs,
    build_shapes,
    caption,
    check,
    evaluate,
    heldout_specs,
    matches,
    parse_holdout,
    render,
    split_specs,
)


def test_caption_examples_and_agreement():
    two = ShapeSpec((Obj("circle", "red", "small"), Obj("square", "blue", "big")), "white", relation="left_of")
    assert caption(two) == "маленький красный круг слева от большого синего квадрата на белом фоне"
    assert caption(two, "en") == "a small red circle to the left of a big blue square on a white background"
    above = ShapeSpec((Obj("triangle", "yellow", "big"), Obj("circle", "green", "small")), "black", relation="above")
    assert caption(above) == "большой жёлтый треугольник над маленьким зелёным кругом на чёрном фоне"
    below = ShapeSpec((Obj("square", "purple", "small"), Obj("triangle", "blue", "big")), "grey", relation="below")
    assert caption(below) == "маленький фиолетовый квадрат под большим синим треугольником на сером фоне"
    right = ShapeSpec((Obj("circle", "green", "big"), Obj("triangle", "purple", "small")), "white",
                      relation="right_of")
    assert caption(right) == "большой зелёный круг справа от маленького фиолетового треугольника на белом фоне"
    one = ShapeSpec((Obj("triangle", "purple", "big"),), "grey", position="center")
    assert caption(one) == "большой фиолетовый треугольник в центре на сером фоне"
    assert caption(one, "en") == "a big purple triangle in the centre on a grey background"
    words = {w for s in all_specs() for w in caption(s).split()}
    # every genitive/instrumental form that the grammar can produce, and nothing ungrammatical
    for form in ("синего", "синим", "зелёного", "зелёным", "жёлтого", "жёлтым", "треугольника", "треугольником",
                 "кругом", "квадратом", "маленького", "маленьким", "большого", "большим", "сверху", "снизу"):
        assert form in words
    assert not words & {"синый", "синяя", "синее", "большая", "большое", "маленькая", "красная", "красное", "большый"}


def test_spec_validation_and_round_trip():
    with pytest.raises(ValueError, match="colour"):
        Obj("circle", "orange", "big")
    with pytest.raises(ValueError, match="different colours"):
        ShapeSpec((Obj("circle", "red", "big"), Obj("square", "red", "small")), relation="above")
    with pytest.raises(ValueError, match="position"):
        ShapeSpec((Obj("circle", "red", "big"),), relation="above")
    spec = all_specs()[1234]
    assert ShapeSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert len(all_specs((1,))) == 450 and len(all_specs((2,))) == 8640


def test_checker_scores_ground_truth_perfectly():
    rng = random.Random(0)
    singles = all_specs((1,))
    pairs = rng.sample(all_specs((2,)), 150)
    gen = torch.Generator().manual_seed(0)
    for spec in singles:  # every single-object spec, canonical layout
        assert check(render(spec, 64), spec)["all"], spec.id
    for spec in rng.sample(singles, 100) + pairs:  # jittered training-style images too
        for image in (render(spec, 64), render(spec, 64, generator=gen)):
            result = check(image, spec)
            assert result["all"], (spec.id, result)
    # other sizes and the tensor input path
    spec = pairs[0]
    assert check(render(spec, 128), spec)["all"] and check(render(spec, 32), spec)["all"]
    from holst.utils.images import pil_to_tensor

    assert check(pil_to_tensor(render(spec, 48)), spec)["all"]
    scores = evaluate([render(s, 32) for s in singles[:20] + pairs[:20]], singles[:20] + pairs[:20])
    assert scores["n"] == 40 and all(scores[k] == 1.0 for k in ("all", "colour", "shape", "position", "relation"))


def test_checker_random_images_score_near_chance():
    """Images of a different random spec with the same colour(s): each attribute right about at chance."""
    rng = random.Random(1)
    gen = torch.Generator().manual_seed(1)
    singles = all_specs((1,))
    hits, n = Counter(), 400
    for _ in range(n):
        target = rng.choice(singles)
        o = target.objects[0]
        other = ShapeSpec((Obj(rng.choice(["circle", "square", "triangle"]), o.colour, rng.choice(SIZES)),),
                          rng.choice(["white", "black", "grey"]), position=rng.choice(POSITIONS))
        hits.update(check(render(other, 64, generator=gen), target))
    chance = {"background": 1 / 3, "shape": 1 / 3, "size": 1 / 2, "position": 1 / 5}
    for attr, p in chance.items():
        assert abs(hits[attr] / n - p) < 0.08, (attr, hits[attr] / n, p)
    noise_hits = Counter()
    for _ in range(30):
        noise_hits.update(check(torch.rand(3, 64, 64, generator=gen), rng.choice(singles)))
    assert noise_hits["colour"] == 0 and noise_hits["all"] == 0  # noise has no solid object


def test_heldout_rules_and_dataset(tmp_path):
    rules = parse_holdout("colour=red,shape=square;background=grey,position=center")
    assert rules == [{"colour": "red", "shape": "square"}, {"background": "grey", "position": "center"}]
    train, test = split_specs(all_specs(), rules)
    assert len(train) + len(test) == 9090 and test
    assert not any(matches(s, rules[0]) for s in train)
    assert all(any(matches(s, r) for r in rules) for s in test)
    assert any(o.colour == "red" for s in train for o in s.objects)  # red survives in other shapes
    with pytest.raises(ValueError, match="unknown hold-out key"):
        matches(train[0], {"hue": "red"})
    assert len(heldout_specs(rules, (1,))) == len([s for s in test if len(s.objects) == 1])
    meta = build_shapes(tmp_path / "shapes", size=32, count=20, holdout=rules, test_count=10, seed=3)
    assert meta["counts"] == {"train": 20, "test_concept": 10}
    ds = TableDataset(tmp_path / "shapes", split="train", size=32, langs=("ru", "en"))
    assert len(ds) == 40 and ds[0]["image"].shape == (3, 32, 32)
    rows = [json.loads(line) for line in open(tmp_path / "shapes" / "captions.jsonl", encoding="utf-8")]
    for row in rows:
        spec = ShapeSpec.from_dict(row["spec"])
        assert row["ru"] == caption(spec) and (row["split"] == "train") == (not any(matches(spec, r) for r in rules))
