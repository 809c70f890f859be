"""``holst train clip``: train a CLIP for ranking on image-caption pairs with our BPE tokenizer.

Contrastive loss (CLIP's symmetric cross-entropy; pairs with identical captions count as positives
of each other, since the emoji set has one caption per concept in several art styles), AdamW with
warm-up + cosine (holst.train.optim), the shared Engine (single / DDP / precision). Image->text and
text->image R@1 / R@5 are measured on the dataset's held-out splits (and on as many training pairs,
to show the fit) every ``eval_every`` steps and at the end. Data comes through holst.data (bad
images skipped and counted); an empty caption is kept as the text ''. Checkpoints, resume and
stopping are those of every trainer (:class:`holst.train.loop.TrainRun`); ``max_minutes`` ends a
run early as a completed one (``final/`` is written).

Output (``out_dir``)::

    checkpoint.pt            training state for --resume
    metrics.jsonl            loss / lr / retrieval lines
    final/                   the CLIP a pipeline loads as its clip/ directory:
      config.json  model.safetensors  tokenizer/bpe.model  retrieval.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from holst.config import ConfigError
from holst.data.config import DataConfig
from holst.data.images import DataReport
from holst.rerank.clip import CLIPModel, resize_square, retrieval_recall
from holst.rerank.config import clip_preset
from holst.rerank.ranker import CLIP_TOKENIZER_DIR, clip_text_ids
from holst.train.args import add_train_arguments, run_train_command
from holst.train.config import ClipTrainConfig
from holst.train.data import open_samples
from holst.train.engine import Engine
from holst.train.loop import StateOf, TrainResult, TrainRun, refuse_unsupported, seeded
from holst.train.optim import build_optimizer, build_scheduler
from holst.utils.runtime import get_logger

log = get_logger("holst.train.clip")

TOKENIZER_DIR = CLIP_TOKENIZER_DIR
UNSUPPORTED = {"ema_decay": 0.0, "sample_every": 0}


# ---------------------------------------------------------------------------------------- data
class PairSet:
    """Image-caption pairs held in memory: uint8 images (N, 3, R, R) and a caption list per image.

    Built from any dataset whose items are dicts with ``image`` ((3, H, W) float in [0, 1]) and
    ``caption`` (str) or ``captions`` (list of str), e.g. the holst.data loaders.
    """

    def __init__(self, images: torch.Tensor, captions: list[list[str]]) -> None:
        if images.shape[0] != len(captions):
            raise ValueError(f"{images.shape[0]} images but {len(captions)} caption lists")
        empty = [i for i, c in enumerate(captions) if not c]
        if empty:
            raise ValueError(f"{len(empty)} item(s) have no caption (first: index {empty[0]})")
        self.images, self.captions = images, captions

    def __len__(self) -> int:
        return len(self.captions)

    @classmethod
    def from_items(cls, items: Any, resolution: int, lang: str = "both", limit: int | None = None) -> PairSet:
        """Read items of a dataset (iterable or sized+indexable) into memory at ``resolution`` px."""
        images, captions = [], []
        seen: dict[Any, int] = {}  # key -> position: one dataset item per (image, language) is one image here
        if hasattr(items, "__len__") and hasattr(items, "__getitem__"):
            items = map(items.__getitem__, range(len(items)))  # by index: ConcatDataset has no __iter__
        for n, item in enumerate(items):
            if limit is not None and len(images) >= limit:
                break
            key = item.get("key")
            if key is not None and key in seen:
                caps = captions[seen[key]]
                caps.extend(c for c in item_captions(item, lang) if c not in caps)
                continue
            if key is not None:
                seen[key] = len(images)
            image = item["image"]
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"item {n}: 'image' must be (3, H, W) float in [0, 1], got {tuple(image.shape)}")
            image = resize_square(image.unsqueeze(0).float(), resolution)[0]
            images.append(to_uint8(image))
            captions.append(item_captions(item, lang))
        if not images:
            raise ValueError("the dataset is empty")
        return cls(torch.stack(images), captions)

    def batch(self, index: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, list[str]]:
        """(B,) indices -> images (B, 3, R, R) float [0, 1] and one caption each (random if several)."""
        images = self.images[index].float() / 255
        texts = [rng.choice(self.captions[i]) for i in index.tolist()]
        return images, texts


def to_uint8(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] float -> uint8 (round half up); 4x less memory for the in-memory pair set."""
    return image.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8)


