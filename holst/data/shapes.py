"""``holst data shapes``: a synthetic set for checking that text conditioning works, and its checker.

One or two flat objects on a plain background. Every attribute is in the caption, in Russian (with
case and gender agreement) and English, and can be read back from pixels by :func:`check`
(colour segmentation), so a text-to-image model can be scored per attribute.

    ShapeSpec(objects=(Obj("circle", "red", "small"), Obj("square", "blue", "big")), background="white",
              relation="left_of")
    caption(spec, "ru") == "маленький красный круг слева от большого синего квадрата на белом фоне"

All three nouns (круг, квадрат, треугольник) are masculine, so adjectives take the masculine endings:
nominative for the subject, genitive after "слева от / справа от", instrumental after "над / под",
prepositional for the background ("на белом фоне").
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 200, 20),
    "purple": (150, 50, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0), "grey": (128, 128, 128)}
SIZES = ("small", "big")
POSITIONS = ("left", "right", "top", "bottom", "center")
RELATIONS = ("left_of", "right_of", "above", "below")

# Russian word forms: nominative, genitive, instrumental (masculine singular), prepositional for backgrounds.
RU_NOUN = {"circle": ("круг", "круга", "кругом"), "square": ("квадрат", "квадрата", "квадратом"),
           "triangle": ("треугольник", "треугольника", "треугольником")}
RU_COLOUR = {"red": ("красный", "красного", "красным"), "green": ("зелёный", "зелёного", "зелёным"),
             "blue": ("синий", "синего", "синим"), "yellow": ("жёлтый", "жёлтого", "жёлтым"),
             "purple": ("фиолетовый", "фиолетового", "фиолетовым")}
RU_SIZE = {"small": ("маленький", "маленького", "маленьким"), "big": ("большой", "большого", "большим")}
RU_BACKGROUND = {"white": "на белом фоне", "black": "на чёрном фоне", "grey": "на сером фоне"}
RU_POSITION = {"left": "слева", "right": "справа", "top": "сверху", "bottom": "снизу", "center": "в центре"}
RU_RELATION = {"left_of": ("слева от", 1), "right_of": ("справа от", 1), "above": ("над", 2), "below": ("под", 2)}
EN_POSITION = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
               "center": "in the centre"}
EN_RELATION = {"left_of": "to the left of", "right_of": "to the right of", "above": "above", "below": "below"}
EN_COLOUR = {"red": "red", "green": "green", "blue": "blue", "yellow": "yellow", "purple": "purple"}
EN_BACKGROUND = {"white": "on a white background", "black": "on a black background", "grey": "on a grey background"}

# Geometry as fractions of the image side.
OBJECT_SIDE = {"small": 0.22, "big": 0.40}
ANCHORS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5)}
PAIR_OFFSET = 0.23  # distance of each of two objects from the centre along the relation axis
JITTER = 0.04


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object: shape in SHAPES, colour in COLOURS, size in SIZES."""

    shape: str
    colour: str
    size: str

    def __post_init__(self) -> None:
        for name, value, allowed in (("shape", self.shape, SHAPES), ("colour", self.colour, tuple(COLOURS)),
                                     ("size", self.size, SIZES)):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not allowed; choose one of {list(allowed)}")


@dataclasses.dataclass(frozen=True)
class ShapeSpec:
    """A scene: one object at ``position`` or two objects with ``relation`` (objects[0] relation objects[1])."""

    objects: tuple[Obj, ...]
    background: str = "white"
    position: str | None = None
    relation: str | None = None

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"background={self.background!r} is not allowed; choose one of {list(BACKGROUNDS)}")
        if len(self.objects) == 1:
            if self.position not in POSITIONS or self.relation is not None:
                raise ValueError(f"one object needs position in {list(POSITIONS)} and no relation")
        elif len(self.objects) == 2:
            if self.relation not in RELATIONS or self.position is not None:
                raise ValueError(f"two objects need relation in {list(RELATIONS)} and no position")
            if self.objects[0].colour == self.objects[1].colour:
                raise ValueError("two objects must have different colours (the checker segments by colour)")
        else:
            raise ValueError(f"a spec has 1 or 2 objects, got {len(self.objects)}")

    def to_dict(self) -> dict:
        """The spec as a JSON-ready dict (:meth:`from_dict` reads it back)."""
        return {"objects": [dataclasses.asdict(o) for o in self.objects], "background": self.background,
                "position": self.position, "relation": self.relation}

    @classmethod
    def from_dict(cls, d: dict) -> ShapeSpec:
        """A spec from :meth:`to_dict`'s output."""
        return cls(tuple(Obj(**o) for o in d["objects"]), d.get("background", "white"), d.get("position"),
                   d.get("relation"))

    @property
    def id(self) -> str:
        """A stable text id of the spec (objects, position or relation, background)."""
        objs = "+".join(f"{o.size}-{o.colour}-{o.shape}" for o in self.objects)
        return f"{objs}@{self.position or self.relation}@{self.background}"


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------


