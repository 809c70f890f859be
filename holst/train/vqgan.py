"""``holst train vqgan``: train the VQGAN image tokenizer from scratch (or continue training one).

Loss per step (taming's VQLPIPSWithDiscriminator, reference.md §4, with our options):
``l1 |x - x'| + l2 (x - x')^2 + perceptual(x, x') + quantizer loss + adaptive_w * disc_weight * (-D(x'))``,
then a hinge loss for the PatchGAN discriminator ``D`` (from ``disc_start``). The Gumbel quantizer
anneals its temperature (cosine) and ramps its KL weight in; nearest-neighbour quantizers restart
dead codes. Held-out PSNR / SSIM / codebook usage and a reconstruction grid are written every
``eval_every`` steps; the final model goes to ``<out_dir>/final`` (``VQGAN.from_pretrained``).

Python: ``train_vqgan(cfg, dataset=..., val_images=...)`` takes any torch Dataset / iterable of
``{"image": (3, H, W) float [0, 1]}`` (or bare tensors); ``holst train vqgan --config ...`` reads
the ``data`` folder.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from holst.config import VQGANConfig, VQGANTrainConfig
from holst.train.checkpoint import (
    FINAL_DIR,
    add_train_arguments,
    checkpoint_path,
    load_train_config,
    resolve_resume,
    set_threads,
)
from holst.train.engine import Engine
from holst.train.lora import freeze_parameters
from holst.train.optim import build_optimizer, build_scheduler
from holst.utils.images import make_grid, save_png, tensor_to_pil
from holst.utils.runtime import get_logger
from holst.vqgan import VQGAN, get_vqgan_preset
from holst.vqgan.losses import (
    PatchDiscriminator,
    PerceptualLoss,
    adaptive_gan_weight,
    hinge_d_loss,
    load_efficientnet_lite0,
)
from holst.vqgan.metrics import codebook_usage, evaluate_reconstruction

log = get_logger("holst.train.vqgan")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


class ImageFiles(torch.utils.data.Dataset):
    """Image files -> ``{"image": (3, size, size) float [0, 1]}`` (resized with a centre crop)."""

    def __init__(self, files: list[Path], size: int):
        self.files, self.size = files, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from PIL import Image, ImageOps

        from holst.utils.images import pil_to_tensor, to_rgb

        path = self.files[i]
        try:
            with Image.open(path) as im:
                im.load()
                image = to_rgb(im)
        except Exception as e:  # PIL raises many types for broken files
            raise ValueError(f"cannot read image {path}: {e}") from e
        if image.size != (self.size, self.size):
            image = ImageOps.fit(image, (self.size, self.size), Image.Resampling.LANCZOS)
        return {"image": pil_to_tensor(image)}


def folder_datasets(root: str | Path, size: int, num_val: int, seed: int) -> tuple[ImageFiles, ImageFiles]:
    """(train, held-out) datasets from a holst dataset folder or any folder of images.

    A folder with ``captions.jsonl`` (the holst.data layout): rows with ``split == 'train'`` train and
    the other splits are held out (``num_val`` of them, evenly spaced). Otherwise every image under
    ``root`` is used and a seeded ``num_val`` of them are held out.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data={str(root)!r} is not a folder of images")
    index = root / "captions.jsonl"
    if index.is_file():
        train, held = [], []
        for n, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                path = root / row["file"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index}:{n}: expected a JSON object with a 'file' field ({e})") from e
            (train if row.get("split", "train") == "train" else held).append(path)
        if num_val and held:
            step = max(1, len(held) // num_val)
            held = held[::step][:num_val]
        elif num_val:
            train, held = _split_off(train, num_val, seed)
    else:
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        train, held = _split_off(files, num_val, seed)
    if not train:
        raise ValueError(f"data={str(root)!r}: no training images found")
    return ImageFiles(train, size), ImageFiles(held, size)


def _split_off(files: list[Path], n: int, seed: int) -> tuple[list[Path], list[Path]]:
    n = min(n, len(files) // 10) if len(files) > 1 else 0
    perm = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(perm[:n])
    keep = sorted(perm[n:])
    return [files[i] for i in keep], [files[i] for i in held]


def _image_of(item: Any) -> torch.Tensor:
    image = item["image"] if isinstance(item, dict) else item
    if not torch.is_tensor(image) or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"dataset items must be (3, H, W) tensors or {{'image': (3, H, W)}}; got {type(image)}")
    return image.float()


def stack_images(dataset: Iterable[Any], limit: int | None = None) -> torch.Tensor:
    """Materialise images of a dataset as (N, 3, H, W) float."""
    images = []
    for item in dataset:
        images.append(_image_of(item))
        if limit is not None and len(images) >= limit:
            break
    if not images:
        raise ValueError("the dataset is empty")
    return torch.stack(images)


def _batches(dataset: Any, cfg: VQGANTrainConfig, rank: int, world: int, start_step: int) -> Iterator[torch.Tensor]:
    """Endless (B, 3, H, W) batches. Small map-style sets are cached in memory as uint8."""
    b = cfg.batch_size
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__") and cfg.cache_images:
        n = len(dataset)
        log.info("caching %d training images in memory", n)
        cache = (stack_images(dataset[i] for i in range(n)).clamp(0, 1) * 255).round().to(torch.uint8)
        per_epoch = max(1, n // (b * world))
        epoch, pos = divmod(start_step, per_epoch)
        while True:
            # Same permutation on every rank (seeded by epoch); each rank takes its own slice.
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
            for i in range(pos, per_epoch):
                idx = perm[(i * world + rank) * b:(i * world + rank + 1) * b]
                yield cache[idx].float().div_(255)
            epoch, pos = epoch + 1, 0
    sized = hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__")
    sampler = None
    if sized and world > 1:  # each rank reads its own share of every epoch
        sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True,
                                                      seed=cfg.seed, drop_last=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=b, shuffle=sized and sampler is None, sampler=sampler,
                                         drop_last=True, num_workers=cfg.num_workers, collate_fn=stack_images)
    epoch = 0
    while True:
        if sampler is not None:
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


# ---------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------


def gumbel_temperature(step: int, cfg: VQGANTrainConfig) -> float:
    """Cosine from temp_start to temp_end over temp_anneal_steps (0 = max_steps), then flat."""
    span = cfg.temp_anneal_steps or cfg.max_steps
    t = min(1.0, step / max(1, span))
    return cfg.temp_end + (cfg.temp_start - cfg.temp_end) * 0.5 * (1 + math.cos(math.pi * t))


def kl_weight_at(step: int, cfg: VQGANTrainConfig, model_config: VQGANConfig) -> float:
    """The Gumbel KL weight: linear ramp from 0 over kl_warmup_steps to kl_weight (-1 = the model's)."""
    full = model_config.kl_weight if cfg.kl_weight < 0 else cfg.kl_weight
    if cfg.kl_warmup_steps > 0:
        return full * min(1.0, step / cfg.kl_warmup_steps)
    return full


# ---------------------------------------------------------------------------------------------
# The trainer
# ---------------------------------------------------------------------------------------------


def build_model(cfg: VQGANTrainConfig) -> VQGAN:
    """The model to train: ``init_from`` (a VQGAN directory) or a fresh preset + overrides."""
    if cfg.init_from:
        return VQGAN.from_pretrained(cfg.init_from).train()
    config = get_vqgan_preset(cfg.model, **cfg.model_overrides)
    return VQGAN(config)


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
                resume: str | bool | None = None) -> tuple[VQGAN, dict[str, float]]:
    """Train a VQGAN.

    Args:
        cfg: the options (see :class:`holst.config.VQGANTrainConfig`).
        dataset: training data, a Dataset / iterable of ``{"image": (3, H, W) [0, 1]}`` or tensors;
            None = read ``cfg.data``.
        val_images: held-out (N, 3, H, W) in [0, 1]; None = from ``cfg.data`` (or none).
        resume: None, 'auto'/True (``<out_dir>/checkpoint.pt`` if present) or a checkpoint path.
    Returns:
        (the trained bare model in eval mode, the final held-out metrics; empty without held-out data).
    """
    if dataset is None:
        if not cfg.data:
            raise ValueError("no training data: set data=<folder> in the config or pass dataset=")
        dataset, val_set = folder_datasets(cfg.data, cfg.image_size, cfg.num_val, cfg.seed)
        if val_images is None and len(val_set):
            val_images = stack_images(val_set)
    engine = Engine(cfg)
    try:
        return _train(cfg, engine, dataset, val_images, resume)
    finally:
        engine.close()


