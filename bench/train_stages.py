"""Training-step time of the VQGAN and CLIP trainers' models under their precision and compile switches.

``holst train vqgan`` and ``holst train clip`` share the DALL-E trainer's engine (``precision``,
``compile`` in ``TrainConfig``). This runs each model's training step as its trainer does, through
``Engine.step`` (autocast, clipping, AdamW), on random inputs, once per set-up, and reports the median
step after the warm-up steps (compilation included in ``warmup_s``) and each row's speed-up over the
first (fp32 eager) row of the same stage in the same run:

- VQGAN (default preset emoji64, batch 16 as configs/train/vqgan_emoji64.yaml): the reconstruction
  step (L1 + quantizer loss; the GAN and perceptual terms are off in that config's first steps).
- CLIP (default preset emoji64, batch 64 as configs/train/clip_emoji64.yaml): the contrastive step.

Rows: fp32, bf16 autocast, bf16 autocast + ``torch.compile`` (on a CPU, bf16 pays only where the CPU
has native bf16, as this project's dev CPU has: ``precision: auto`` picks it there).

    .venv/bin/python bench/train_stages.py [--stages vqgan,clip] [--steps 5] [--warmup 2] [--threads 2]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable

import torch
from timing import bench_device, device_label, timed_steps

from holst.config import TrainConfig
from holst.rerank.clip import CLIPModel, clip_preset
from holst.train.clip import multi_positive_loss
from holst.train.engine import Engine
from holst.train.optim import build_optimizer, build_scheduler
from holst.vqgan import VQGAN, get_vqgan_preset

VARIANTS = [("fp32", False), ("bf16", False), ("bf16", True)]


def vqgan_step(preset: str, batch: int) -> tuple[torch.nn.Module, Callable]:
    """The VQGAN model and its reconstruction loss on a fixed random batch (as holst/train/vqgan.py)."""
    model = VQGAN(get_vqgan_preset(preset))
    R = model.config.resolution
    images = torch.rand(batch, 3, R, R, generator=torch.Generator().manual_seed(0))

    def loss_of(m: torch.nn.Module, engine: Engine) -> torch.Tensor:
        recon, q_loss, _ = m(images.to(engine.device))
        return (recon.float() - (images.to(engine.device) * 2 - 1)).abs().mean() + q_loss

    return model, loss_of


def clip_step(preset: str, batch: int) -> tuple[torch.nn.Module, Callable]:
    """The CLIP model and its contrastive loss on a fixed random batch (as holst/train/clip.py)."""
    config = clip_preset(preset)
    model = CLIPModel(config)
    g = torch.Generator().manual_seed(0)
    R = config.image_resolution
    images = torch.rand(batch, 3, R, R, generator=g)
    ids = torch.randint(4, config.vocab_size, (batch, config.context_length), generator=g)
    groups = torch.arange(batch)  # every caption belongs to its own image

    def loss_of(m: torch.nn.Module, engine: Engine) -> torch.Tensor:
        logits = m(images.to(engine.device), ids.to(engine.device))
        return multi_positive_loss(logits, groups.to(engine.device))

    return model, loss_of


STAGES = {"vqgan": (vqgan_step, "emoji64", 16), "clip": (clip_step, "emoji64", 64)}


def bench_row(stage: str, precision: str, compile_: bool, steps: int, warmup: int, device: str) -> dict:
    """Median optimizer-step time of one stage under one precision / compile set-up."""
    build, preset, batch = STAGES[stage]
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = TrainConfig(out_dir=out_dir, precision=precision, compile=compile_, device=device,
                          tensorboard=False, grad_clip=1.0, warmup_steps=0, max_steps=1000)
        engine = Engine(cfg, install_signal_handler=False)
        torch.manual_seed(0)
        bare, loss_of = build(preset, batch)
        model, optimizer = engine.prepare(bare, lambda m: build_optimizer(m, cfg))
        scheduler = build_scheduler(optimizer, cfg)
        model.train()

        def step() -> float:
            with engine.autocast():
                loss = loss_of(model, engine)
            engine.step(loss, optimizer, scheduler, model=model)
            return float(loss.detach())

        t = timed_steps(step, steps, warmup, engine.device)
        engine.close()
    return {"stage": stage, "preset": preset, "batch": batch, "precision": engine.precision, "compile": compile_,
            "step_s": round(t["step_s"], 4), "warmup_s": round(t["warmup_s"], 1), "loss": round(t["last"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="vqgan,clip", help="comma-separated: vqgan, clip")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = parser.parse_args()
    device = bench_device(args.device, args.threads)
    rows = []
    for stage in args.stages.split(","):
        if stage not in STAGES:
            parser.error(f"unknown stage {stage!r}; choose from {sorted(STAGES)}")
        stage_rows = [bench_row(stage, p, c, args.steps, args.warmup, device) for p, c in VARIANTS]
        for r in stage_rows:
            r["speedup_vs_fp32"] = round(stage_rows[0]["step_s"] / r["step_s"], 3)
        rows += stage_rows
    print(json.dumps({"bench": "train_stages",
                      "device": device_label(device),
                      "steps": args.steps, "warmup": args.warmup, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
