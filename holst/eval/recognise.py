"""Recognisability (``holst eval recognise``): do the generated images show the caption's concept?

A measure that needs no CLIP of ours (issue 13). For each of N captions of a concept the pipeline
generates K images (its sampling defaults, fixed seeds, no reranking cut). Every generated image and
every real image of the dataset is embedded with the ImageNet EfficientNet-Lite0 features of FD
(:class:`holst.eval.features.EffLite0Features`); a generated image is a **hit** when one of its
``k`` = 5 nearest real neighbours (cosine similarity) is an image of the caption's concept.

Two reference figures come with it:

* **chance**: ``k x images of the concept / all real images``, averaged over the captions: the hit
  rate of an image whose neighbours were drawn at random (the first-order term of the exact
  ``1 - C(R - n, k) / C(R, k)``);
* **ceiling**: the same figure for the real images of the same concepts, leave-one-out (an image is
  not its own neighbour): what an ideal generator of dataset-like images reaches with these features.

Concepts are the dataset's ``concept`` column (``holst data emoji``: the base code point, shared by
the styles Noto / Twemoji / OpenMoji / Fluent; ``holst data tuxpaint``: the stamp). Only concepts with
at least two real images are asked for (a concept of one image has a ceiling of 0 by definition).
*Training* concepts have no ``test_concept`` row; *held-out* concepts are the ``test_concept`` ones.

A :class:`RealReference` can be stored compactly (``save``): the features projected on their top
``dim`` singular directions (uncentred, so inner products and hence cosines are kept as far as
``dim`` allows) in float16, plus the concepts. ``models/default/eval/recognise_reference.safetensors``
is such a file: the model's test measures recognisability without the data set.

Axis legend: Q query images, R real reference images, D feature size (1280, or ``dim`` compact).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from holst.errors import InputError
from holst.utils.runtime import get_logger

log = get_logger("holst.eval")

NEIGHBOURS = 5  # k of "one of its 5 nearest real neighbours" (issue 13)
GROUPS = ("train", "heldout")


# ---------------------------------------------------------------------------------------------
# The measure on features (pure functions)
# ---------------------------------------------------------------------------------------------


def nearest_hits(queries: torch.Tensor, query_concepts: torch.Tensor, reference: torch.Tensor,
                 reference_concepts: torch.Tensor, *, k: int = NEIGHBOURS, exclude: torch.Tensor | None = None,
                 chunk: int = 256) -> torch.Tensor:
    """Whether each query's ``k`` nearest reference rows (cosine) include one of its own concept.

    Args:
        queries: (Q, D) features.
        query_concepts: (Q,) long concept id of each query.
        reference: (R, D) features.
        reference_concepts: (R,) long concept id of each reference row.
        k: neighbours looked at (at most R, minus one with ``exclude``).
        exclude: (Q,) long reference row each query may not use (its own row: leave-one-out), -1 = none.
        chunk: queries compared at once (memory).
    Returns:
        (Q,) bool.
    """
    if queries.shape[0] != query_concepts.shape[0] or reference.shape[0] != reference_concepts.shape[0]:
        raise InputError("one concept id per feature row is needed")
    k = min(k, reference.shape[0] - (1 if exclude is not None else 0))
    if k < 1:
        raise InputError("the reference set is too small for a nearest-neighbour hit")
    ref = F.normalize(reference.float(), dim=1)
    out = []
    for start in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[start:start + chunk].float(), dim=1)
        sims = q @ ref.T  # (q, R) cosine similarities
        if exclude is not None:
            ex = exclude[start:start + chunk]
            rows = torch.nonzero(ex >= 0).flatten()
            sims[rows, ex[rows]] = float("-inf")
        idx = sims.topk(k, dim=1).indices  # (q, k)
        out.append((reference_concepts[idx] == query_concepts[start:start + chunk, None]).any(1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def concept_ranks(queries: torch.Tensor, query_concepts: torch.Tensor, reference: torch.Tensor,
                  reference_concepts: torch.Tensor, *, exclude: torch.Tensor | None = None,
                  chunk: int = 256) -> torch.Tensor:
    """Where the query's concept first appears among its nearest reference rows (1 = the nearest).

    A hit is a rank <= k; the rank is the finer figure for a model whose hits are still rare.

    Args:
        queries: (Q, D) features.
        query_concepts: (Q,) long concept id of each query.
        reference: (R, D) features.
        reference_concepts: (R,) long concept id of each reference row.
        exclude: (Q,) long reference row each query may not use (leave-one-out), -1 = none.
        chunk: queries compared at once (memory).
    Returns:
        (Q,) long ranks in 1..R (R + 1 when the concept has no reference row left).
    """
    ref = F.normalize(reference.float(), dim=1)
    out = []
    for start in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[start:start + chunk].float(), dim=1)
        sims = q @ ref.T  # (q, R)
        if exclude is not None:
            ex = exclude[start:start + chunk]
            rows = torch.nonzero(ex >= 0).flatten()
            sims[rows, ex[rows]] = float("-inf")
        own = reference_concepts[None, :] == query_concepts[start:start + chunk, None]  # (q, R)
        best_own = sims.masked_fill(~own | torch.isinf(sims), float("-inf")).max(1).values  # (q,)
        ranks = 1 + (sims > best_own[:, None]).sum(1)
        out.append(torch.where(torch.isinf(best_own), torch.full_like(ranks, reference.shape[0] + 1), ranks))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def median_rank_chance(reference_concepts: torch.Tensor, query_concepts: torch.Tensor) -> float:
    """Median over the queries of the median first position of n own rows among R shuffled ones.

    The first of n random positions in 1..R is <= r with probability 1 - C(R - r, n) / C(R, n),
    about 1 - (1 - r / R)^n, so its median is about R (1 - 2^(-1/n)).
    """
    R = reference_concepts.shape[0]
    counts = torch.bincount(reference_concepts, minlength=int(query_concepts.max()) + 1 if len(query_concepts) else 1)
    n = counts[query_concepts].double().clamp(min=1)
    return float((R * (1 - 0.5 ** (1 / n))).clamp(min=1).median()) if len(n) else float("nan")


def chance_rate(reference_concepts: torch.Tensor, query_concepts: torch.Tensor, *, k: int = NEIGHBOURS) -> float:
    """Mean over the queries of ``k x (reference rows of the query's concept) / R`` (capped at 1).

    Args:
        reference_concepts: (R,) long concept id of each reference row.
        query_concepts: (Q,) long concept id of each query.
        k: neighbours looked at.
    """
    R = reference_concepts.shape[0]
    counts = torch.bincount(reference_concepts, minlength=int(query_concepts.max()) + 1 if len(query_concepts) else 1)
    per = (k * counts[query_concepts].double() / R).clamp(max=1.0)
    return float(per.mean()) if len(per) else float("nan")


def ceiling_hits(reference: torch.Tensor, reference_concepts: torch.Tensor, concepts: Sequence[int], *,
                 k: int = NEIGHBOURS) -> torch.Tensor:
    """Leave-one-out hits of the real images of ``concepts``: each is a query against all the others.

    Returns:
        (M,) bool, one per reference row whose concept is in ``concepts`` (in row order).
    """
    rows = _rows_of(reference_concepts, concepts)
    return nearest_hits(reference[rows], reference_concepts[rows], reference, reference_concepts, k=k, exclude=rows)


def _rows_of(reference_concepts: torch.Tensor, concepts: Sequence[int]) -> torch.Tensor:
    wanted = torch.isin(reference_concepts, torch.as_tensor(list(concepts), dtype=torch.long))
    return torch.nonzero(wanted).flatten()


# ---------------------------------------------------------------------------------------------
# Real reference images
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RealReference:
    """Features of all real images of a dataset and their concepts.

    Attributes:
        features: (R, D) float32 (D = 1280, or the compact dim). concepts: R concept names.
        info: concept -> {"ru", "en" (its most frequent captions), "splits" (sorted list), "n" (images)}.
        basis: (1280, D) projection applied to new EfficientNet-Lite0 features (None = identity).
        source: where it came from. fingerprint: feature net and image size it was made with.
    """

    features: torch.Tensor
    concepts: list[str]
    info: dict[str, dict]
    basis: torch.Tensor | None = None
    source: str = ""
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if self.features.shape[0] != len(self.concepts):
            raise InputError(f"{self.features.shape[0]} feature rows but {len(self.concepts)} concepts")
        names = sorted(set(self.concepts))
        self.index = {c: i for i, c in enumerate(names)}
        self.concept_ids = torch.tensor([self.index[c] for c in self.concepts], dtype=torch.long)  # (R,)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(Q, 1280) EfficientNet-Lite0 features -> (Q, D) in this reference's space."""
        return features.float() if self.basis is None else features.float() @ self.basis.float()

    def with_images(self, features: torch.Tensor, concept: str, *, caption: str = "", split: str = "extra"
                    ) -> RealReference:
        """A copy with more real images of one (new or existing) concept, e.g. a fine-tune's pictures.

        Args:
            features: (M, 1280) EfficientNet-Lite0 features of the new images.
            concept: their concept, new or already in the reference.
            caption: the caption recorded for a new concept.
            split: the split name recorded for them.
        """
        info = {k: dict(v) for k, v in self.info.items()}
        entry = info.setdefault(concept, {"ru": caption, "en": caption, "splits": [], "n": 0})
        entry["n"] = int(entry["n"]) + features.shape[0]
        entry["splits"] = sorted(set(entry["splits"]) | {split})
        return RealReference(torch.cat([self.features, self.project(features)]), self.concepts
                             + [concept] * features.shape[0], info, self.basis, self.source, self.fingerprint)

    def concepts_of(self, group: str, *, min_images: int = 2) -> list[str]:
        """Sorted concepts of a group: 'train' (no test_concept row) or 'heldout' (test_concept)."""
        if group not in GROUPS:
            raise InputError(f"group={group!r}: choose one of {list(GROUPS)}")
        held = [c for c, v in self.info.items() if "test_concept" in v["splits"]]
        pool = held if group == "heldout" else [c for c, v in self.info.items()
                                                if "train" in v["splits"] and "test_concept" not in v["splits"]]
        return sorted(c for c in pool if self.info[c]["n"] >= min_images)

    def save(self, path: str | Path) -> None:
        """Write a safetensors file (features float16, basis float32; concepts and info as metadata)."""
        from safetensors.torch import save_file

        tensors = {"features": self.features.half().contiguous()}
        if self.basis is not None:
            tensors["basis"] = self.basis.float().contiguous()
        meta = {"concepts": json.dumps(self.concepts, ensure_ascii=False),
                "info": json.dumps(self.info, ensure_ascii=False), "source": self.source,
                "fingerprint": self.fingerprint}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> RealReference:
        """Read a file written by :meth:`save` (safetensors only: loading runs no code)."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recognition reference {path} does not exist")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if "features" not in tensors or "concepts" not in meta:
            raise InputError(f"{path} is not a recognition reference (holst eval recognise --save-reference)")
        return cls(tensors["features"].float(), json.loads(meta["concepts"]), json.loads(meta.get("info", "{}")),
                   tensors.get("basis"), meta.get("source", str(path)), meta.get("fingerprint", ""))

    def compact(self, dim: int) -> RealReference:
        """The features projected on their top ``dim`` uncentred singular directions (keeps cosines best)."""
        if self.basis is not None:
            raise InputError("this reference is compact already")
        dim = min(dim, self.features.shape[1], self.features.shape[0])
        _, _, vh = torch.linalg.svd(self.features.double(), full_matrices=False)
        basis = vh[:dim].T.float().contiguous()  # (1280, dim)
        return RealReference(self.features @ basis, list(self.concepts), self.info, basis, self.source,
                             self.fingerprint)


def _most_common(values: list[str]) -> str:
    values = [v for v in values if v]
    return Counter(values).most_common(1)[0][0] if values else ""


def load_reference(data: str | Path, net: Callable[[torch.Tensor], torch.Tensor], *, size: int,
                   batch_size: int = 32, cache_dir: str | Path | None = None) -> RealReference:
    """Embed every real image of a dataset folder (all splits), cached on disk by file list.

    Args:
        data: a folder written by ``holst data ...`` (``captions.jsonl`` with ``concept`` and ``split``).
        net: (B, 3, H, W) [0, 1] -> (B, 1280): the feature net (EfficientNet-Lite0).
        size: images are centre-cropped and resized to size x size first (the model's image size).
        batch_size: images per forward pass.
        cache_dir: default ``$HOLST_CACHE/eval-stats``.
    Raises:
        ValueError when the table has no ``concept`` column.
    """
    from holst.data.images import decode_image, image_to_tensor, resize_crop
    from holst.data.loaders import read_table
    from holst.eval.features import default_cache_dir, extract_features, file_list_key

    table = Path(data) / "captions.jsonl" if Path(data).is_dir() else Path(data)
    if not table.is_file():
        raise FileNotFoundError(f"{data}: no captions.jsonl (build the data with 'holst data emoji|tuxpaint')")
    rows = [r for r in read_table(table) if r.get("file") and r.get("concept")]
    if not rows:
        raise InputError(f"{table}: no rows with 'file' and 'concept' columns (written by 'holst data emoji|tuxpaint')")
    files = [table.parent / r["file"] for r in rows]
    concepts = [str(r["concept"]) for r in rows]
    by_concept: dict[str, list[dict]] = {}
    for r, c in zip(rows, concepts):
        by_concept.setdefault(c, []).append(r)
    info = {c: {"ru": _most_common([r.get("ru", "") for r in rs]), "en": _most_common([r.get("en", "") for r in rs]),
                "splits": sorted({str(r.get("split", "train")) for r in rs}), "n": len(rs)}
            for c, rs in by_concept.items()}
    fingerprint = f"{getattr(net, 'fingerprint', type(net).__name__)}|recognise|{size}"
    key = file_list_key(files, fingerprint)
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = directory / f"recognise-{key[:32]}.safetensors"
    if path.is_file():
        try:
            from safetensors.torch import load_file

            feats = load_file(str(path))["features"]
            if feats.shape[0] == len(files):
                return RealReference(feats.float(), concepts, info, None, str(data), fingerprint)
        except (OSError, ValueError, KeyError) as e:
            log.warning("ignoring unreadable feature cache %s: %s", path, e)
    log.info("embedding %d real images of %s (cached afterwards in %s)", len(files), data, directory)

    def images():
        for f in files:
            yield image_to_tensor(resize_crop(decode_image(f), size, "center"))

    feats = extract_features(net, images(), batch_size=batch_size)  # (R, 1280)
    try:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file({"features": feats.contiguous()}, str(path))
    except OSError as e:
        log.warning("could not write feature cache %s: %s", path, e)
    return RealReference(feats, concepts, info, None, str(data), fingerprint)


# ---------------------------------------------------------------------------------------------
# Generated images
# ---------------------------------------------------------------------------------------------


def generate_images(pipe: Any, captions: Sequence[str], *, num_images: int, seed: int = 0,
                    sampling: dict | None = None) -> tuple[torch.Tensor, list[Any]]:
    """``num_images`` images per caption with the pipeline's defaults (no reranking cut, no upscaling).

    Image j of caption i has seed ``seed * 1_000_003 + i * num_images + j``.

    Returns:
        (images (len(captions) * num_images, 3, H, W) in [0, 1], caption-major; the PipelineOutputs).
    """
    import warnings

    from holst.utils.images import pil_to_tensor

    sampling = {k: v for k, v in (sampling or {}).items() if v is not None}
    outs = []
    for i, caption in enumerate(captions):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # long captions are cut: the pipeline warns once per call
            outs.append(pipe(caption, num_images=num_images, seed=seed * 1_000_003 + i * num_images, rerank=0,
                             upscale=1, **sampling))
    images = torch.stack([pil_to_tensor(im) for o in outs for im in o.images])
    return images, outs


def recognise(pipe: Any, reference: RealReference, concepts: Sequence[str], net: Any, *, num_images: int = 4,
              seed: int = 0, lang: str = "ru", k: int = NEIGHBOURS, captions: Sequence[str] | None = None,
              sampling: dict | None = None, batch_size: int = 32) -> dict[str, Any]:
    """Hit rate of generated images for ``concepts``, with chance and the leave-one-out ceiling.

    Args:
        pipe: a Text2ImagePipeline.
        reference: the real images.
        concepts: concept names in ``reference``.
        net: EfficientNet-Lite0 features (:class:`holst.eval.features.EffLite0Features`).
        num_images: K images per caption.
        seed: base seed of the images (:func:`generate_images`).
        lang: caption language ('ru' or 'en').
        k: neighbours looked at.
        captions: the caption of each concept (default: its most frequent ``lang`` caption).
        sampling: sampling overrides passed to the pipeline (top_k, top_p, ...).
        batch_size: images per feature pass.
    Returns:
        {"hit_rate", "chance", "ceiling", "n_captions", "n_images", "per_caption": [...], "images": tensor}.
    """
    from holst.eval.features import extract_features

    unknown = [c for c in concepts if c not in reference.index]
    if unknown:
        raise InputError(f"concepts not in the reference: {unknown[:5]}")
    captions = list(captions) if captions is not None else [reference.info[c][lang] for c in concepts]
    images, outs = generate_images(pipe, captions, num_images=num_images, seed=seed, sampling=sampling)
    feats = reference.project(extract_features(net, images, batch_size=batch_size))  # (Q, D)
    ids = torch.tensor([reference.index[c] for c in concepts]).repeat_interleave(num_images)  # (Q,)
    hits = nearest_hits(feats, ids, reference.features, reference.concept_ids, k=k)
    ceiling = ceiling_hits(reference.features, reference.concept_ids, sorted({reference.index[c] for c in concepts}),
                           k=k)
    ranks = concept_ranks(feats, ids, reference.features, reference.concept_ids)
    rows = _rows_of(reference.concept_ids, sorted({reference.index[c] for c in concepts}))
    real_ranks = concept_ranks(reference.features[rows], reference.concept_ids[rows], reference.features,
                               reference.concept_ids, exclude=rows)
    per = hits.view(len(concepts), num_images)
    return {"hit_rate": float(hits.float().mean()), "chance": chance_rate(reference.concept_ids, ids, k=k),
            "ceiling": float(ceiling.float().mean()), "n_captions": len(concepts), "n_images": int(hits.numel()),
            "n_real_ceiling": int(ceiling.numel()), "k": k,
            "median_rank": float(ranks.double().median()), "median_rank_real": float(real_ranks.double().median()),
            "median_rank_chance": median_rank_chance(reference.concept_ids, ids),
            "n_reference": len(reference.concepts),
            "per_caption": [{"concept": c, "caption": cap, "hits": int(per[i].sum()), "seeds": outs[i].seeds}
                            for i, (c, cap) in enumerate(zip(concepts, captions))],
            "sampling": outs[0].settings if outs else {}, "images": images}


def pick_concepts(reference: RealReference, group: str, n: int, seed: int = 0) -> list[str]:
    """A fixed seeded choice of ``n`` concepts of a group (all when n is 0 or larger than the group)."""
    pool = reference.concepts_of(group)
    if n <= 0 or n >= len(pool):
        return pool
    g = torch.Generator().manual_seed(seed)
    return [pool[i] for i in torch.randperm(len(pool), generator=g)[:n].tolist()]


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def eval_recognise(pipe: Any, reference: RealReference, out: str | Path, net: Any, *, num_captions: int = 16,
                   num_images: int = 4, seed: int = 0, lang: str = "ru", k: int = NEIGHBOURS,
                   sampling: dict | None = None, grid_rows: int = 8, batch_size: int = 32) -> dict:
    """``recognise.json/.md/_grid.png``: hit rate, chance and ceiling for training and held-out concepts.

    Args:
        pipe: a Text2ImagePipeline.
        reference: the real images.
        out: folder the report files go to.
        net: EfficientNet-Lite0 features (:class:`holst.eval.features.EffLite0Features`).
        num_captions: concepts per group (0 = all).
        num_images: K images per caption.
        seed: base seed of the images.
        lang: caption language ('ru' or 'en').
        k: neighbours looked at.
        sampling: sampling overrides passed to the pipeline (top_k, top_p, ...).
        grid_rows: captions shown in each grid PNG.
        batch_size: images per feature pass.
    Returns:
        The report dict.
    """
    from holst.eval import plots
    from holst.eval.reports import write_report
    from holst.utils.images import tensor_to_pil

    t0 = time.perf_counter()
    report: dict[str, Any] = {"report": "recognise", "model": getattr(pipe, "source", "memory"),
                              "reference": reference.source, "n_reference": len(reference.concepts),
                              "reference_dim": int(reference.features.shape[1]), "fingerprint": reference.fingerprint,
                              "k": k, "lang": lang, "images_per_caption": num_images, "seed": seed}
    md = [f"# Recognisability ({report['model']})", "",
          f"{num_images} generated images per caption; a hit = one of the {k} nearest of the "
          f"{report['n_reference']} real images (EfficientNet-Lite0 ImageNet features, cosine, dim "
          f"{report['reference_dim']}) shows the caption's concept. Chance = {k} x images of the concept / all "
          "images; ceiling = the same figure for the real images of those concepts, leave-one-out. Rank: where "
          "the caption's concept first appears among an image's nearest real images (median; chance = shuffled "
          "order; real = leave-one-out).", "",
          "| concepts | captions | images | hit rate | chance | ceiling | median rank | chance | real |",
          "|---|---|---|---|---|---|---|---|---|"]
    pngs = {}
    for group in GROUPS:
        concepts = pick_concepts(reference, group, num_captions, seed)
        if not concepts:
            report[group] = None
            continue
        res = recognise(pipe, reference, concepts, net, num_images=num_images, seed=seed, lang=lang, k=k,
                        sampling=sampling, batch_size=batch_size)
        images = res.pop("images")
        report[group] = res
        report.setdefault("sampling", res["sampling"])
        md.append(f"| {group} | {res['n_captions']} | {res['n_images']} | {res['hit_rate']:.3f} | "
                  f"{res['chance']:.4f} | {res['ceiling']:.3f} | {res['median_rank']:.0f} | "
                  f"{res['median_rank_chance']:.0f} | {res['median_rank_real']:.0f} |")
        rows_n = min(grid_rows, len(concepts))
        labels_ok = plots.has_cyrillic_font() or lang == "en"
        rows = [tensor_to_pil(images[i * num_images:(i + 1) * num_images]) for i in range(rows_n)]
        labels = [f"{p['caption']} ({p['hits']}/{num_images})" if labels_ok else f"{i + 1}. ({p['hits']}/{num_images})"
                  for i, p in enumerate(res["per_caption"][:rows_n])]
        pngs[f"{group}_grid"] = plots.labeled_grid(rows, labels, cell=max(64, min(128, pipe.image_size)))
    report["seconds"] = time.perf_counter() - t0
    md += ["", "Per caption (hits of the images): " + "; ".join(
        f"{p['caption']} {p['hits']}/{num_images}" for g in GROUPS if report.get(g) for p in report[g]["per_caption"])]
    return write_report(out, "recognise", report, md, pngs)
