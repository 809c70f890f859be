"""``holst train vqgan``: train the VQGAN image tokenizer from scratch (or continue training one).

Loss per step (taming's VQLPIPSWithDiscriminator, reference.md §4, with our options):
``l1 |x - x'| + l2 (x - x')^2 + perceptual(x, x') + quantizer loss + adaptive_w * disc_weight * (-D(x'))``,
then a hinge loss for the PatchGAN discriminator ``D`` (from ``disc_start``). The Gumbel quantizer
anneals its temperature (cosine) and ramps its KL weight in; nearest-neighbour quantizers restart
dead codes. Held-out PSNR / SSIM / codebook usage and a reconstruction grid are written every
``eval_every`` steps; the final model goes to ``<out_dir>/final`` (``VQGAN.from_pretrained``).
One step = ``grad_accum`` micro-batches, as the schedules count. Model and discriminator
initialisations are seeded by ``seed``; checkpoints, resume and stopping are those of every trainer
(:class:`holst.train.loop.TrainRun`).

Python: ``train_vqgan(cfg, dataset=..., val_images=...)`` takes any dataset of
``{"image": (3, H, W) float [0, 1]}`` (or bare tensors); ``holst train vqgan --config ...`` reads
the ``data`` folder through holst.data (bad images skipped and counted).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from holst.config import ConfigError
from holst.data.config import DataConfig
from holst.train.args import add_train_arguments, run_train_command
from holst.train.config import VQGANTrainConfig
from holst.train.data import SampleBatches, open_samples, stack_images
from holst.train.engine import Engine
from holst.train.loop import TrainResult, TrainRun, refuse_unsupported, seeded
from holst.train.lora import freeze_parameters
from holst.train.optim import build_optimizer, build_scheduler
from holst.utils.images import make_grid, save_png, tensor_to_pil
from holst.utils.runtime import get_logger
from holst.vqgan import VQGAN, get_vqgan_preset
from holst.vqgan.config import VQGANConfig
from holst.vqgan.losses import (
    PatchDiscriminator,
    PerceptualLoss,
    adaptive_gan_weight,
    hinge_d_loss,
    load_efficientnet_lite0,
)
from holst.vqgan.metrics import codebook_usage, evaluate_reconstruction

log = get_logger("holst.train.vqgan")

UNSUPPORTED = {"ema_decay": 0.0, "sample_every": 0, "gradient_checkpointing": False}


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def data_configs(cfg: VQGANTrainConfig) -> tuple[DataConfig, DataConfig | None]:
    """(train, held-out) DataConfigs of ``cfg.data``.

    A built dataset folder gives its train / test splits; any other image folder has ``num_val``
    seeded images held out by :func:`split_off`.
    """
    if not cfg.data:
        raise ConfigError("no training data: set data=<folder> in the config or pass dataset=")
    common = dict(sources=(cfg.data,), image_size=cfg.image_size, seed=cfg.seed, langs=("ru",),
                  require_captions=False)
    built = (Path(cfg.data) / "captions.jsonl").is_file()
    return DataConfig(**common), (DataConfig(**common, split="test") if built and cfg.num_val else None)


def split_off(dataset: Any, n: int, seed: int) -> tuple[Any, Any]:
    """(train, held-out) subsets: a seeded ``n`` samples (at most a tenth) held out."""
    n = min(n, len(dataset) // 10) if len(dataset) > 1 else 0
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed)).tolist()
    return torch.utils.data.Subset(dataset, sorted(perm[n:])), torch.utils.data.Subset(dataset, sorted(perm[:n]))


def held_out_images(dataset: Any, num_val: int) -> torch.Tensor | None:
    """(n, 3, H, W) of ``num_val`` evenly spaced held-out samples, or None."""
    if dataset is None or not len(dataset) or not num_val:
        return None
    step = max(1, len(dataset) // num_val)
    return stack_images([dataset[i] for i in range(0, len(dataset), step)][:num_val])


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


def gumbel_temperature(step: int, cfg: VQGANTrainConfig) -> float:
    """Cosine from temp_start to temp_end over temp_anneal_steps (0 = max_steps), then flat."""
    span = cfg.temp_anneal_steps or cfg.max_steps
    t = min(1.0, step / max(1, span))
    return cfg.temp_end + (cfg.temp_start - cfg.temp_end) * 0.5 * (1 + math.cos(math.pi * t))


def kl_weight_at(step: int, cfg: VQGANTrainConfig, model_config: VQGANConfig) -> float:
    """The Gumbel KL weight: linear ramp from 0 over kl_warmup_steps to kl_weight (None = the model's)."""
    full = model_config.kl_weight if cfg.kl_weight is None else cfg.kl_weight
    if cfg.kl_warmup_steps > 0:
        return full * min(1.0, step / cfg.kl_warmup_steps)
    return full


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


def build_model(cfg: VQGANTrainConfig) -> VQGAN:
    """The model to train: ``init_from`` (a VQGAN directory, fp32) or a fresh preset + overrides seeded by ``seed``."""
    if cfg.init_from:
        return VQGAN.from_pretrained(cfg.init_from, dtype=torch.float32).train()
    config = get_vqgan_preset(cfg.model, **cfg.model_overrides)
    return seeded(cfg.seed, lambda: VQGAN(config))


def freeze_for_finetune(model: VQGAN, patterns: tuple[str, ...] | list[str]) -> list[nn.Module]:
    """Freeze the parameters matching ``patterns`` and return the modules left with nothing to train.

    Those modules are kept in eval mode during training (see :func:`set_train_mode`), so a frozen EMA
    quantizer neither updates nor restarts its codebook: with the encoder, ``quant_conv`` and
    ``quantize`` frozen, every image keeps its codes and only the decoder learns.
    """
    if not patterns:
        return []
    names = freeze_parameters(model, list(patterns))  # raises when a pattern matches nothing
    log.info("froze %d parameter tensors (%s)", len(names), ", ".join(patterns))
    # By module name, so that modules holding only buffers (the EMA codebook) are caught too.
    return [m for name, m in model.named_modules()
            if name and any(fnmatch.fnmatchcase(name + ".", pat) for pat in patterns)]


def set_train_mode(model: nn.Module, frozen_modules: list[nn.Module]) -> None:
    """``model.train()``, except fully frozen modules, which stay in eval mode."""
    model.train()
    for module in frozen_modules:
        module.eval()


def train_vqgan(cfg: VQGANTrainConfig, *, dataset: Any = None, val_images: torch.Tensor | None = None,
                resume: str | bool | None = None, engine: Engine | None = None) -> TrainResult:
    """Train a VQGAN.

    Args:
        cfg: the options (see :class:`holst.config.VQGANTrainConfig`).
        dataset: training data: a DataConfig or a dataset of ``{"image": (3, H, W) [0, 1]}`` / tensors;
            None = ``cfg.data`` through holst.data.
        val_images: held-out (N, 3, H, W) in [0, 1]; None = from ``cfg.data`` (or none).
        resume: see :func:`holst.train.checkpoint.resolve_resume`.
        engine: an existing Engine (else one is made and closed at the end).
    Returns:
        A :class:`holst.train.loop.TrainResult`; ``metrics`` holds the last held-out PSNR / SSIM /
        codebook usage (empty without held-out data), ``model`` the trained VQGAN in eval mode.
    """
    refuse_unsupported(cfg, "vqgan", UNSUPPORTED)
    cache = None if cfg.cache_images else 0
    held = None
    if dataset is None:
        train_cfg, held_cfg = data_configs(cfg)
        dataset, report = open_samples(train_cfg, cache_bytes=cache)
        if held_cfg is not None:
            held, _ = open_samples(held_cfg, cache_bytes=cache)
        elif cfg.num_val:
            dataset, held = split_off(dataset, cfg.num_val, cfg.seed)
    else:
        dataset, report = open_samples(dataset, cache_bytes=cache)
    if val_images is None:
        val_images = held_out_images(held, cfg.num_val)
    with TrainRun("vqgan", cfg, engine=engine) as run:
        return _train(run, cfg, dataset, report.to_dict(), val_images, resume)


def _train(run: TrainRun, cfg: VQGANTrainConfig, dataset: Any, report: dict, val_images: torch.Tensor | None,
           resume: str | bool | None) -> TrainResult:
    engine, device = run.engine, run.engine.device
    bare = build_model(cfg)
    mcfg = bare.config
    log.info("VQGAN %s: %.2fM parameters, f%d, %d codes (%s quantizer)", cfg.init_from or cfg.model,
             sum(p.numel() for p in bare.parameters()) / 1e6, bare.downsample_factor, mcfg.n_embed, mcfg.quantizer)
    frozen_modules = freeze_for_finetune(bare, cfg.freeze)
    model, optimizer = engine.prepare(bare, build_optimizer(bare, cfg))
    scheduler = build_scheduler(optimizer, cfg)
    use_gan = cfg.disc_weight > 0
    disc = opt_d = None
    if use_gan:
        disc_bare = seeded(cfg.seed + 1, lambda: PatchDiscriminator(3, cfg.disc_ndf, cfg.disc_layers))
        opt_d_bare = torch.optim.Adam(disc_bare.parameters(), lr=cfg.disc_lr or cfg.lr, betas=tuple(cfg.betas))
        disc, opt_d = engine.prepare(disc_bare, opt_d_bare)
    perceptual = PerceptualLoss(load_efficientnet_lite0()).to(device) if cfg.perceptual_weight > 0 else None
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 7919 * engine.rank)
    batches = SampleBatches(dataset, batch_size=cfg.batch_size, seed=cfg.seed, rank=engine.rank,
                            world_size=engine.world_size, num_workers=cfg.num_workers)
    run.track(model=model, optimizer=optimizer, scheduler=scheduler, disc=disc, opt_d=opt_d, generator=generator,
              data=batches)
    run.start(resume)

    bare = engine.unwrap(model)
    scale = bare.output_factor // bare.downsample_factor  # 2 for the DWT decoder: targets at twice the size
    metrics: dict[str, float] = {}
    recent_codes: list[torch.Tensor] = []
    loss = None
    set_train_mode(model, frozen_modules)
    for step in run.steps():
        done = step - 1  # steps finished before this one: the schedules' position
        temperature = gumbel_temperature(done, cfg)
        if mcfg.quantizer == "gumbel":
            bare.quantize.kl_weight = kl_weight_at(done, cfg, mcfg)
        gan_on = use_gan and done >= cfg.disc_start
        for _ in range(cfg.grad_accum):
            target = stack_images(batches.next_items()[1]).to(device, non_blocking=True)
            if cfg.hflip:
                flip = torch.rand(target.shape[0], generator=generator, device=device) < 0.5
                target = torch.where(flip[:, None, None, None], target.flip(-1), target)
            images = F.avg_pool2d(target, scale) if scale > 1 else target
            with engine.autocast():
                recon, q_loss, codes = model(images, temperature=temperature, hard=cfg.gumbel_hard,
                                             restart_threshold=cfg.restart_threshold, generator=generator)
                recon = recon.float()
                x = target * 2 - 1
                rec = recon.new_zeros(())
                if cfg.l1_weight:
                    rec = rec + cfg.l1_weight * (recon - x).abs().mean()
                if cfg.l2_weight:
                    rec = rec + cfg.l2_weight * (recon - x).pow(2).mean()
                logs = {"rec": rec.detach(), "q": q_loss.detach()}
                if perceptual is not None:
                    p_loss = perceptual((recon.clamp(-1, 1) + 1) / 2, target)
                    rec = rec + cfg.perceptual_weight * p_loss
                    logs["perc"] = p_loss.detach()
                loss = rec + q_loss
                if gan_on:
                    g_loss = -disc(recon).mean()
                    d_weight = adaptive_gan_weight(rec, g_loss, bare.last_layer) * cfg.disc_weight
                    loss = loss + d_weight * g_loss
                    logs.update(g=g_loss.detach(), d_w=d_weight)
            engine.step(loss, optimizer, scheduler, model=model)
            if gan_on:
                with engine.autocast():
                    d_loss = hinge_d_loss(disc(x), disc(recon.detach()))
                engine.step(d_loss, opt_d, model=disc)
                logs["d"] = d_loss.detach()
            recent_codes = (recent_codes + [codes.detach().flatten().cpu()])[-50:]
        if run.should_log(step):
            extra = {"temp": temperature} if mcfg.quantizer == "gumbel" else {}
            run.log(step, {**logs, "loss": loss.detach(), **extra, **_usage(recent_codes, mcfg.n_embed),
                           "lr": scheduler.get_last_lr()[0]})
        if val_images is not None and cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
            metrics = _evaluate(bare, val_images, scale, run.out_dir, step, engine)
            set_train_mode(model, frozen_modules)
    return run.finish(model, data=report, last_loss=None if loss is None else loss.detach(), metrics=metrics)


