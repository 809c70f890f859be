"""``holst train superres``: fine-tune (or train) Real-ESRGAN's RRDBNet on our images.

HR = random ``hr_size`` crops (+ horizontal flips) of the images under ``data``; LR = the crop shrunk
by ``scale`` and degraded the way the pipeline's input is: round-tripped through the VQGAN
(``degradation: vqgan``), or blur + noise + JPEG without one (``classic``). Loss: L1 in pixel space
(no perceptual/GAN terms: no VGG weights are obtainable offline).

Output: ``out_dir/final`` (config.json + model.safetensors), loadable by ``RRDBNet.from_pretrained``
and the pipeline; ``out_dir/checkpoint.pt`` every ``save_every`` steps, at SIGTERM and at the end.
Every random draw (crops, flips, degradations) comes from one generator seeded with ``seed`` and
saved in the checkpoint, so ``--resume`` continues the same stream.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from holst.config import ConfigError, SuperResConfig, SuperResTrainConfig
from holst.superres.degrade import make_pair
from holst.superres.rrdbnet import RRDBNet
from holst.train.checkpoint import (
    FINAL_DIR,
    add_train_arguments,
    checkpoint_path,
    load_train_config,
    resolve_resume,
    set_threads,
)
from holst.train.engine import Engine
from holst.train.optim import build_optimizer, build_scheduler
from holst.utils.images import pil_to_tensor
from holst.utils.runtime import get_logger

log = get_logger("holst.train.superres")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CACHE_BYTES = 1 << 30  # decoded uint8 images kept in memory (the emoji set at 64 px is ~100 MB)


def find_images(root: str | Path) -> list[Path]:
    """Image files under ``root`` (recursive, sorted); raises ConfigError when there are none."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"data={str(root)!r} is not a directory of images")
    paths = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ConfigError(f"data={str(root)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


class CropSampler:
    """Random HR crops from image files or an in-memory tensor, drawn with an explicit generator.

    Images smaller than ``hr_size`` are enlarged (bicubic) so that their short side is ``hr_size``.
    """

    def __init__(self, hr_size: int, *, paths: list[Path] | None = None, images: torch.Tensor | None = None) -> None:
        if (paths is None) == (images is None):
            raise ValueError("CropSampler needs exactly one of paths or images")
        self.hr_size = hr_size
        self.paths = paths
        self.images = images  # (N, 3, H, W) float in [0, 1]
        self._cache: dict[int, torch.Tensor] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.paths) if self.paths is not None else self.images.shape[0]

    def _load(self, i: int) -> torch.Tensor:
        if self.images is not None:
            return self.images[i].float()
        if i in self._cache:
            return self._cache[i].float().div_(255)
        try:
            with Image.open(self.paths[i]) as im:
                img = pil_to_tensor(im)
        except OSError as e:
            raise ConfigError(f"cannot read training image {self.paths[i]}: {e}") from e
        if self._cached_bytes + img.numel() <= CACHE_BYTES:
            self._cache[i] = img.mul(255).round().byte()
            self._cached_bytes += img.numel()
        return img

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """(batch_size, 3, hr_size, hr_size) float in [0, 1]."""
        s = self.hr_size
        idx = torch.randint(len(self), (batch_size,), generator=generator).tolist()
        crops = []
        for i in idx:
            img = self._load(i)
            h, w = img.shape[-2:]
            if min(h, w) < s:
                f = s / min(h, w)
                size = (max(s, round(h * f)), max(s, round(w * f)))
                img = F.interpolate(img[None], size=size, mode="bicubic", align_corners=False)[0].clamp(0, 1)
                h, w = size
            y = int(torch.randint(h - s + 1, (1,), generator=generator))
            x = int(torch.randint(w - s + 1, (1,), generator=generator))
            crop = img[:, y:y + s, x:x + s]
            if bool(torch.rand(1, generator=generator) < 0.5):
                crop = crop.flip(-1)
            crops.append(crop)
        return torch.stack(crops)


def build_model(cfg: SuperResTrainConfig) -> RRDBNet:
    """The model to train: ``cfg.init`` (a superres directory, fp32) or a fresh one seeded by ``cfg.seed``."""
    if cfg.init:
        model = RRDBNet.from_pretrained(cfg.init, dtype=torch.float32)
        if model.scale != cfg.scale:
            raise ConfigError(f"init={cfg.init!r} is an x{model.scale} model but scale={cfg.scale}")
        return model.train()
    config = SuperResConfig(num_feat=cfg.num_feat, num_block=cfg.num_block, num_grow_ch=cfg.num_grow_ch,
                            scale=cfg.scale)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
        torch.manual_seed(cfg.seed)
        return RRDBNet(config).train()