def item_captions(item: dict, lang: str) -> list[str]:
    """The captions of a dataset item for ``lang`` ('ru', 'en' or 'both').

    Items may carry ``caption`` (str), ``captions`` (list) and/or per-language ``ru`` / ``en``.
    """
    langs = ("ru", "en") if lang == "both" else (lang,)
    out = [item[k] for k in langs if isinstance(item.get(k), str) and item[k].strip()]
    if not out:
        caps = item.get("captions")
        if isinstance(caps, (list, tuple)):
            out = [c for c in caps if isinstance(c, str) and c.strip()]
    if not out and isinstance(item.get("caption"), str):
        out = [item["caption"].strip()]  # an empty caption stays a (text-less) caption
    return out


def split_data(data: str, split: str, lang: str, size: int) -> DataConfig:
    """The DataConfig of one split of a holst.data dataset (a built folder, a table or an image folder)."""
    if not Path(data).exists():
        raise ConfigError(f"data={data!r}: no such dataset directory or table (build one with `holst data emoji`)")
    return DataConfig(sources=(data,), split=split, langs=("ru", "en") if lang == "both" else (lang,),
                      image_size=size)


# ---------------------------------------------------------------------------------------- tokenizer
def load_or_train_tokenizer(cfg: ClipTrainConfig, train: PairSet):
    """The tokenizer named by ``cfg.tokenizer`` (a directory or a bpe.model file), or one trained on the captions."""
    from holst.text import BPETokenizer

    if cfg.tokenizer:
        path = Path(cfg.tokenizer)
        if path.is_dir():
            if (path / TOKENIZER_DIR).is_dir():  # a CLIP / pipeline directory
                path = path / TOKENIZER_DIR
            return BPETokenizer.from_pretrained(path)
        return BPETokenizer.load(path)
    texts = [c.lower().strip() for caps in train.captions for c in caps]
    log.info("training a BPE tokenizer (vocab %d) on %d captions", cfg.tokenizer_vocab_size, len(texts))
    return BPETokenizer.train(texts, vocab_size=cfg.tokenizer_vocab_size)


