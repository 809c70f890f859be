"""``holst train dalle``: train or fine-tune the ruDALL-E transformer on captions + image codes.

The loop, top to bottom:
1. build the model (a preset seeded by ``seed``, or ``init_from`` a DalleModel directory such as a
   converted official checkpoint), optionally freeze parameters by name / add LoRA adapters;
2. data: code shards (``holst prepare codes``) or an image dataset (``holst.data``, scanned: bad
   images skipped and counted) encoded on the fly by a VQGAN; captions get BPE-dropout and, with
   probability ``empty_caption_prob``, are emptied so that classifier-free guidance has an
   unconditional model to contrast with (a caption that is empty in the data is kept as such);
3. ``engine.step`` per micro-batch on the weighted text/image loss (``DalleModel.compute_loss``);
4. logs, sample grids; checkpoints, resume, stopping and ``final/`` as every trainer
   (:class:`holst.train.loop.TrainRun`);
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

from holst.config import ConfigError
from holst.dalle import DalleModel
from holst.dalle.config import get_preset
from holst.data.config import DataConfig
from holst.train.args import add_train_arguments, run_train_command
from holst.train.config import DalleTrainConfig
from holst.train.data import SampleBatches, open_samples, sample_seed, stack_images
from holst.train.engine import Engine
from holst.train.loop import TrainResult, TrainRun, seeded
from holst.train.lora import apply_lora, freeze_parameters, lora_state_dict, merge_lora, save_lora
from holst.train.optim import EMA, build_optimizer, build_scheduler
from holst.utils.runtime import get_logger

log = get_logger("holst.train.dalle")


class DalleBatches(SampleBatches):
    """Deterministic, resumable, rank-sharded batches of (text_ids, image_codes).

    Args:
        dataset: map-style (``__len__``/``__getitem__``) yielding ``{"codes": (N,) long, "caption": str}``
            or, with ``encode_images``, ``{"image": (3, H, W) float [0, 1], "caption": str}``.
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
            dataset = list(dataset)
        super().__init__(dataset, batch_size=batch_size, seed=seed, rank=rank, world_size=world_size)
        self.tokenizer = tokenizer
        self.T, self.N = text_seq_length, image_seq_length
        self.bpe_dropout, self.empty_caption_prob = bpe_dropout, empty_caption_prob
        self.encode_images = encode_images
        self._text_cache: dict[str, torch.Tensor] = {}

    def _encode_caption(self, caption: str, index: int) -> torch.Tensor:
        """(T,) long text ids of one sample, with its own seeded randomness."""
        need_rng = self.bpe_dropout > 0 or self.empty_caption_prob > 0
        g = torch.Generator().manual_seed(sample_seed(self.seed, self.epoch, index)) if need_rng else None
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
        indices, items = self.next_items()
        captions = [str(item.get("caption", "")) for item in items]
        text_ids = torch.stack([self._encode_caption(c, i) for c, i in zip(captions, indices)])  # (B, T)
        if self.encode_images is not None:
            codes = self.encode_images(stack_images(items)).reshape(len(items), -1)  # (B, h, w) -> (B, N)
        else:
            codes = torch.stack([torch.as_tensor(item["codes"]).reshape(-1) for item in items]).long()  # (B, N)
        if codes.shape[1] != self.N:
            raise ConfigError(f"samples have {codes.shape[1]} image codes; the model expects {self.N} "
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
            raise ConfigError("model_overrides cannot change an init_from model (its config.json is used); "
                              "remove model_overrides or init_from")
    else:
        config = get_preset(cfg.model, **cfg.model_overrides)
        model = seeded(cfg.seed, lambda: DalleModel(config, attn_impl=cfg.attn_impl))
    if cfg.loss_img_weight is not None:
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
        raise ConfigError("tokenizer= is required: a bpe.model file or a tokenizer directory "
                          "(holst train tokenizer / holst convert rudalle write one)")
    from holst.text import BPETokenizer

    p = Path(path)
    if p.is_dir():
        return BPETokenizer.from_pretrained(p)
    if not p.is_file():
        raise ConfigError(f"tokenizer={path}: no such file or directory")
    return BPETokenizer.load(p)


def load_vqgan(path: str, device: torch.device) -> Any:
    """A frozen VQGAN in eval mode on ``device`` (for on-the-fly encoding and sample grids)."""
    from holst.vqgan import VQGAN

    vq = VQGAN.from_pretrained(path, device=device)
    vq.requires_grad_(False)
    return vq.eval()


def training_data(cfg: DalleTrainConfig, image_size: int) -> Any:
    """What ``cfg`` names: code shards (a CodeShardDataset) or a DataConfig over ``cfg.images``."""
    if cfg.codes:
        from holst.data.codes import CodeShardDataset

        try:
            return CodeShardDataset(cfg.codes if len(cfg.codes) > 1 else cfg.codes[0], langs=cfg.langs or None)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"codes={cfg.codes}: {e}") from e
    if cfg.images:
        return DataConfig(sources=(cfg.images,), image_size=image_size, langs=tuple(cfg.langs or ("ru",)),
                          seed=cfg.seed)
    raise ConfigError("no training data: set codes= (code shards) or images= + vqgan=")


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
                resume: str | bool | None = None, engine: Engine | None = None) -> TrainResult:
    """Train (or fine-tune) a DalleModel; see the module docstring.

    Args:
        cfg: the options.
        dataset: overrides ``cfg.codes`` / ``cfg.images``: a DataConfig or a dataset (items as in
            :class:`DalleBatches`; holst.data loaders are scanned and their bad images skipped).
        tokenizer: overrides ``cfg.tokenizer``.
        vqgan: overrides ``cfg.vqgan`` (needed for image datasets and sample grids).
        resume: see :func:`holst.train.checkpoint.resolve_resume` (an error when nothing is found).
        engine: an existing Engine (else one is made from ``cfg`` and closed at the end).
    Returns:
        A :class:`holst.train.loop.TrainResult`: ``step``, ``interrupted``, ``final_dir`` (None if
        interrupted), ``last_loss``, ``skipped_steps``, ``data`` (skips by reason), ``model``.
    """
    with TrainRun("dalle", cfg, engine=engine) as run:
        engine = run.engine
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
        if vqgan is None and cfg.vqgan:
            if Path(cfg.vqgan).exists() or cfg.images:
                vqgan = load_vqgan(cfg.vqgan, engine.device)
            else:  # only needed for sample grids: train anyway
                log.warning("vqgan=%s does not exist: no sample images", cfg.vqgan)
        bare = build_model(cfg)
        mc = bare.config
        if getattr(tokenizer, "vocab_size", 0) > mc.bpe_vocab_size:
            raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {mc.bpe_vocab_size} "
                              f"text ids (vocab_size - text_seq_length); use a matching tokenizer or model")
        image_size = mc.image_tokens_per_dim * (vqgan.downsample_factor if vqgan is not None else 8)
        dataset, report = open_samples(dataset if dataset is not None else training_data(cfg, image_size))
        encode_images = None
        if _yields_images(dataset):
            if vqgan is None:
                raise ConfigError("the dataset holds images: set vqgan= (a VQGAN directory) to encode them")

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
        run.track(model=model, optimizer=optimizer, scheduler=scheduler, data=batches, ema=ema)
        run.start(resume)
        n_trainable = sum(p.numel() for p in bare.parameters() if p.requires_grad)
        log.info("DalleModel %s: %.2fM parameters (%.2fM trainable), %s on %s, %s, %s attention, %d process(es), "
                 "global batch %d",
                 cfg.init_from or cfg.model, sum(p.numel() for p in bare.parameters()) / 1e6, n_trainable / 1e6,
                 engine.backend, engine.device, engine.precision, bare.attn_impl, engine.world_size,
                 cfg.batch_size * cfg.grad_accum * engine.world_size)

        tokens_per_step = cfg.batch_size * cfg.grad_accum * engine.world_size * (mc.text_seq_length +
                                                                                 mc.image_seq_length)
        sums = torch.zeros(3, device=engine.device)  # running loss, text, image (no host sync per step)
        n_micro, loss = 0, None
        t_last, step_last = time.perf_counter(), run.step
        bar = engine.progress(cfg.max_steps, initial=run.step, desc="train dalle")
        non_blocking = engine.device.type == "cuda"
        model.train()
        for step in run.steps():
            for _ in range(cfg.grad_accum):
                text_ids, codes = batches.next()
                input_ids = torch.cat([text_ids, codes.to(text_ids.device)], dim=1).to(engine.device,
                                                                                       non_blocking=non_blocking)
                with engine.autocast():  # through the DDP/FSDP/compile wrapper so gradients are synchronised;
                    loss, parts = model(input_ids, return_loss=True)  # the lean loss: no (B, S, V) logits
                applied = engine.step(loss, optimizer, scheduler, model=model)
                sums += torch.stack([loss.detach(), parts["text"].detach(), parts["image"].detach()]).float()
                n_micro += 1
            if ema is not None and applied:
                ema.update(model)
            bar.update(1)
            if run.should_log(step):
                mean = engine.all_reduce_mean(sums / max(n_micro, 1))
                now = time.perf_counter()
                tok_s = tokens_per_step * (step - step_last) / max(now - t_last, 1e-9)
                metrics = {"loss": mean[0], "text": mean[1], "image": mean[2],
                           "lr": scheduler.get_last_lr()[0], "tok_s": tok_s}
                if engine.loss_scale is not None:
                    metrics["loss_scale"] = engine.loss_scale
                run.log(step, metrics)
                if engine.is_main:
                    bar.set_postfix(loss=f"{float(mean[0]):.4f}", tok_s=f"{tok_s:.0f}")
                sums.zero_()
                n_micro = 0
                t_last, step_last = time.perf_counter(), step
            if cfg.sample_every and step % cfg.sample_every == 0 and cfg.sample_prompts and vqgan is not None \
                    and engine.is_main and engine.backend in ("single", "ddp"):
                save_samples(bare, tokenizer, vqgan, cfg.sample_prompts,
                             run.out_dir / "samples" / f"step_{step:07d}.png",
                             top_k=cfg.sample_top_k, top_p=cfg.sample_top_p, seed=cfg.seed)
        bar.close()
        return run.finish(model, data=report.to_dict(), last_loss=None if loss is None else loss.detach(),
                          save_final=lambda final_dir: _save_final(engine, model, bare, ema, cfg, final_dir))


def _yields_images(dataset: Any) -> bool:
    try:
        return "image" in dataset[0]
    except Exception:
        return False


def _save_final(engine: Engine, model: nn.Module, bare: DalleModel, ema: EMA | None, cfg: DalleTrainConfig,
                final_dir: Path) -> None:
    """Write ``final/`` (pipeline-loadable; EMA weights if enabled, LoRA merged) and ``lora/`` beside it."""
    if ema is not None:
        ema.copy_to(model)
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.save_dtype]
    if cfg.lora_rank > 0:
        state = lora_state_dict(bare) if engine.backend != "fsdp" else \
            {k: v for k, v in engine.model_state_dict(model).items() if k.endswith((".lora_A", ".lora_B"))}
        if engine.is_main:
            save_lora(bare, final_dir.parent / "lora", state=state)
        if engine.backend != "fsdp":
            merge_lora(bare)
        else:
            log.warning("FSDP + LoRA: final/ holds the base weights; merge lora/ with holst.train.lora.load_lora")
    engine.save_pretrained(model, final_dir, dtype=dtype)


# ---------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``holst train dalle`` options."""
    add_train_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``holst train dalle`` (also under torchrun)."""
    return run_train_command(DalleTrainConfig, train_dalle, args)
