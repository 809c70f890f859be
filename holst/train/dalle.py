"""``holst train dalle``: train or fine-tune the ruDALL-E transformer on captions + image codes.

The loop, top to bottom:
1. build the model (a preset, or ``init_from`` a DalleModel directory such as a converted
   official checkpoint), optionally freeze parameters by name / add LoRA adapters;
2. data: code shards (``holst prepare codes``) or an image dataset encoded on the fly by a VQGAN;
   captions get BPE-dropout and, with probability ``empty_caption_prob``, are emptied so that
   classifier-free guidance has an unconditional model to contrast with;
3. ``engine.step`` per micro-batch on the weighted text/image loss (``DalleModel.compute_loss``);
4. logs, sample grids, atomic checkpoints every ``save_every`` steps and at SIGTERM;
5. ``<out_dir>/final/``: a ``save_pretrained`` directory the pipeline loads (LoRA merged, EMA applied),
   plus ``<out_dir>/lora/`` with the adapters alone when LoRA was used.

Randomness: the data order is a permutation seeded by (seed, epoch); each sample's caption
randomness is seeded by (seed, epoch, sample index). So a resumed run, or a run on a different
number of processes with the same global batch, sees exactly the same batches.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from holst.config import DalleTrainConfig
from holst.dalle import DalleModel
from holst.presets import get_preset
from holst.train.checkpoint import (
    FINAL_DIR,
    add_train_arguments,
    checkpoint_path,
    load_train_config,
    resolve_resume,
    set_threads,
)
from holst.train.engine import Engine
from holst.train.lora import apply_lora, freeze_parameters, lora_state_dict, merge_lora, save_lora
from holst.train.optim import EMA, build_optimizer, build_scheduler
from holst.utils.runtime import get_logger

log = get_logger("holst.train.dalle")

_MASK64 = (1 << 63) - 1


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    """A per-sample seed independent of batch layout and process count."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index * 7_919 + 12_345) & _MASK64