def _ru_phrase(o: Obj, case: int) -> str:
    return f"{RU_SIZE[o.size][case]} {RU_COLOUR[o.colour][case]} {RU_NOUN[o.shape][case]}"


def caption(spec: ShapeSpec, lang: str = "ru") -> str:
    """The caption of a spec in ``ru`` or ``en`` (e.g. "большой красный круг слева на белом фоне")."""
    if lang == "ru":
        first = _ru_phrase(spec.objects[0], 0)
        if spec.position is not None:
            return f"{first} {RU_POSITION[spec.position]} {RU_BACKGROUND[spec.background]}"
        words, case = RU_RELATION[spec.relation]
        return f"{first} {words} {_ru_phrase(spec.objects[1], case)} {RU_BACKGROUND[spec.background]}"
    if lang == "en":
        def phrase(o: Obj) -> str:
            return f"a {o.size} {EN_COLOUR[o.colour]} {o.shape}"
        first = phrase(spec.objects[0])
        if spec.position is not None:
            return f"{first} {EN_POSITION[spec.position]} {EN_BACKGROUND[spec.background]}"
        return f"{first} {EN_RELATION[spec.relation]} {phrase(spec.objects[1])} {EN_BACKGROUND[spec.background]}"
    raise ValueError(f"lang={lang!r} is not allowed; choose one of ['ru', 'en']")


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _centres(spec: ShapeSpec) -> list[tuple[float, float]]:
    if spec.position is not None:
        return [ANCHORS[spec.position]]
    dx, dy = {"left_of": (-1, 0), "right_of": (1, 0), "above": (0, -1), "below": (0, 1)}[spec.relation]
    return [(0.5 + dx * PAIR_OFFSET, 0.5 + dy * PAIR_OFFSET), (0.5 - dx * PAIR_OFFSET, 0.5 - dy * PAIR_OFFSET)]