def _load_vqgan(path: str, device: torch.device) -> Any:
    from holst.vqgan import VQGAN

    vq = VQGAN.from_pretrained(path, device=device)
    for p in vq.parameters():
        p.requires_grad_(False)
    return vq.eval()


def train_superres(cfg: SuperResTrainConfig, *, images: torch.Tensor | None = None, vqgan: Any = None,
                   resume: str | bool | None = None) -> dict[str, Any]:
    """Train per ``cfg``; returns {'losses': per-step losses, 'model_dir': Path, 'steps': int}.

    Args:
        cfg: the options (``data`` is ignored when ``images`` is given).
        images: optional (N, 3, H, W) float [0, 1] training images instead of a folder.
        vqgan: optional image tokenizer object for the 'vqgan' degradation (else loaded from ``cfg.vqgan``).
        resume: True/'auto' = continue from ``out_dir/checkpoint.pt`` if it exists; a path = that checkpoint.
    """
    engine = Engine(cfg)
    if images is not None:
        sampler = CropSampler(cfg.hr_size, images=images)
    elif cfg.data:
        sampler = CropSampler(cfg.hr_size, paths=find_images(cfg.data))
    else:
        raise ConfigError("data is empty: set data=<folder of images> in the config or with --set data=PATH")
    mode = cfg.degradation
    if mode == "auto":
        mode = "vqgan" if (vqgan is not None or cfg.vqgan) else "classic"
    if mode == "vqgan" and vqgan is None:
        vqgan = _load_vqgan(cfg.vqgan, engine.device)
    log.info("super-resolution training: x%d, %d images, %s degradation, device %s", cfg.scale, len(sampler), mode,
             engine.device)

    model = build_model(cfg)
    model, optimizer = engine.prepare(model, build_optimizer(model, cfg))
    scheduler = build_scheduler(optimizer, cfg)
    generator = torch.Generator().manual_seed(cfg.seed + 1000 * engine.rank)
    ckpt = checkpoint_path(cfg.out_dir)
    step = 0
    start = resolve_resume(cfg.out_dir, resume)
    if start is not None:
        state = engine.load_checkpoint(start, model=model, optimizer=optimizer, scheduler=scheduler,
                                       generator=generator)
        step = int(state["step"])
        log.info("resumed from %s at step %d", start, step)
    classic = {"blur_sigma": cfg.blur_sigma, "noise_std": cfg.noise_std, "jpeg_quality": cfg.jpeg_quality}
    losses: list[float] = []
    model.train()
    while step < cfg.max_steps:
        for _ in range(cfg.grad_accum):
            hr = sampler.sample(cfg.batch_size, generator)
            use = mode
            if mode == "vqgan" and cfg.classic_prob > 0 and bool(torch.rand(1, generator=generator) < cfg.classic_prob):
                use = "classic"
            lr, hr = make_pair(hr, cfg.scale, mode=use, vqgan=vqgan, generator=generator, **classic)
            lr, hr = lr.to(engine.device), hr.to(engine.device)
            with engine.autocast():
                sr = model(lr)  # (B, 3, s*h, s*w)
            loss = F.l1_loss(sr.float(), hr)
            engine.step(loss, optimizer, scheduler, model=model)
        step += 1
        losses.append(float(loss.detach()))
        if step % cfg.log_every == 0 or step == cfg.max_steps:
            engine.log(step, {"l1": loss, "lr": scheduler.get_last_lr()[0]}, total=cfg.max_steps)
        stop = engine.should_stop()
        if (cfg.save_every and step % cfg.save_every == 0) or stop or step == cfg.max_steps:
            engine.save_checkpoint(ckpt, model=model, optimizer=optimizer, scheduler=scheduler,
                                   generator=generator, step=step)
        if stop:
            log.warning("stop requested: checkpoint saved at step %d (continue with --resume)", step)
            break
    model_dir = Path(cfg.out_dir) / FINAL_DIR
    engine.save_pretrained(model, model_dir)
    engine.close()
    return {"losses": losses, "model_dir": model_dir, "steps": step}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_train_arguments(parser)


def main(args: argparse.Namespace) -> int:
    cfg = load_train_config(SuperResTrainConfig, args.config, args.overrides)
    set_threads(cfg.num_threads)
    result = train_superres(cfg, resume=args.resume)
    print(result["model_dir"])
    return 0