def encode(tokenizer, texts: list[str], context_length: int, *, dropout: float = 0.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Texts -> (B, l) ids with l <= context_length: trailing all-pad columns are cut.

    Exact, since the text tower is causal and reads the eos position. The encoding is the ranker's
    (:func:`holst.rerank.ranker.clip_text_ids`), so training and ranking agree.
    """
    return clip_text_ids(tokenizer, texts, context_length, dropout=dropout, generator=generator, trim=True)


def caption_groups(texts: Sequence[str]) -> torch.Tensor:
    """(B,) group ids: equal (lower-cased, stripped) captions share an id."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(t.lower().strip(), len(ids)) for t in texts])


def multi_positive_loss(logits: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """Symmetric contrastive loss where pairs in the same group are all positives (uniform targets).

    With all-distinct groups this equals CLIP's loss (holst.rerank.clip.contrastive_loss).
    """
    same = (groups.view(-1, 1) == groups.view(1, -1)).float()  # [B, B]
    target = same / same.sum(dim=1, keepdim=True)
    logits = logits.float()
    return 0.5 * (torch.sum(-target * F.log_softmax(logits, dim=1), dim=1).mean()
                  + torch.sum(-target * F.log_softmax(logits.t(), dim=1), dim=1).mean())


# ---------------------------------------------------------------------------------------- evaluation
def _union_groups(n_images: int, image_of: list[int], texts: list[str]) -> torch.Tensor:
    """Group ids over (image, caption) pairs: same image or same caption text -> same group."""
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[tuple[str, Any], int] = {}
    for i, (img, t) in enumerate(zip(image_of, texts)):
        for key in (("img", img), ("txt", t.lower().strip())):
            j = first.setdefault(key, i)
            parent[find(i)] = find(j)
    return torch.tensor([find(i) for i in range(len(texts))])


@torch.no_grad()
def evaluate_retrieval(model: CLIPModel, tokenizer, pairs: PairSet, *, max_images: int = 1000,
                       batch_size: int = 128) -> dict[str, float]:
    """Image->text and text->image R@1 / R@5 over (up to ``max_images``) pairs.

    Every caption of an image is a pair (so Russian and English captions are both queried);
    retrieving a pair with the same image or an identical caption counts as correct. ``chance_r@1``
    is the expected i2t R@1 of a random ranking.
    """
    was_training = model.training
    model.eval()
    n = min(len(pairs), max_images) if max_images else len(pairs)
    image_of = [i for i in range(n) for _ in pairs.captions[i]]
    texts = [c for i in range(n) for c in pairs.captions[i]]
    device = next(model.parameters()).device
    img_emb = torch.cat([model.encode_image(pairs.images[s:s + batch_size].to(device).float() / 255).float()
                         for s in range(0, n, batch_size)])
    L = model.config.context_length
    txt_emb = torch.cat([model.encode_text(encode(tokenizer, texts[s:s + batch_size], L).to(device)).float()
                         for s in range(0, len(texts), batch_size)])
    groups = _union_groups(n, image_of, texts)
    out = retrieval_recall(img_emb[image_of], txt_emb, ks=(1, 5), groups=groups.to(device))
    sizes = torch.bincount(groups).float()
    out["chance_r@1"] = (sizes[groups] / len(texts)).mean().item()
    out["pairs"] = float(len(texts))
    model.train(was_training)
    return out


# ---------------------------------------------------------------------------------------- model
def build_model(cfg: ClipTrainConfig, vocab_size: int) -> CLIPModel:
    """A fresh CLIP from preset ``model`` + ``model_overrides`` (vocab_size from the tokenizer), or ``init_from``."""
    if cfg.init_from:
        model = CLIPModel.from_pretrained(cfg.init_from).train()
        if model.config.vocab_size < vocab_size:
            raise ConfigError(f"init_from={cfg.init_from!r}: its vocab_size {model.config.vocab_size} is smaller "
                              f"than the tokenizer's {vocab_size}; use that CLIP's own tokenizer")
        return model
    overrides = {"vocab_size": vocab_size, **cfg.model_overrides}
    return CLIPModel(clip_preset(cfg.model, **overrides))


# ---------------------------------------------------------------------------------------- training
def train_clip(cfg: ClipTrainConfig, *, train_data: Any = None, eval_data: Any = None, tokenizer: Any = None,
               resume: str | bool | None = None, engine: Engine | None = None) -> TrainResult:
    """Train a CLIP and write ``out_dir/final`` (a pipeline clip/ directory).

    Args:
        cfg: the options.
        train_data: a dataset of {'image', 'caption'} dicts, a :class:`PairSet`, a DataConfig, or None to
            open ``cfg.data`` (split ``cfg.train_split``) with holst.data.
        eval_data: the same for the held-out pairs (None: ``cfg.data``'s ``cfg.eval_splits``).
        tokenizer: a BPETokenizer (default: ``cfg.tokenizer``, or train one on the captions).
        resume: see :func:`holst.train.checkpoint.resolve_resume`.
        engine: an existing Engine (else one is made and closed at the end).
    Returns:
        A :class:`holst.train.loop.TrainResult`; ``metrics`` = {'heldout': R@k..., 'train_fit': ...,
        'seconds'} (empty when interrupted), also written to ``final/retrieval.json``.
    """
    refuse_unsupported(cfg, "clip", UNSUPPORTED)
    t_start = time.perf_counter()
    # Resolution comes from the config the model will have; read it before building the model.
    resolution = (CLIPModel.config_class.load_json(Path(cfg.init_from) / "config.json").image_resolution
                  if cfg.init_from else clip_preset(cfg.model, **cfg.model_overrides).image_resolution)
    (train, report), heldout = load_pairs(cfg, resolution, train_data, eval_data)
    heldout = _shuffled(heldout, cfg.seed) if heldout is not None else None
    log.info("CLIP data: %d training images, %d held-out images", len(train),
             len(heldout) if heldout is not None else 0)
    if tokenizer is None and cfg.init_from and (Path(cfg.init_from) / TOKENIZER_DIR).is_dir() and not cfg.tokenizer:
        cfg = cfg.replace(tokenizer=str(Path(cfg.init_from) / TOKENIZER_DIR))
    run_tokenizer = Path(cfg.out_dir) / TOKENIZER_DIR  # the run's own copy, so --resume uses the same ids
    if tokenizer is None and resume and (run_tokenizer / "bpe.model").is_file():
        cfg = cfg.replace(tokenizer=str(run_tokenizer))
    tokenizer = tokenizer if tokenizer is not None else load_or_train_tokenizer(cfg, train)

    with TrainRun("clip", cfg, engine=engine) as run:
        engine = run.engine
        if engine.is_main:
            tokenizer.save_pretrained(run_tokenizer)
        rng = random.Random(cfg.seed + 1000 * engine.rank)
        g = torch.Generator().manual_seed(cfg.seed + 1000 * engine.rank)
        model = seeded(cfg.seed, lambda: build_model(cfg, tokenizer.vocab_size))
        if cfg.gradient_checkpointing:
            model.set_gradient_checkpointing(True)
        log.info("CLIP: %.2fM parameters, %s", sum(p.numel() for p in model.parameters()) / 1e6, model.config)
        model, optimizer = engine.prepare(model, build_optimizer(model, cfg))
        scheduler = build_scheduler(optimizer, cfg)
        bare = engine.unwrap(model)
        history: list[dict[str, float]] = []
        run.track(model=model, optimizer=optimizer, scheduler=scheduler, generator=g,
                  rng=StateOf(rng.getstate, lambda s: rng.setstate(_to_tuple(s))),
                  history=StateOf(lambda: history, history.extend))
        run.start(resume)

        L = bare.config.context_length
        max_scale = math.log(cfg.logit_scale_max)
        last_loss = None
        t0 = time.perf_counter()
        model.train()
        for step in run.steps():
            for _ in range(cfg.grad_accum):
                index = torch.randint(len(train), (cfg.batch_size,), generator=g)
                images, texts = train.batch(index, rng)
                ids = encode(tokenizer, texts, L, dropout=cfg.bpe_dropout, generator=g)
                with engine.autocast():
                    logits = model(images.to(engine.device), ids.to(engine.device))
                loss = multi_positive_loss(logits, caption_groups(texts).to(engine.device))
                applied = engine.step(loss, optimizer, scheduler, model=model)
                last_loss = loss.detach()
            if applied:
                with torch.no_grad():
                    bare.logit_scale.clamp_(0, max_scale)  # CLIP's clip at 100
            timed_out = cfg.max_minutes > 0 and time.perf_counter() - t0 > 60 * cfg.max_minutes
            if engine.distributed:  # every rank must take the same branch (checkpointing is collective)
                timed_out = engine.all_reduce_mean(torch.tensor(float(timed_out))).item() > 0
            if timed_out:
                log.info("max_minutes=%s reached at step %d: finishing", cfg.max_minutes, step)
                run.stop_early = True
            if run.should_log(step) or timed_out:
                engine.log(step, {"loss": engine.all_reduce_mean(last_loss), "lr": scheduler.get_last_lr()[0],
                                  "logit_scale": bare.logit_scale.exp().item()}, total=cfg.max_steps)
            if cfg.eval_every and step % cfg.eval_every == 0 and heldout is not None and engine.is_main:
                r = evaluate_retrieval(bare, tokenizer, heldout, max_images=cfg.eval_max_images)
                history.append({"step": step, **r})
                engine.log(step, {f"heldout_{k}": v for k, v in r.items() if "@" in k})

        metrics: dict[str, Any] = {}
        if engine.is_main and not run.interrupted:
            n_eval = cfg.eval_max_images
            if heldout is not None:
                metrics["heldout"] = evaluate_retrieval(bare, tokenizer, heldout, max_images=n_eval)
            n_fit = min(len(train), len(heldout) if heldout is not None else len(train), n_eval or len(train))
            metrics["train_fit"] = evaluate_retrieval(bare, tokenizer, _shuffled(train, cfg.seed), max_images=n_fit)
            metrics["seconds"] = round(time.perf_counter() - t_start, 1)
            log.info("held-out retrieval: %s", metrics.get("heldout"))
            log.info("training-pair retrieval: %s", metrics["train_fit"])

        def save_final(final: Path) -> None:
            engine.save_pretrained(model, final)
            if engine.is_main:
                tokenizer.save_pretrained(final / TOKENIZER_DIR)
                summary = {"step": run.step, "train_loss": None if last_loss is None else float(last_loss),
                           **metrics, "history": history, "config": cfg.to_dict()}
                (final / "retrieval.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n",
                                                      encoding="utf-8")

        return run.finish(model, data=report.to_dict(), last_loss=last_loss, metrics=metrics, save_final=save_final)


def load_pairs(cfg: ClipTrainConfig, resolution: int, train_data: Any = None, eval_data: Any = None
               ) -> tuple[tuple[PairSet, DataReport], PairSet | None]:
    """(training pairs, their data report) and held-out pairs: the given data, or ``cfg.data``'s splits."""
    lang = cfg.caption_lang
    train = _as_pairs(train_data if train_data is not None else
                      split_data(cfg.data, cfg.train_split, lang, resolution), resolution, lang)
    if eval_data is not None:
        return train, _as_pairs(eval_data, resolution, lang)[0]
    if train_data is not None:
        return train, None
    if not (Path(cfg.data).is_file() or (Path(cfg.data) / "captions.jsonl").is_file()):
        log.info("data=%s has no splits (a plain folder): no held-out evaluation", cfg.data)
        return train, None
    parts = [p for p, _ in (_as_pairs(split_data(cfg.data, s, lang, resolution), resolution, lang, empty_ok=True)
                            for s in cfg.eval_splits) if p is not None]
    if not parts:
        return train, None
    return train, PairSet(torch.cat([p.images for p in parts]), [c for p in parts for c in p.captions])


def _as_pairs(data: Any, resolution: int, lang: str, empty_ok: bool = False) -> tuple[PairSet | None, DataReport]:
    """Data (a PairSet, DataConfig or dataset) -> in-memory pairs and the data report."""
    if isinstance(data, PairSet):
        return data, DataReport(read=len(data), kept=len(data))
    try:
        dataset, report = open_samples(data, cache_bytes=0)  # PairSet keeps its own uint8 copy
    except ConfigError:
        if empty_ok:
            return None, DataReport()
        raise
    return PairSet.from_items(dataset, resolution, lang), report


def _shuffled(pairs: PairSet, seed: int) -> PairSet:
    """A fixed permutation, so that ``eval_max_images`` takes a seeded sample, not the first styles."""
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed))
    return PairSet(pairs.images[order], [pairs.captions[i] for i in order.tolist()])


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``holst train clip`` options."""
    add_train_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``holst train clip`` (also under torchrun)."""
    return run_train_command(ClipTrainConfig, train_clip, args)
