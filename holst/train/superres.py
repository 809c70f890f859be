"""``holst train superres``: fine-tune (or train) Real-ESRGAN's RRDBNet on our images.

HR = random ``hr_size`` crops (+ horizontal flips) of the images under ``data`` (read through
holst.data at ``image_size``, bad images skipped and counted, kept in memory as uint8); LR = the
crop shrunk by ``scale`` and degraded the way the pipeline's input is: round-tripped through the
VQGAN (``degradation: vqgan``), or blur + noise + JPEG without one (``classic``). Loss: L1 in pixel
space (no perceptual/GAN terms: no VGG weights are obtainable offline).

Output: ``out_dir/final`` (config.json + model.safetensors), loadable by ``RRDBNet.from_pretrained``
and the pipeline; checkpoints, resume and stopping are those of every trainer
(:class:`holst.train.loop.TrainRun`). Every random draw (crops, flips, degradations) comes from one
generator seeded with ``seed`` and saved in the checkpoint, so ``--resume`` continues the same stream.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F

from holst.config import ConfigError
from holst.data.config import DataConfig
from holst.data.images import DataReport
from holst.superres.config import RRDBOptions, SuperResConfig
from holst.superres.degrade import make_pair
from holst.superres.rrdbnet import RRDBNet
from holst.train.args import add_train_arguments, run_train_command
from holst.train.config import SuperResTrainConfig
from holst.train.data import open_samples, stack_images
from holst.train.engine import Engine
from holst.train.loop import TrainResult, TrainRun, refuse_unsupported, seeded
from holst.train.optim import build_optimizer, build_scheduler
from holst.utils.runtime import get_logger

log = get_logger("holst.train.superres")

UNSUPPORTED = {"ema_decay": 0.0, "sample_every": 0, "gradient_checkpointing": False}


class CropSampler:
    """Random HR crops of in-memory images, drawn with an explicit generator.

    Images smaller than ``hr_size`` are enlarged (bicubic) so that their short side is ``hr_size``.

    Args:
        hr_size: crop side.
        images: (N, 3, H, W), uint8 or float in [0, 1].
    """

    def __init__(self, hr_size: int, images: torch.Tensor) -> None:
        self.hr_size = hr_size
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """(batch_size, 3, hr_size, hr_size) float in [0, 1]."""
        s = self.hr_size
        idx = torch.randint(len(self), (batch_size,), generator=generator).tolist()
        crops = []
        for i in idx:
            img = self.images[i]
            img = img.float().div_(255) if img.dtype == torch.uint8 else img.float()
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


def load_images(data: Any) -> tuple[torch.Tensor, DataReport]:
    """All good images of a DataConfig / dataset as one (N, 3, S, S) uint8 tensor, and the data report."""
    dataset, report = open_samples(data, cache_bytes=0)
    images = [(stack_images([dataset[i]])[0] * 255).round().to(torch.uint8) for i in range(len(dataset))]
    return torch.stack(images), report


def build_model(cfg: SuperResTrainConfig) -> RRDBNet:
    """The model to train: ``cfg.init_from`` (a superres directory, fp32) or a fresh one seeded by ``cfg.seed``."""
    if cfg.init_from:
        model = RRDBNet.from_pretrained(cfg.init_from, dtype=torch.float32)
        if model.scale != cfg.scale:
            raise ConfigError(f"init_from={cfg.init_from!r} is an x{model.scale} model but scale={cfg.scale}")
        return model.train()
    config = SuperResConfig(**cfg.part_values(RRDBOptions))
    return seeded(cfg.seed, lambda: RRDBNet(config).train())


def _load_vqgan(path: str, device: torch.device) -> Any:
    from holst.vqgan import VQGAN

    vq = VQGAN.from_pretrained(path, device=device)
    for p in vq.parameters():
        p.requires_grad_(False)
    return vq.eval()


def train_superres(cfg: SuperResTrainConfig, *, images: torch.Tensor | None = None, vqgan: Any = None,
                   resume: str | bool | None = None, engine: Engine | None = None) -> TrainResult:
    """Train per ``cfg``.

    Args:
        cfg: the options (``data`` is ignored when ``images`` is given).
        images: optional (N, 3, H, W) float [0, 1] training images instead of a folder.
        vqgan: optional image tokenizer object for the 'vqgan' degradation (else loaded from ``cfg.vqgan``).
        resume: see :func:`holst.train.checkpoint.resolve_resume`.
        engine: an existing Engine (else one is made and closed at the end).
    Returns:
        A :class:`holst.train.loop.TrainResult` (``final_dir``: the RRDBNet directory).
    """
    refuse_unsupported(cfg, "superres", UNSUPPORTED)
    if images is not None:
        report = DataReport(read=len(images), kept=len(images))
    elif cfg.data:
        images, report = load_images(DataConfig(sources=(cfg.data,), image_size=cfg.image_size or cfg.hr_size,
                                                langs=("ru",), seed=cfg.seed, require_captions=False))
    else:
        raise ConfigError("data is empty: set data=<folder of images> in the config or with --set data=PATH")
    sampler = CropSampler(cfg.hr_size, images)
    with TrainRun("superres", cfg, engine=engine) as run:
        engine = run.engine
        mode = cfg.degradation
        if mode == "auto":
            mode = "vqgan" if (vqgan is not None or cfg.vqgan) else "classic"
        if mode == "vqgan" and vqgan is None:
            vqgan = _load_vqgan(cfg.vqgan, engine.device)
        log.info("super-resolution training: x%d, %d images, %s degradation, device %s", cfg.scale, len(sampler),
                 mode, engine.device)
        model = build_model(cfg)
        model, optimizer = engine.prepare(model, build_optimizer(model, cfg))
        scheduler = build_scheduler(optimizer, cfg)
        generator = torch.Generator().manual_seed(cfg.seed + 1000 * engine.rank)
        run.track(model=model, optimizer=optimizer, scheduler=scheduler, generator=generator)
        run.start(resume)
        classic = {"blur_sigma": cfg.blur_sigma, "noise_std": cfg.noise_std, "jpeg_quality": cfg.jpeg_quality}
        loss = None
        model.train()
        for step in run.steps():
            for _ in range(cfg.grad_accum):
                hr = sampler.sample(cfg.batch_size, generator)
                use = mode
                if mode == "vqgan" and cfg.classic_prob > 0 and \
                        bool(torch.rand(1, generator=generator) < cfg.classic_prob):
                    use = "classic"
                lr, hr = make_pair(hr, cfg.scale, mode=use, vqgan=vqgan, generator=generator, **classic)
                lr, hr = lr.to(engine.device), hr.to(engine.device)
                with engine.autocast():
                    sr = model(lr)  # (B, 3, s*h, s*w)
                loss = F.l1_loss(sr.float(), hr)
                engine.step(loss, optimizer, scheduler, model=model)
            run.log(step, {"l1": loss, "lr": scheduler.get_last_lr()[0]})
        return run.finish(model, data=report.to_dict(), last_loss=None if loss is None else loss.detach())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``holst train superres`` options."""
    add_train_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """Entry point of ``holst train superres``."""
    return run_train_command(SuperResTrainConfig, train_superres, args)
