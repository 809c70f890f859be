"""``holst finetune``: one command from a folder of pictures to a new pipeline (issue 20).

```
holst finetune my_pictures/ --model models/default --out models/mine --caption "мой кот"
holst generate "мой кот" --model models/mine
```
The recipe, top to bottom (each step a small function below):

1. **pictures**: a folder of images with same-named ``.txt`` captions, a folder with a
   ``captions.jsonl`` (what ``holst data`` writes), or any folder of images plus one ``caption`` for
   all. Any size and mode; each is centre-cropped and resized to the model's resolution. Files that
   are not readable images are skipped and counted.
2. **codes**: every picture is encoded by the model's own VQGAN, ``variants`` times: as it is, mirrored
   (unless the caption names a side, a letter, a digit or text, which a mirror would falsify), and
   small random crops (90-100 % of the side).
3. **training**: the transformer continues from the model's weights through the ``holst train
   dalle`` loop (:func:`holst.train.dalle.train_dalle`, its public entry point): full fine-tune for
   small models, LoRA adapters (``lora_rank``) for models above ``LORA_ABOVE`` parameters, with a
   progress bar (loss, time left) and a sample grid of the caption every ``sample_every`` steps in
   ``<out>/samples/``.
4. **pipeline**: ``<out>`` becomes a complete pipeline directory: the new transformer, the base
   model's tokenizer, VQGAN, CLIP and super-resolution reused, and a model card saying what it was
   tuned on. ``holst generate --model <out>`` and ``holst serve --model <out>`` load it.

Defaults were measured on the shipped model (``docs/finetune.md``): 16 pictures of a new concept take
about a minute on a 2-core CPU (20 pictures: 160 steps).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from holst.cli_common import add_dataclass_arguments, given_values
from holst.config import ConfigBase, ConfigError, _check, check_positive, check_prob
from holst.errors import InputError
from holst.train.config import RuntimeOptions
from holst.utils.runtime import get_logger, set_threads

log = get_logger("holst.finetune")

LORA_ABOVE = 100_000_000  # parameters: larger transformers get LoRA adapters by default, smaller a full fine-tune
DEFAULT_LORA_RANK = 16
MAX_PICTURES = 10_000
# words after which a mirrored picture no longer fits its caption
NO_FLIP_WORDS = re.compile(r"(left|right|слева|справа|лев|прав|letter|букв|digit|цифр|number|числ|text|текст|"
                           r"надпис|word|слов|arrow|стрелк|\d)", re.IGNORECASE)


# Everyday captions whose pictures the base model draws before training ("prior preservation", as in
# DreamBooth): mixed into the batches, they keep a one-caption fine-tune from drawing its concept for every
# caption.
PRIOR_CAPTIONS = (
    "яблоко", "сердце", "кот", "собака", "машина", "дом", "ёлка", "ракета", "солнце", "улыбающееся лицо",
    "цветок", "птица", "рыба", "звезда", "луна", "облако", "дерево", "часы", "книга", "мяч", "флаг", "корабль",
    "поезд", "самолёт", "гриб", "банан", "лошадь", "корова", "чашка кофе", "торт", "гитара", "зонтик",
)


class FinetuneError(InputError):
    """A user mistake (bad folder, caption or --out): ``holst finetune`` prints one line and exits 2."""


@dataclasses.dataclass
class FinetuneConfig(RuntimeOptions, ConfigBase):
    """Options of ``holst finetune`` (0 / -1 = chosen from the model and the number of pictures).

    :class:`holst.train.config.RuntimeOptions` (``device``, ``precision``, ``num_threads``, ``seed``)
    are passed on to the transformer's trainer unchanged.

    ``steps``: optimiser steps (0 = ``steps_per_picture`` x pictures, clamped to [``min_steps``,
    ``max_steps``]). ``minutes`` > 0 caps the steps so that training fits that wall time (measured on
    the first steps). ``lora_rank``: -1 = LoRA of rank 16 for models above 100M parameters, full
    fine-tune below; 0 = full fine-tune; > 0 = LoRA of that rank. ``lr``: 0 = 1e-3 full, 2e-3 LoRA.
    ``variants``: encodings per picture (original, mirror, crops). ``loss_img_weight``: weight of
    the image loss (-1 = the model's). ``freeze``: parameter-name globs kept fixed. ``prior_images``:
    pictures the base model draws for everyday captions (:data:`PRIOR_CAPTIONS`), mixed in so that other
    captions keep working. ``sample_every``: a sample grid every N steps (-1 = four per run, 0 = none).
    """

    steps: int = dataclasses.field(default=0, metadata={
        "help": "training steps (default: {steps_per_picture} per picture, {min_steps}..{max_steps})"})
    steps_per_picture: int = 8
    min_steps: int = 80
    max_steps: int = 400
    minutes: float = dataclasses.field(default=0.0, metadata={"help": "at most this wall time for training"})
    lora_rank: int = dataclasses.field(default=-1, metadata={
        "help": "LoRA rank; 0 = full fine-tune (default: LoRA 16 above 100M parameters, else full)"})
    lr: float = dataclasses.field(default=0.0, metadata={"help": "learning rate (default 1e-3 full, 2e-3 LoRA)"})
    batch_size: int = dataclasses.field(default=16, metadata={"help": "default {default}"})
    warmup_steps: int = 10
    variants: int = dataclasses.field(default=4, metadata={
        "help": "augmented encodings per picture (default {default})"})
    flip: str = dataclasses.field(default="auto", metadata={
        "help": "mirrored copies (auto: not when the caption names a side, letter, digit or text)",
        "choices": ("auto", "yes", "no")})
    loss_img_weight: float = -1.0
    bpe_dropout: float = 0.1
    empty_caption_prob: float = 0.1
    freeze: list[str] = dataclasses.field(default_factory=list)
    prior_images: int = dataclasses.field(default=64, metadata={
        "help": "pictures of everyday captions drawn by the base model and mixed in so that other captions keep "
                "working (default {default}; 0 = off)"})
    sample_every: int = dataclasses.field(default=-1, metadata={
        "help": "sample grid of the caption every N steps in OUT/samples (default: 4 per run; 0 = off)"})
    sample_images: int = 4

    def __post_init__(self) -> None:
        self.check_runtime_options()
        _check(isinstance(self.sample_every, int) and self.sample_every >= -1,
               f"sample_every={self.sample_every!r} must be an integer >= -1 (-1 = four grids per run)")
        for name in ("steps", "warmup_steps", "prior_images"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 0, f"{name}={v!r} must be an integer >= 0")
        for name in ("steps_per_picture", "min_steps", "max_steps", "batch_size", "variants", "sample_images"):
            v = getattr(self, name)
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= 1, f"{name}={v!r} must be an integer >= 1")
        _check(self.min_steps <= self.max_steps,
               f"min_steps={self.min_steps} must not exceed max_steps={self.max_steps}")
        _check(isinstance(self.lora_rank, int) and self.lora_rank >= -1, f"lora_rank={self.lora_rank!r} must be >= -1")
        check_positive("lr", self.lr, allow_zero=True)
        check_positive("minutes", self.minutes, allow_zero=True)
        check_prob("bpe_dropout", self.bpe_dropout)
        check_prob("empty_caption_prob", self.empty_caption_prob)
        _check(self.flip in ("auto", "yes", "no"), f"flip={self.flip!r} must be auto, yes or no")
        _check(self.loss_img_weight == -1.0 or self.loss_img_weight >= 0,
               f"loss_img_weight={self.loss_img_weight!r} must be >= 0 (or -1 = the model's)")


# ---------------------------------------------------------------------------------------------- 1. pictures


@dataclasses.dataclass
class Pictures:
    """Pictures to learn: images (M, 3, S, S) in [0, 1], one caption each, and what was skipped."""

    images: torch.Tensor
    captions: list[str]
    files: list[Path]
    skipped: dict[str, int]
    source: str


def _image_files(folder: Path) -> list[Path]:
    from holst.data.loaders import IMAGE_EXTS

    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _listed_pictures(folder: Path, caption: str | None) -> tuple[list[tuple[Path, str]], dict[str, int]]:
    """(file, caption) pairs of a folder in one of the three layouts, and the counts of what was left out."""
    from holst.data.images import BadSample, decode_caption

    skipped: dict[str, int] = {}
    table = folder / "captions.jsonl"
    if caption is None and table.is_file():
        from holst.data.loaders import PATH_KEYS, read_table

        pairs = []
        for row in read_table(table):
            rel = next((row[k] for k in PATH_KEYS if row.get(k)), None)
            text = row.get("ru") or row.get("caption") or row.get("text") or row.get("en")
            if rel is None or not isinstance(text, str) or not text.strip():
                skipped["no_caption"] = skipped.get("no_caption", 0) + 1
                continue
            path = Path(rel) if Path(rel).is_absolute() else folder / rel
            pairs.append((path, " ".join(text.split())))
        return pairs, skipped
    files = _image_files(folder)
    if caption is not None:
        return [(f, caption) for f in files], skipped
    pairs = []
    for f in files:
        txt = f.with_suffix(".txt")
        try:
            text = decode_caption(txt.read_bytes(), str(txt)) if txt.is_file() else ""
        except BadSample:
            text = ""
        if text:
            pairs.append((f, " ".join(text.split())))
        else:
            skipped["no_caption"] = skipped.get("no_caption", 0) + 1
    return pairs, skipped


def load_pictures(source: str | Path, size: int, *, caption: str | None = None) -> Pictures:
    """Read a folder of pictures (see the module docstring), centre-cropped to size x size.

    Args:
        source: the folder.
        size: the model's image side.
        caption: one caption for every picture (then ``.txt`` files and ``captions.jsonl`` are ignored).
    Raises:
        FinetuneError: no such folder, no pictures, or no readable picture with a caption.
    """
    from holst.data.images import BadSample, decode_image, image_to_tensor, resize_crop

    folder = Path(source)
    if not folder.is_dir():
        raise FinetuneError(f"{folder} is not a folder of pictures")
    pairs, skipped = _listed_pictures(folder, caption)
    if not pairs:
        if not _image_files(folder) and not (folder / "captions.jsonl").is_file():
            raise FinetuneError(f"{folder} holds no pictures (.png, .jpg, .webp, ...)")
        raise FinetuneError(f"{folder}: no picture has a caption: add same-named .txt files or give --caption")
    if len(pairs) > MAX_PICTURES:
        raise FinetuneError(f"{folder} holds {len(pairs)} pictures; fine-tuning takes at most {MAX_PICTURES} "
                            "(train on a larger set with 'holst train dalle')")
    images, captions, files = [], [], []
    for path, text in pairs:
        try:
            image = decode_image(path)
        except (BadSample, OSError) as e:
            reason = getattr(e, "reason", "unreadable")
            skipped[reason] = skipped.get(reason, 0) + 1
            log.warning("skipping %s: %s", path, e)
            continue
        images.append(image_to_tensor(resize_crop(image, size, "center")))
        captions.append(text)
        files.append(path)
    if not images:
        raise FinetuneError(f"{folder}: none of the {len(pairs)} files is a readable picture "
                            f"(skipped: {', '.join(f'{n} {k}' for k, n in sorted(skipped.items()))})")
    return Pictures(torch.stack(images), captions, files, skipped, str(folder))


def check_caption(pipe: Any, caption: str) -> str:
    """The caption, tidied; FinetuneError when it is empty or longer than the model reads."""
    text = " ".join(str(caption).split())
    if not text:
        raise FinetuneError("the caption is empty: describe the pictures, e.g. --caption 'мой рыжий кот'")
    T = pipe.dalle.config.text_seq_length
    n = len(pipe.tokenizer.encode(text.lower())) + 2  # + bos, eos
    if n > T:
        raise FinetuneError(f"the caption is {n} tokens (with bos/eos) but the model reads {T}: shorten it "
                            f"({text[:40]!r}...)")
    return text


# ---------------------------------------------------------------------------------------------- 2. codes


def may_flip(caption: str, flip: str = "auto") -> bool:
    """Whether mirrored copies fit the caption ('auto': not when it names a side, letter, digit or text)."""
    if flip != "auto":
        return flip == "yes"
    return NO_FLIP_WORDS.search(caption) is None


def augment(image: torch.Tensor, variant: int, *, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Variant ``variant`` of one picture (3, S, S): 0 as is, 1 mirrored (if allowed), then small crops."""
    import torch.nn.functional as F

    S = image.shape[-1]
    if variant == 0:
        return image
    out = image
    if flip and (variant == 1 or (variant > 1 and bool(torch.rand((), generator=generator) < 0.5))):
        out = out.flip(-1)
    if variant >= 2 or not flip:
        side = int(round(S * float(0.9 + 0.1 * torch.rand((), generator=generator))))
        top = int(torch.randint(0, S - side + 1, (), generator=generator))
        left = int(torch.randint(0, S - side + 1, (), generator=generator))
        crop = out[:, top:top + side, left:left + side]
        out = F.interpolate(crop[None], size=(S, S), mode="bicubic", antialias=True, align_corners=False)[0]
    return out.clamp(0, 1)


@torch.no_grad()
def encode_pictures(vqgan: Any, pictures: Pictures, *, variants: int, flip: str = "auto", seed: int = 0,
                    batch_size: int = 16) -> list[dict]:
    """``variants`` augmented encodings of each picture with the model's VQGAN.

    Returns:
        items ``{"codes": (N,) long, "caption": str}`` for :func:`holst.train.dalle.train_dalle`.
    """
    g = torch.Generator().manual_seed(seed)
    device = next(vqgan.parameters()).device
    views, captions = [], []
    for image, caption in zip(pictures.images, pictures.captions):
        ok = may_flip(caption, flip)
        for v in range(variants):
            views.append(augment(image, v, flip=ok, generator=g))
            captions.append(caption)
    batch = torch.stack(views)  # (M * variants, 3, S, S)
    chunks = []
    for i in range(0, batch.shape[0], batch_size):
        part = batch[i:i + batch_size].to(device)
        chunks.append(vqgan.encode(part).reshape(part.shape[0], -1).cpu())  # (b, h, w) -> (b, N)
    codes = torch.cat(chunks)
    return [{"codes": c, "caption": t} for c, t in zip(codes.long(), captions)]


@torch.no_grad()
def prior_items(pipe: Any, n: int, *, exclude: set[str], seed: int = 0) -> list[dict]:
    """``n`` pictures the base model draws for everyday captions (its own codes, sampling defaults).

    Returns:
        items ``{"codes": (N,) long, "caption": str}``; captions in ``exclude`` are left out.
    """
    import warnings

    captions = [c for c in PRIOR_CAPTIONS if c not in exclude]
    if n <= 0 or not captions:
        return []
    per = math.ceil(n / len(captions))
    items: list[dict] = []
    for i, caption in enumerate(captions):
        k = min(per, n - len(items))
        if k <= 0:
            break
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = pipe(caption, num_images=k, seed=seed * 1_000_003 + 1000 * i, rerank=0, upscale=1)
        items += [{"codes": c.long(), "caption": caption} for c in out.codes]
    return items


# ---------------------------------------------------------------------------------------------- 3. training


def resolve_plan(cfg: FinetuneConfig, n_pictures: int, n_params: int) -> dict[str, Any]:
    """Steps, learning rate and LoRA rank the run will use (the 'auto' values filled in)."""
    lora = cfg.lora_rank if cfg.lora_rank >= 0 else (DEFAULT_LORA_RANK if n_params > LORA_ABOVE else 0)
    steps = cfg.steps or max(cfg.min_steps, min(cfg.max_steps, cfg.steps_per_picture * n_pictures))
    lr = cfg.lr or (2e-3 if lora else 1e-3)
    return {"steps": int(steps), "lr": float(lr), "lora_rank": int(lora)}


def _dalle_source(pipe: Any, work: Path) -> str:
    """A DalleModel directory holding the base transformer (the pipeline's own, or written to ``work``)."""
    source = Path(str(getattr(pipe, "source", "")))
    if (source / "dalle" / "config.json").is_file():
        return str(source / "dalle")
    pipe.dalle.save_pretrained(work / "base_dalle")
    return str(work / "base_dalle")


def _measure_step_seconds(pipe: Any, items: list[dict], cfg: FinetuneConfig, plan: dict) -> float:
    """Seconds of one training step of this size (3 steps on a copy of the model, after one warm-up)."""
    import copy

    from holst.train.lora import apply_lora

    model = copy.deepcopy(pipe.dalle).float().train()
    if plan["lora_rank"]:
        apply_lora(model, rank=plan["lora_rank"], generator=torch.Generator().manual_seed(0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-9)
    T = model.config.text_seq_length
    B = min(cfg.batch_size, len(items))
    text = pipe.tokenizer.encode_batch([items[i % len(items)]["caption"] for i in range(B)], T)
    codes = torch.stack([items[i % len(items)]["codes"] for i in range(B)])
    input_ids = torch.cat([text, codes], 1).to(next(model.parameters()).device)
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        loss, _ = model.compute_loss(input_ids, logits=model(input_ids))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return float(sorted(times[1:])[1])


def _train_config(cfg: FinetuneConfig, plan: dict, *, init_from: str, out: Path, caption: str, n_items: int) -> Any:
    from holst.train.config import DalleTrainConfig

    return DalleTrainConfig(
        init_from=init_from, out_dir=str(out), max_steps=plan["steps"], lr=plan["lr"],
        warmup_steps=min(cfg.warmup_steps, max(plan["steps"] // 5, 1)), batch_size=min(cfg.batch_size, n_items),
        lora_rank=plan["lora_rank"], freeze=list(cfg.freeze), loss_img_weight=cfg.loss_img_weight,
        bpe_dropout=cfg.bpe_dropout, empty_caption_prob=cfg.empty_caption_prob, **cfg.part_values(RuntimeOptions),
        log_every=max(5, plan["steps"] // 10), save_every=0,
        sample_every=cfg.sample_every if cfg.sample_every >= 0 else max(1, math.ceil(plan["steps"] / 4)),
        sample_prompts=[caption] * cfg.sample_images, tensorboard=False, weight_decay=0.0)


# ---------------------------------------------------------------------------------------------- 4. the whole


def finetune(pipe: Any, images: str | Path | Pictures, out: str | Path, *, caption: str | None = None,
             cfg: FinetuneConfig | None = None, **overrides: Any) -> Any:
    """Fine-tune a pipeline's transformer on a folder of pictures; returns the new pipeline.

    Args:
        pipe: a Text2ImagePipeline (e.g. ``Text2ImagePipeline.from_pretrained('models/default')``).
        images: a folder (see the module docstring) or loaded :class:`Pictures`.
        out: the new pipeline directory (must not exist; sample grids appear in ``out/samples``).
        caption: one caption for all pictures (else the folder's captions).
        cfg: options (default :class:`FinetuneConfig`).
        **overrides: change single fields of ``cfg``, e.g. ``steps=40``.
    Returns:
        The fine-tuned Text2ImagePipeline (also saved at ``out``).
    Raises:
        FinetuneError for bad input (nothing is written then).
    """
    from holst.train.dalle import train_dalle

    t0 = time.perf_counter()
    try:
        cfg = (cfg or FinetuneConfig()).replace(**overrides) if overrides else (cfg or FinetuneConfig())
    except (TypeError, ConfigError) as e:
        raise FinetuneError(str(e)) from e
    out = Path(out)
    if out.exists():
        raise FinetuneError(f"--out {out} exists already: give a new directory (nothing is overwritten)")
    if caption is not None:
        caption = check_caption(pipe, caption)
    pictures = images if isinstance(images, Pictures) else load_pictures(images, pipe.image_size, caption=caption)
    for text in dict.fromkeys(pictures.captions):
        check_caption(pipe, text)
    if sum(pictures.skipped.values()):
        log.warning("finetune: %d pictures, %s skipped", len(pictures.captions),
                    ", ".join(f"{n} {k}" for k, n in sorted(pictures.skipped.items())))
    n_params = sum(p.numel() for p in pipe.dalle.parameters())
    plan = resolve_plan(cfg, len(pictures.captions), n_params)
    items = encode_pictures(pipe.vqgan, pictures, variants=cfg.variants, flip=cfg.flip, seed=cfg.seed)
    prior = prior_items(pipe, cfg.prior_images, exclude=set(pictures.captions), seed=cfg.seed)
    if prior:
        log.info("finetune: %d pictures of everyday captions drawn by the base model are mixed in", len(prior))
    items = items + prior
    if cfg.minutes > 0:
        per_step = _measure_step_seconds(pipe, items, cfg, plan)
        fit = max(1, int(cfg.minutes * 60 * 0.9 / per_step))  # 10 % for encoding, saving, sample grids
        if fit < plan["steps"]:
            log.info("finetune: %.2f s per step: %d steps fit into %.1f minutes (instead of %d)", per_step, fit,
                     cfg.minutes, plan["steps"])
            plan["steps"] = fit
    main_caption = max(set(pictures.captions), key=pictures.captions.count)
    log.info("finetune: %d pictures x %d variants, %s, %d steps at lr %g -> %s", len(pictures.captions),
             cfg.variants, f"LoRA rank {plan['lora_rank']}" if plan["lora_rank"] else "full fine-tune",
             plan["steps"], plan["lr"], out)
    out.mkdir(parents=True)
    try:
        init_from = _dalle_source(pipe, out)
        tcfg = _train_config(cfg, plan, init_from=init_from, out=out, caption=main_caption, n_items=len(items))
        result = train_dalle(tcfg, dataset=items, tokenizer=pipe.tokenizer, vqgan=pipe.vqgan)
        if result.final_dir is None:
            raise RuntimeError(f"fine-tuning was interrupted at step {result.step}")
        new = _assemble(pipe, out, Path(result.final_dir), pictures, plan, cfg, time.perf_counter() - t0)
    except BaseException:
        log.error("finetune failed; the partial directory %s is left for inspection", out)
        raise
    return new


def _assemble(pipe: Any, out: Path, final_dir: Path, pictures: Pictures, plan: dict, cfg: FinetuneConfig,
              seconds: float) -> Any:
    """Write the pipeline directory at ``out`` (new transformer, the rest reused) and its model card."""
    from holst.dalle import DalleModel
    from holst.hub import PipelineComponents
    from holst.pipeline import Text2ImagePipeline

    dtype = next(pipe.dalle.parameters()).dtype
    dalle = DalleModel.from_pretrained(final_dir, device=pipe.device, dtype=dtype)
    parts = pipe.components
    components = PipelineComponents(parts.tokenizer, parts.vqgan, dalle, parts.clip, parts.clip_tokenizer,
                                     parts.superres)
    captions = list(dict.fromkeys(pictures.captions))
    shown = "; ".join(captions[:3]) + (f" (+{len(captions) - 3} more)" if len(captions) > 3 else "")
    base = pipe.config.name or getattr(pipe, "source", "a holst pipeline")
    tuned = (f"fine-tuned by holst finetune from {base} ({getattr(pipe, 'source', 'memory')}) on "
             f"{len(pictures.captions)} pictures of {pictures.source} captioned: {shown}")
    config = pipe.config.replace(name=f"{base} + finetune", description=tuned,
                                 training_data=f"{pipe.config.training_data}; then {tuned}".lstrip("; "))
    new = Text2ImagePipeline(components, config)
    new.save_pretrained(out, dtype=dtype if dtype != torch.float32 else None)
    for name in ("final", "lora", "checkpoint.pt", "base_dalle"):  # the trainer's working files
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    record = {"base": getattr(pipe, "source", "memory"), "pictures": len(pictures.captions),
              "skipped": pictures.skipped, "captions": captions, "source": pictures.source, **plan,
              "variants": cfg.variants, "seconds": round(seconds, 1), "options": cfg.to_dict()}
    (out / "finetune.json").write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    with open(out / "README.md", "a", encoding="utf-8") as f:
        f.write("\n## Fine-tune\n\n"
                f"Made by `holst finetune` from `{record['base']}`: {len(pictures.captions)} pictures of "
                f"`{pictures.source}` ({sum(pictures.skipped.values())} files skipped), captions: {shown}. "
                f"{plan['steps']} steps, lr {plan['lr']:g}, "
                + (f"LoRA rank {plan['lora_rank']} (merged)" if plan["lora_rank"] else "full fine-tune")
                + f", {cfg.variants} encodings per picture; {seconds / 60:.1f} minutes. The tokenizer, VQGAN, "
                "CLIP and super-resolution are the base model's. Sample grids of the caption during training: "
                "`samples/`. All options: `finetune.json`, `train_config.yaml`.\n")
    new.source = str(out)
    return new


# ---------------------------------------------------------------------------------------------- CLI

# The FinetuneConfig fields that are flags (default None = not given: the dataclass default applies), and the
# spellings that differ from the field names.
FINETUNE_FLAGS = ("steps", "lora_rank", "minutes", "lr", "batch_size", "variants", "flip", "sample_every",
                  "prior_images", "device", "precision", "num_threads", "seed")
FINETUNE_SPELLINGS = {"lora_rank": ["--lora"], "num_threads": ["--threads"]}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``holst finetune`` options (those after ``--caption`` are :class:`FinetuneConfig` fields)."""
    parser.add_argument("images", help="folder of pictures: same-named .txt captions, a captions.jsonl, or "
                                       "any pictures with --caption")
    parser.add_argument("--model", default="models/default", help="base pipeline directory (default models/default)")
    parser.add_argument("--out", required=True, help="new pipeline directory (must not exist)")
    parser.add_argument("--caption", default=None, help="one caption for every picture")
    add_dataclass_arguments(parser, FinetuneConfig, FINETUNE_FLAGS, flags=FINETUNE_SPELLINGS)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``holst finetune``."""
    out = Path(args.out)
    if out.exists():
        raise FinetuneError(f"--out {out} exists already: give a new directory (nothing is overwritten)")
    if args.caption is not None:
        if not args.caption.strip():
            raise FinetuneError("the caption is empty: describe the pictures, e.g. --caption 'мой рыжий кот'")
    if not Path(args.images).is_dir():
        raise FinetuneError(f"{args.images} is not a folder of pictures")
    cfg = FinetuneConfig(**given_values(args, FINETUNE_FLAGS))
    set_threads(cfg.num_threads)
    from holst.pipeline import Text2ImagePipeline
    from holst.utils.runtime import resolve_device

    pipe = Text2ImagePipeline.from_pretrained(args.model, device=resolve_device(cfg.device))
    if args.caption is not None:
        check_caption(pipe, args.caption)
    pictures = load_pictures(args.images, pipe.image_size, caption=args.caption)
    new = finetune(pipe, pictures, out, caption=args.caption, cfg=cfg)
    print(f"done: {new.source} (try: holst generate {json.dumps(pictures.captions[0], ensure_ascii=False)} "
          f"--model {new.source})")
    return 0