def _train(cfg: VQGANTrainConfig, engine: Engine, dataset: Any, val_images: torch.Tensor | None,
           resume: str | bool | None) -> tuple[VQGAN, dict[str, float]]:
    device = engine.device
    bare = build_model(cfg)
    mcfg = bare.config
    log.info("VQGAN %s: %.2fM parameters, f%d, %d codes (%s quantizer)", cfg.model,
             sum(p.numel() for p in bare.parameters()) / 1e6, bare.downsample_factor, mcfg.n_embed, mcfg.quantizer)
    frozen_modules = freeze_for_finetune(bare, cfg.freeze)
    model, optimizer = engine.prepare(bare, build_optimizer(bare, cfg))
    scheduler = build_scheduler(optimizer, cfg)
    use_gan = cfg.disc_weight > 0
    disc = opt_d = None
    if use_gan:
        disc_bare = PatchDiscriminator(3, cfg.disc_ndf, cfg.disc_layers)
        opt_d_bare = torch.optim.Adam(disc_bare.parameters(), lr=cfg.disc_lr or cfg.lr, betas=tuple(cfg.betas))
        disc, opt_d = engine.prepare(disc_bare, opt_d_bare)
    perceptual = PerceptualLoss(load_efficientnet_lite0()).to(device) if cfg.perceptual_weight > 0 else None
    generator = torch.Generator(device=device).manual_seed(cfg.seed + 7919 * engine.rank)

    start = 0
    ckpt = resolve_resume(cfg.out_dir, resume)
    if ckpt is not None:
        state = engine.load_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler,
                                       disc=disc, opt_d=opt_d, generator=generator)
        start = int(state["step"])
        log.info("resumed from %s at step %d", ckpt, start)

    bare = engine.unwrap(model)
    out_dir = Path(cfg.out_dir)
    scale = bare.output_factor // bare.downsample_factor  # 2 for the DWT decoder: targets at twice the size
    batches = _batches(dataset, cfg, engine.rank, engine.world_size, start)
    metrics: dict[str, float] = {}
    recent_codes: list[torch.Tensor] = []
    set_train_mode(model, frozen_modules)
    for step in range(start, cfg.max_steps):
        target = next(batches).to(device, non_blocking=True)
        if cfg.hflip:
            flip = torch.rand(target.shape[0], generator=generator, device=device) < 0.5
            target = torch.where(flip[:, None, None, None], target.flip(-1), target)
        images = F.avg_pool2d(target, scale) if scale > 1 else target
        temperature = gumbel_temperature(step, cfg)
        if mcfg.quantizer == "gumbel":
            bare.quantize.kl_weight = kl_weight_at(step, cfg, mcfg)
        gan_on = use_gan and step >= cfg.disc_start
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
        recent_codes.append(codes.detach().flatten().cpu())
        recent_codes = recent_codes[-50:]
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            usage = codebook_usage(torch.cat(recent_codes), mcfg.n_embed)
            extra = {"temp": temperature} if mcfg.quantizer == "gumbel" else {}
            engine.log(done, {**logs, "loss": loss.detach(), **extra, "ppl": usage["perplexity"],
                              "used": usage["used_fraction"], "lr": scheduler.get_last_lr()[0]}, total=cfg.max_steps)
        if val_images is not None and cfg.eval_every and (done % cfg.eval_every == 0 or done == cfg.max_steps):
            metrics = _evaluate(bare, val_images, scale, out_dir, done, engine)
            set_train_mode(model, frozen_modules)
        if cfg.save_every and done % cfg.save_every == 0 or engine.should_stop() or done == cfg.max_steps:
            engine.save_checkpoint(checkpoint_path(out_dir), model=model, optimizer=optimizer, scheduler=scheduler,
                                   disc=disc, opt_d=opt_d, generator=generator, step=done)
            if engine.should_stop():
                log.info("stop requested: checkpoint saved at step %d", done)
                break
    engine.save_pretrained(model, out_dir / FINAL_DIR)
    return bare.eval(), metrics


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
    cfg = load_train_config(VQGANTrainConfig, args.config, args.overrides)
    set_threads(cfg.num_threads)
    _, metrics = train_vqgan(cfg, resume=args.resume)
    final = Path(cfg.out_dir) / FINAL_DIR
    print(json.dumps({"model": str(final), **{k: round(v, 4) for k, v in metrics.items()}}))
    return 0