def render(spec: ShapeSpec, size: int = 64, generator: torch.Generator | None = None,
           supersample: int = 4) -> Image.Image:
    """Draw a spec as an RGB image of size x size.

    Args:
        spec: the scene.
        size: image side in pixels.
        generator: if given, each object is shifted by up to ±4% of the side (varied training images);
            None draws the canonical layout.
        supersample: draw at this factor and downscale, for anti-aliased edges.

    Returns:
        RGB PIL image.
    """
    big = size * supersample
    image = Image.new("RGB", (big, big), BACKGROUNDS[spec.background])
    draw = ImageDraw.Draw(image)
    centres = _centres(spec)
    if generator is not None:
        shifts = (torch.rand(len(centres), 2, generator=generator) * 2 - 1) * JITTER
        centres = [(cx + float(sx), cy + float(sy)) for (cx, cy), (sx, sy) in zip(centres, shifts.tolist())]
    for obj, (cx, cy) in zip(spec.objects, centres):
        half = OBJECT_SIDE[obj.size] * big / 2
        x, y = cx * big, cy * big
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((x - half, y - half, x + half, y + half), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((x - half, y - half, x + half, y + half), fill=fill)
        else:  # isosceles triangle, apex up, filling the object's square
            draw.polygon([(x, y - half), (x - half, y + half), (x + half, y + half)], fill=fill)
    return image.resize((size, size), Image.Resampling.BOX) if supersample > 1 else image


# ---------------------------------------------------------------------------------------------
# Checker: colour segmentation
# ---------------------------------------------------------------------------------------------

_PALETTE_NAMES = list(COLOURS) + [f"bg:{b}" for b in BACKGROUNDS]
_PALETTE = np.array(list(COLOURS.values()) + list(BACKGROUNDS.values()), dtype=np.float32)
MAX_COLOUR_DISTANCE = 80.0  # RGB distance beyond which a pixel belongs to no palette colour
MIN_AREA = 0.008  # an object must cover at least this fraction of the image
SQUARE_FILL, TRIANGLE_FILL = 0.9, 0.64  # fill of the bounding box: square ~1, circle ~0.785, triangle ~0.5
BIG_SIDE = (OBJECT_SIDE["small"] + OBJECT_SIDE["big"]) / 2


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 4-connected component of a boolean mask (iterative flood fill; small images only)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, current = 0, 0, 0
    ys, xs = np.nonzero(mask)
    for y0, x0 in zip(ys.tolist(), xs.tolist()):
        if labels[y0, x0]:
            continue
        current += 1
        labels[y0, x0] = current
        stack, count = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            count += 1
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = current
                    stack.append((ny, nx))
        if count > best_size:
            best, best_size = current, count
    return labels == best if best else np.zeros_like(mask)


def _classify_pixels(arr: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) palette index, -1 where no palette colour is near."""
    dist = np.linalg.norm(arr[:, :, None, :].astype(np.float32) - _PALETTE[None, None], axis=-1)  # (H, W, P)
    idx = dist.argmin(-1)
    idx[dist.min(-1) > MAX_COLOUR_DISTANCE] = -1
    return idx


def measure(image: Image.Image | np.ndarray | torch.Tensor) -> dict:
    """Read the scene from pixels: the background name and, per palette colour present, its object.

    Each object: its shape, size and centre (fractions of the side). Used by :func:`check`.
    """
    if isinstance(image, torch.Tensor):  # (3, H, W) float in [0, 1]
        image = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    arr = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.uint8)
    h, w = arr.shape[:2]
    idx = _classify_pixels(arr)
    border = np.concatenate([idx[0], idx[-1], idx[:, 0], idx[:, -1]])
    border = border[border >= len(COLOURS)]
    background = _PALETTE_NAMES[np.bincount(border).argmax()][3:] if border.size else None
    edge = np.concatenate([arr[0], arr[-1], arr[:, 0], arr[:, -1]]).astype(np.float32)
    bg_rgb = np.asarray(BACKGROUNDS[background], np.float32) if background else np.median(edge, axis=0)
    objects = {}
    for c, name in enumerate(COLOURS):
        if (idx == c).sum() < MIN_AREA * h * w:
            continue
        core = _largest_component(idx == c)
        if core.sum() < MIN_AREA * h * w:
            continue
        # soft coverage: anti-aliased edge pixels count by how far they are from the background towards
        # the object colour, so the measures stay accurate for objects only a few pixels wide
        region = core.copy()
        region[1:] |= core[:-1]
        region[:-1] |= core[1:]
        region[:, 1:] |= core[:, :-1]
        region[:, :-1] |= core[:, 1:]
        direction = np.asarray(COLOURS[name], np.float32) - bg_rgb
        alpha = ((arr.astype(np.float32) - bg_rgb) @ direction) / max(float(direction @ direction), 1.0)
        alpha = np.clip(alpha, 0.0, 1.0) * region
        area = float(alpha.sum())
        bw, bh = float(alpha.max(axis=0).sum()), float(alpha.max(axis=1).sum())  # soft width / height
        fill = area / max(bw * bh, 1e-6)
        shape = "square" if fill >= SQUARE_FILL else "circle" if fill >= TRIANGLE_FILL else "triangle"
        ys, xs = np.mgrid[0:h, 0:w]
        centre = (float((alpha * (xs + 0.5)).sum() / area) / w, float((alpha * (ys + 0.5)).sum() / area) / h)
        objects[name] = {"shape": shape, "size": "big" if max(bw / w, bh / h) >= BIG_SIDE else "small",
                         "centre": centre, "fill": fill, "area": area / (h * w)}
    return {"background": background, "objects": objects}


def _position_of(centre: tuple[float, float]) -> str:
    return min(ANCHORS, key=lambda k: math.dist(ANCHORS[k], centre))


def _relation_of(a: tuple[float, float], b: tuple[float, float]) -> str:
    dx, dy = a[0] - b[0], a[1] - b[1]
    if abs(dx) >= abs(dy):
        return "left_of" if dx < 0 else "right_of"
    return "above" if dy < 0 else "below"


def check(image: Image.Image | np.ndarray | torch.Tensor, spec: ShapeSpec) -> dict[str, bool]:
    """Per-attribute correctness of an image against a spec.

    Args:
        image: RGB PIL image, (H, W, 3) uint8 array, or (3, H, W) float tensor in [0, 1]; any size from
            32 px up (at 24 px small objects are ~5 px wide and shapes become ambiguous).
        spec: the scene the image should show.

    Returns:
        {"background", "colour", "shape", "size", "position" (one object) or "relation" (two), "all"}
        -> bool. With two objects, colour/shape/size are True only if both objects are right.
        An object whose colour is missing makes its shape, size and position/relation False.
    """
    seen = measure(image)
    found = [seen["objects"].get(o.colour) for o in spec.objects]
    result = {
        "background": seen["background"] == spec.background,
        "colour": all(f is not None for f in found),
        "shape": all(f is not None and f["shape"] == o.shape for o, f in zip(spec.objects, found)),
        "size": all(f is not None and f["size"] == o.size for o, f in zip(spec.objects, found)),
    }
    if spec.position is not None:
        result["position"] = found[0] is not None and _position_of(found[0]["centre"]) == spec.position
    else:
        result["relation"] = (found[0] is not None and found[1] is not None
                              and _relation_of(found[0]["centre"], found[1]["centre"]) == spec.relation)
    result["all"] = all(result.values())
    return result


def evaluate(images: Sequence, specs: Sequence[ShapeSpec]) -> dict[str, float]:
    """Mean per-attribute accuracy of images against their specs (what ``holst eval shapes`` reports).

    Returns:
        {attribute: accuracy in [0, 1]} over the images whose spec has that attribute
        (``position`` over one-object specs, ``relation`` over two-object specs), plus ``n``.
    """
    if len(images) != len(specs):
        raise ValueError(f"{len(images)} images for {len(specs)} specs")
    totals: dict[str, list[int]] = {}
    for image, spec in zip(images, specs):
        for attr, ok in check(image, spec).items():
            totals.setdefault(attr, [0, 0])
            totals[attr][0] += int(ok)
            totals[attr][1] += 1
    return {attr: hits / n for attr, (hits, n) in totals.items()} | {"n": float(len(specs))}


# ---------------------------------------------------------------------------------------------
# Spec sets and held-out combinations
# ---------------------------------------------------------------------------------------------


def all_specs(n_objects: Iterable[int] = (1, 2)) -> list[ShapeSpec]:
    """Every valid spec (1 object: 450; 2 objects of different colours: 8,640), in a fixed order."""
    objs = [Obj(s, c, z) for s, c, z in itertools.product(SHAPES, COLOURS, SIZES)]
    specs = []
    for n in n_objects:
        if n == 1:
            specs += [ShapeSpec((o,), bg, position=p) for o in objs for p in POSITIONS for bg in BACKGROUNDS]
        elif n == 2:
            specs += [ShapeSpec((a, b), bg, relation=r) for a in objs for b in objs if a.colour != b.colour
                      for r in RELATIONS for bg in BACKGROUNDS]
        else:
            raise ValueError(f"n_objects may contain 1 and 2, got {n}")
    return specs


OBJECT_KEYS = ("shape", "colour", "size")
SCENE_KEYS = ("background", "position", "relation")
# Default compositional hold-outs: pairs of attributes that never appear together in training.
DEFAULT_HOLDOUT = ({"colour": "red", "shape": "square"}, {"colour": "yellow", "shape": "triangle"},
                   {"colour": "purple", "background": "grey"})


def matches(spec: ShapeSpec, rule: dict[str, str]) -> bool:
    """A rule holds when every scene-level key matches and one object matches all object-level keys."""
    unknown = set(rule) - set(OBJECT_KEYS) - set(SCENE_KEYS)
    if unknown:
        raise ValueError(f"unknown hold-out key(s) {sorted(unknown)}; use {list(OBJECT_KEYS + SCENE_KEYS)}")
    if any(getattr(spec, k) != v for k, v in rule.items() if k in SCENE_KEYS):
        return False
    obj_rule = {k: v for k, v in rule.items() if k in OBJECT_KEYS}
    return any(all(getattr(o, k) == v for k, v in obj_rule.items()) for o in spec.objects)


def split_specs(specs: Sequence[ShapeSpec], holdout: Sequence[dict[str, str]] = DEFAULT_HOLDOUT
                ) -> tuple[list[ShapeSpec], list[ShapeSpec]]:
    """(train specs, held-out specs): a spec is held out if any hold-out rule matches it."""
    train, test = [], []
    for s in specs:
        (test if any(matches(s, r) for r in holdout) else train).append(s)
    return train, test


def parse_holdout(text: str) -> list[dict[str, str]]:
    """'colour=red,shape=square;background=grey' -> [{'colour': 'red', 'shape': 'square'}, {...}]."""
    rules = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        rule = dict(kv.split("=", 1) for kv in part.split(",") if "=" in kv)
        if not rule:
            raise ValueError(f"hold-out rule {part!r} must look like key=value[,key=value]")
        rules.append({k.strip(): v.strip() for k, v in rule.items()})
    return rules


def heldout_specs(holdout: Sequence[dict[str, str]] = DEFAULT_HOLDOUT, n_objects: Iterable[int] = (1, 2)
                  ) -> list[ShapeSpec]:
    """The held-out specs (for ``holst eval shapes``)."""
    return split_specs(all_specs(n_objects), holdout)[1]


# ---------------------------------------------------------------------------------------------
# Dataset folder + CLI
# ---------------------------------------------------------------------------------------------


def build_shapes(out: str | Path, *, size: int = 64, count: int = 10000, n_objects: Sequence[int] = (1, 2),
                 holdout: Sequence[dict[str, str]] = DEFAULT_HOLDOUT, test_count: int | None = None,
                 seed: int = 0) -> dict:
    """Write a shapes dataset folder (same layout as the emoji set: images/, captions.jsonl, meta.json).

    Train images are ``count`` specs drawn with replacement from the train specs, jittered; the
    held-out images render each held-out spec once (canonical layout), or ``test_count`` of them.
    """
    out = Path(out)
    train, test = split_specs(all_specs(n_objects), holdout)
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(0, len(train), (count,), generator=gen).tolist() if train else []
    n_heldout = len(test)
    if test_count is not None and test_count < len(test):
        test = [test[i] for i in torch.randperm(len(test), generator=gen)[:test_count].tolist()]
    records = []
    for split, specs, jitter in (("train", [train[i] for i in picks], True), ("test_concept", test, False)):
        for n, spec in enumerate(specs):
            rel = f"images/{split}/{n:06d}.png"
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            render(spec, size, generator=gen if jitter else None).save(out / rel, format="PNG", compress_level=6)
            records.append({"file": rel, "ru": caption(spec, "ru"), "en": caption(spec, "en"), "split": split,
                            "concept": spec.id, "style": "shapes", "spec": spec.to_dict()})
    with open(out / "captions.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    meta = {"dataset": "shapes", "size": size, "count": count, "n_objects": list(n_objects),
            "holdout": list(holdout), "seed": seed, "train_specs": len(train), "heldout_specs": n_heldout,
            "counts": {"train": len(picks), "test_concept": len(test)}}
    (out / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return meta


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``holst data shapes``."""
    parser.add_argument("--out", required=True, help="output folder, e.g. data/shapes")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--count", type=int, default=10000, help="number of training images (default 10000)")
    parser.add_argument("--objects", default="1,2", help="object counts to include: 1, 2 or 1,2")
    parser.add_argument("--holdout", default=None,
                        help="held-out combinations, e.g. 'colour=red,shape=square;background=grey' "
                             "(default: red square; yellow triangle; purple on grey). '' holds out nothing")
    parser.add_argument("--test-count", type=int, default=None, help="render only N held-out specs")
    parser.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    """Run ``holst data shapes``: render the synthetic shapes dataset; prints its metadata as JSON."""
    holdout = DEFAULT_HOLDOUT if args.holdout is None else parse_holdout(args.holdout)
    meta = build_shapes(args.out, size=args.size, count=args.count,
                        n_objects=[int(x) for x in args.objects.split(",") if x], holdout=holdout,
                        test_count=args.test_count, seed=args.seed)
    print(json.dumps(meta, ensure_ascii=False))
    return 0