class DalleBatches:
    """Deterministic, resumable, rank-sharded batches of (text_ids, image_codes).

    Args:
        dataset: map-style (``__len__``/``__getitem__``) yielding ``{"codes": (N,) long, "caption": str}``
            or, with ``encode_images``, ``{"image": (3, H, W) float [0, 1], "caption": str}``. Iterable
            datasets are read into memory once.
        tokenizer: an object with ``encode_batch(texts, T, dropout=, generator=)`` (holst.text.BPETokenizer).
        batch_size: micro-batch of this process.
        text_seq_length, image_seq_length: T and N of the model.
        seed: data seed.
        rank, world_size: this process's slice of every global batch of ``batch_size * world_size``.
        bpe_dropout: BPE-dropout probability (0 = deterministic encodings, cached).
        empty_caption_prob: probability that a caption is replaced by ''.
        encode_images: images (B, 3, H, W) -> codes (B, h, w) long, for on-the-fly VQGAN encoding.
    """

    def __init__(self, dataset: Any, tokenizer: Any, *, batch_size: int, text_seq_length: int, image_seq_length: int,
                 seed: int = 0, rank: int = 0, world_size: int = 1, bpe_dropout: float = 0.0,
                 empty_caption_prob: float = 0.0, encode_images: Any = None) -> None:
        if not (hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")):
            log.info("dataset is iterable only: reading it into memory once")
            dataset = list(dataset)
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.T, self.N = text_seq_length, image_seq_length
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.bpe_dropout, self.empty_caption_prob = bpe_dropout, empty_caption_prob
        self.encode_images = encode_images
        self.global_batch = batch_size * world_size
        self.num_samples = len(dataset)
        if self.num_samples < self.global_batch:
            raise ValueError(f"the dataset has {self.num_samples} samples, fewer than one global batch "
                             f"(batch_size {batch_size} x {world_size} processes)")
        self.batches_per_epoch = self.num_samples // self.global_batch  # the last partial batch is dropped
        self.epoch = 0
        self.batch_index = 0
        self._perm: torch.Tensor | None = None
        self._perm_epoch = -1
        self._text_cache: dict[str, torch.Tensor] = {}

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch_index": self.batch_index, "num_samples": self.num_samples,
                "global_batch": self.global_batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("num_samples") != self.num_samples:
            log.warning("the dataset changed size since the checkpoint (%s -> %d samples): data order differs",
                        state.get("num_samples"), self.num_samples)
        if state.get("global_batch") != self.global_batch:
            log.warning("the global batch changed since the checkpoint (%s -> %d): data order differs",
                        state.get("global_batch"), self.global_batch)
        self.epoch = int(state["epoch"])
        self.batch_index = int(state["batch_index"])

    def _permutation(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            g = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, -1))
            self._perm = torch.randperm(self.num_samples, generator=g)
            self._perm_epoch = self.epoch
        return self._perm

    def _encode_caption(self, caption: str, index: int) -> torch.Tensor:
        """(T,) long text ids of one sample, with its own seeded randomness."""
        need_rng = self.bpe_dropout > 0 or self.empty_caption_prob > 0
        g = torch.Generator().manual_seed(_sample_seed(self.seed, self.epoch, index)) if need_rng else None
        if self.empty_caption_prob > 0 and float(torch.rand((), generator=g)) < self.empty_caption_prob:
            caption = ""
        if self.bpe_dropout > 0:
            return self.tokenizer.encode_batch([caption], self.T, dropout=self.bpe_dropout, generator=g)[0]
        cached = self._text_cache.get(caption)
        if cached is None:
            cached = self._text_cache[caption] = self.tokenizer.encode_batch([caption], self.T)[0]
        return cached

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This process's next micro-batch.

        Returns:
            text_ids (B, T) long and image_codes (B, N) long, on the CPU (or the VQGAN's device).
        """
        if self.batch_index >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_index = 0
        start = self.batch_index * self.global_batch + self.rank * self.batch_size
        indices = self._permutation()[start : start + self.batch_size].tolist()
        self.batch_index += 1
        items = [self.dataset[i] for i in indices]
        captions = [str(item.get("caption", "")) for item in items]
        text_ids = torch.stack([self._encode_caption(c, i) for c, i in zip(captions, indices)])  # (B, T)
        if self.encode_images is not None:
            images = torch.stack([item["image"] for item in items])  # (B, 3, H, W)
            codes = self.encode_images(images).reshape(len(items), -1)  # (B, h, w) -> (B, N)
        else:
            codes = torch.stack([torch.as_tensor(item["codes"]).reshape(-1) for item in items]).long()  # (B, N)
        if codes.shape[1] != self.N:
            raise ValueError(f"samples have {codes.shape[1]} image codes; the model expects {self.N} "
                             f"(image_tokens_per_dim ** 2); the codes come from a different VQGAN or image size")
        return text_ids.long(), codes


# ---------------------------------------------------------------------------------------------- building


def build_model(cfg: DalleTrainConfig) -> DalleModel:
    """A fresh preset model (seeded by ``cfg.seed``, same on every rank) or ``init_from`` weights."""
    if cfg.init_from:
        # fp32 master weights whatever the file holds (a converted checkpoint may be fp16).
        model = DalleModel.from_pretrained(cfg.init_from, dtype=torch.float32)
        model.attn_impl = cfg.attn_impl
        if cfg.model_overrides:
            log.warning("model_overrides is ignored with init_from (the checkpoint's config is used)")
    else:
        config = get_preset(cfg.model, **cfg.model_overrides)
        # Same initial weights on every rank and for every run with this seed, without touching
        # the global RNG state the training loop relies on.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = DalleModel(config, attn_impl=cfg.attn_impl)
    if cfg.loss_img_weight >= 0:
        model.config = model.config.replace(loss_img_weight=float(cfg.loss_img_weight))
    model.gradient_checkpointing = bool(cfg.gradient_checkpointing)
    if cfg.freeze:
        frozen = freeze_parameters(model, cfg.freeze)
        log.info("froze %d parameter tensors matching %s", len(frozen), cfg.freeze)
    if cfg.lora_rank > 0:
        g = torch.Generator().manual_seed(cfg.seed + 1)
        adapted = apply_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, targets=cfg.lora_targets,
                             dropout=cfg.lora_dropout, generator=g)
        log.info("LoRA rank %d on %d linear layers; base weights frozen", cfg.lora_rank, len(adapted))
    return model.train()


def load_tokenizer(path: str) -> Any:
    """holst.text.BPETokenizer from a ``bpe.model`` file or a tokenizer directory."""
    if not path:
        raise ValueError("tokenizer= is required: a bpe.model file or a tokenizer directory "
                         "(holst train tokenizer / holst convert rudalle write one)")
    from holst.text import BPETokenizer

    p = Path(path)
    if p.is_dir():
        return BPETokenizer.from_pretrained(p)
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer={path}: no such file or directory")
    return BPETokenizer.load(p)


def load_vqgan(path: str, device: torch.device) -> Any:
    """A frozen VQGAN in eval mode on ``device`` (for on-the-fly encoding and sample grids)."""
    from holst.vqgan import VQGAN

    vq = VQGAN.from_pretrained(path, device=device)
    vq.requires_grad_(False)
    return vq.eval()


def open_code_shards(paths: list[str], langs: list[str] | None = None) -> Any:
    """holst.data.codes.CodeShardDataset over shard files, folders or globs (``holst prepare codes`` output)."""
    from holst.data.codes import CodeShardDataset

    return CodeShardDataset(paths if len(paths) > 1 else paths[0], langs=langs or None)


def open_image_dataset(path: str, image_size: int, langs: list[str] | None = None) -> Any:
    """An image + caption dataset (folder, table or .tar shards) from holst.data, for on-the-fly encoding."""
    from holst.data.loaders import open_dataset

    return open_dataset(path, size=image_size, **({"langs": tuple(langs)} if langs else {}))


# ---------------------------------------------------------------------------------------------- samples


@torch.no_grad()
def save_samples(model: DalleModel, tokenizer: Any, vqgan: Any, prompts: list[str], path: Path,
                 *, top_k: int, top_p: float, seed: int) -> bool:
    """Generate one image per prompt and save a grid PNG; False (and a log line) when unavailable."""
    try:
        from holst.sampling import sample_image_codes
        from holst.utils.images import make_grid, save_png, tensor_to_pil
    except ImportError as e:
        log.info("sample images skipped: %s", e)
        return False
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        text_ids = tokenizer.encode_batch(prompts, model.config.text_seq_length).to(device)
        g = torch.Generator(device=device).manual_seed(seed)
        codes = sample_image_codes(model, text_ids, top_k=top_k or None, top_p=top_p, generator=g)
        D = model.config.image_tokens_per_dim
        images = vqgan.decode(codes.reshape(-1, D, D).to(next(vqgan.parameters()).device))  # (B, 3, H, W)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_png(make_grid(tensor_to_pil(images.float().clamp(0, 1).cpu()), nrow=min(len(prompts), 8)), path)
    finally:
        model.train(was_training)
    return True


# ---------------------------------------------------------------------------------------------- the loop


def train_dalle(cfg: DalleTrainConfig, *, dataset: Any = None, tokenizer: Any = None, vqgan: Any = None,
                resume: str | bool | None = None, engine: Engine | None = None) -> dict[str, Any]:
    """Train (or fine-tune) a DalleModel; see the module docstring.

    Args:
        cfg: the options.
        dataset: overrides ``cfg.codes`` / ``cfg.images`` (items as in :class:`DalleBatches`).
        tokenizer: overrides ``cfg.tokenizer``.
        vqgan: overrides ``cfg.vqgan`` (needed for image datasets and sample grids).
        resume: see :func:`holst.train.checkpoint.resolve_resume`.
        engine: an existing Engine (else one is made from ``cfg`` and closed at the end).
    Returns:
        ``{"step", "final_dir" (None if interrupted), "interrupted", "skipped_steps", "last_loss"}``.
    """
    own_engine = engine is None
    engine = engine or Engine(cfg)
    try:
        return _train(engine, cfg, dataset=dataset, tokenizer=tokenizer, vqgan=vqgan, resume=resume)
    finally:
        if own_engine:
            engine.close()


def _train(engine: Engine, cfg: DalleTrainConfig, *, dataset: Any, tokenizer: Any, vqgan: Any,
           resume: str | bool | None) -> dict[str, Any]:
    out_dir = Path(cfg.out_dir)
    if engine.is_main:
        cfg.save_yaml(out_dir / "train_config.yaml")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
    if vqgan is None and cfg.vqgan:
        if Path(cfg.vqgan).exists() or cfg.images:
            vqgan = load_vqgan(cfg.vqgan, engine.device)
        else:  # only needed for sample grids: train anyway
            log.warning("vqgan=%s does not exist: no sample images", cfg.vqgan)

    bare = build_model(cfg)
    mc = bare.config
    if getattr(tokenizer, "vocab_size", 0) > mc.bpe_vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {mc.bpe_vocab_size} "
                         f"text ids (vocab_size - text_seq_length); use a matching tokenizer or model")
    if dataset is None:
        if cfg.codes:
            dataset = open_code_shards(cfg.codes, cfg.langs)
        elif cfg.images:
            dataset = open_image_dataset(cfg.images, mc.image_tokens_per_dim * vqgan.downsample_factor, cfg.langs)
        else:
            raise ValueError("no training data: set codes= (code shards) or images= + vqgan=")
    encode_images = None
    if cfg.images or (vqgan is not None and _yields_images(dataset)):
        def encode_images(images: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), engine.autocast():
                return vqgan.encode(images.to(engine.device))
    batches = DalleBatches(dataset, tokenizer, batch_size=cfg.batch_size, text_seq_length=mc.text_seq_length,
                           image_seq_length=mc.image_seq_length, seed=cfg.seed, rank=engine.rank,
                           world_size=engine.world_size, bpe_dropout=cfg.bpe_dropout,
                           empty_caption_prob=cfg.empty_caption_prob, encode_images=encode_images)

    model, optimizer = engine.prepare(bare, lambda m: build_optimizer(m, cfg))
    scheduler = build_scheduler(optimizer, cfg)
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    step = 0
    ckpt = resolve_resume(out_dir, resume)
    if ckpt is not None:
        state = engine.load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler,
                                       **({"ema": ema} if ema is not None else {}))
        step = int(state["step"])
        batches.load_state_dict(state["data"])
        log.info("resumed from %s at step %d", ckpt, step)
    else:
        engine.seed_everything(cfg.seed)
    n_trainable = sum(p.numel() for p in bare.parameters() if p.requires_grad)
    log.info("DalleModel %s: %.2fM parameters (%.2fM trainable), %s on %s, %s, %d process(es), global batch %d",
             cfg.init_from or cfg.model, sum(p.numel() for p in bare.parameters()) / 1e6, n_trainable / 1e6,
             engine.backend, engine.device, engine.precision, engine.world_size,
             cfg.batch_size * cfg.grad_accum * engine.world_size)

    tokens_per_step = cfg.batch_size * cfg.grad_accum * engine.world_size * (mc.text_seq_length + mc.image_seq_length)
    sums = torch.zeros(3, device=engine.device)  # running loss, text, image (no host sync per step)
    n_micro = 0
    t_last, step_last = time.perf_counter(), step
    interrupted = False
    bar = engine.progress(cfg.max_steps, initial=step, desc="train dalle")
    non_blocking = engine.device.type == "cuda"
    model.train()
    while step < cfg.max_steps:
        for _ in range(cfg.grad_accum):
            text_ids, codes = batches.next()
            input_ids = torch.cat([text_ids, codes.to(text_ids.device)], dim=1).to(engine.device,
                                                                                   non_blocking=non_blocking)
            with engine.autocast():
                logits = model(input_ids)  # through the DDP/FSDP wrapper so gradients are synchronised
            loss, parts = bare.compute_loss(input_ids, logits=logits)
            applied = engine.step(loss, optimizer, scheduler, model=model)
            sums += torch.stack([loss.detach(), parts["text"].detach(), parts["image"].detach()]).float()
            n_micro += 1
        step += 1
        if ema is not None and applied:
            ema.update(model)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            mean = engine.all_reduce_mean(sums / max(n_micro, 1))
            now = time.perf_counter()
            tok_s = tokens_per_step * (step - step_last) / max(now - t_last, 1e-9)
            metrics = {"loss": mean[0], "text": mean[1], "image": mean[2],
                       "lr": scheduler.get_last_lr()[0], "tok_s": tok_s}
            if engine.loss_scale is not None:
                metrics["loss_scale"] = engine.loss_scale
            engine.log(step, metrics, total=cfg.max_steps)
            if engine.is_main:
                bar.set_postfix(loss=f"{float(mean[0]):.4f}", tok_s=f"{tok_s:.0f}")
            sums.zero_()
            n_micro = 0
            t_last, step_last = time.perf_counter(), step
        stop = engine.should_stop()
        if stop or (cfg.save_every and step % cfg.save_every == 0 and step < cfg.max_steps):
            engine.save_checkpoint(checkpoint_path(out_dir), model=model, optimizer=optimizer, scheduler=scheduler,
                                   step=step, data=batches.state_dict(), config=cfg.to_dict(),
                                   **({"ema": ema} if ema is not None else {}))
        if stop:
            interrupted = True
            log.warning("stopped by signal at step %d; continue with --resume", step)
            break
        if cfg.sample_every and step % cfg.sample_every == 0 and cfg.sample_prompts and vqgan is not None \
                and engine.is_main and engine.backend in ("single", "ddp"):
            save_samples(bare, tokenizer, vqgan, cfg.sample_prompts, out_dir / "samples" / f"step_{step:07d}.png",
                         top_k=cfg.sample_top_k, top_p=cfg.sample_top_p, seed=cfg.seed)
    bar.close()

    final_dir = None
    if not interrupted:
        engine.save_checkpoint(checkpoint_path(out_dir), model=model, optimizer=optimizer, scheduler=scheduler,
                               step=step, data=batches.state_dict(), config=cfg.to_dict(),
                               **({"ema": ema} if ema is not None else {}))
        final_dir = _save_final(engine, model, bare, ema, cfg, out_dir)
    return {"step": step, "final_dir": final_dir, "interrupted": interrupted, "skipped_steps": engine.skipped_steps}


def _yields_images(dataset: Any) -> bool:
    try:
        return "image" in dataset[0]
    except Exception:
        return False


def _save_final(engine: Engine, model: nn.Module, bare: DalleModel, ema: EMA | None, cfg: DalleTrainConfig,
                out_dir: Path) -> Path:
    """Write ``final/`` (pipeline-loadable; EMA weights if enabled, LoRA merged) and ``lora/``."""
    if ema is not None:
        ema.copy_to(model)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.save_dtype]
    if cfg.lora_rank > 0:
        state = lora_state_dict(bare) if engine.backend != "fsdp" else \
            {k: v for k, v in engine.model_state_dict(model).items() if k.endswith((".lora_A", ".lora_B"))}
        if engine.is_main:
            save_lora(bare, out_dir / "lora", state=state)
        if engine.backend != "fsdp":
            merge_lora(bare)
        else:
            log.warning("FSDP + LoRA: final/ holds the base weights; merge lora/ with holst.train.lora.load_lora")
    final_dir = out_dir / FINAL_DIR
    engine.save_pretrained(model, final_dir, dtype=dtype)
    log.info("final model written to %s", final_dir)
    return final_dir


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``holst train dalle`` options."""
    add_train_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``holst train dalle`` (also under torchrun)."""
    cfg = load_train_config(DalleTrainConfig, args.config, args.overrides)
    set_threads(cfg.num_threads)
    result = train_dalle(cfg, resume=args.resume)
    if result["interrupted"]:
        print(f"interrupted at step {result['step']}; checkpoint {checkpoint_path(cfg.out_dir)}")
    else:
        print(f"done: {result['step']} steps, {result['skipped_steps']} skipped; model in {result['final_dir']}")
    return 0