def _usage(codes: list[torch.Tensor], n_embed: int) -> dict[str, float]:
    usage = codebook_usage(torch.cat(codes), n_embed)
    return {"ppl": usage["perplexity"], "used": usage["used_fraction"]}


def _evaluate(model: VQGAN, val_images: torch.Tensor, scale: int, out_dir: Path, step: int,
              engine: Engine) -> dict[str, float]:
    """Held-out PSNR / SSIM / codebook usage (logged, appended to eval.jsonl) and a PNG grid."""
    if not engine.is_main:
        return {}
    model.eval()
    inputs = F.avg_pool2d(val_images, scale) if scale > 1 else val_images
    stats, recons = evaluate_reconstruction(model, inputs, targets=val_images)
    engine.log(step, {f"val_{k}": v for k, v in stats.items()})
    with open(out_dir / "eval.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, **stats}) + "\n")
    n = min(16, val_images.shape[0])
    pairs = [im for i in range(n) for im in tensor_to_pil(torch.stack([val_images[i], recons[i]]))]
    save_png(make_grid(pairs, nrow=8), out_dir / f"recon_{step:06d}.png")
    return stats


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``holst train vqgan --config configs/train/vqgan_emoji64.yaml [--set key=value] [--resume]``."""
    add_train_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``holst train vqgan`` (also under torchrun)."""
    return run_train_command(VQGANTrainConfig, train_vqgan, args)
