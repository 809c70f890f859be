"""The skeleton every trainer shares: one run = engine, resume, steps, checkpoints, final model, result.

A trainer keeps its own readable loop (the forward pass and loss of its stage) and leaves the rest
to :class:`TrainRun`::

    with TrainRun("vqgan", cfg) as run:
        model = seeded(cfg.seed, lambda: VQGAN(config))            # same weights for the same seed
        model, optimizer = run.engine.prepare(model, build_optimizer(model, cfg))
        scheduler = build_scheduler(optimizer, cfg)
        run.track(model=model, optimizer=optimizer, scheduler=scheduler, data=batches)
        run.start(resume)                                          # restores every tracked object
        for step in run.steps():                                   # saves every save_every / on SIGTERM
            for _ in range(cfg.grad_accum):                        # one optimizer step per step
                loss = ...
                run.engine.step(loss, optimizer, scheduler, model=model)
            run.log(step, {"loss": loss})
        return run.finish(model, data=report)                      # final/ only when the run completed

The run refuses options its stage does not implement (:func:`refuse_unsupported`), saves
``<out_dir>/checkpoint.pt`` every ``save_every`` steps and when SIGTERM/SIGUSR1 arrives (then stops
without ``final/``), writes ``final/`` and the last checkpoint only when every step ran, appends
the data report (skipped samples by reason) to ``metrics.jsonl`` and always closes its engine.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from holst.config import ConfigError
from holst.train.checkpoint import FINAL_DIR, checkpoint_path, resolve_resume
from holst.train.engine import Engine
from holst.utils.runtime import get_logger

log = get_logger("holst.train")


@dataclasses.dataclass
class TrainResult:
    """What every ``train_<stage>(cfg, ...)`` returns.

    Attributes:
        stage: 'dalle', 'vqgan', 'clip' or 'superres'.
        step: optimizer steps done (``cfg.max_steps`` unless stopped early).
        interrupted: stopped by a signal: the checkpoint is saved, ``final/`` is not written.
        final_dir: ``<out_dir>/final`` (a ``from_pretrained`` directory), None when interrupted.
        checkpoint: ``<out_dir>/checkpoint.pt`` (``--resume`` continues from it).
        last_loss: the loss of the last micro-batch (this process), None if no step ran.
        skipped_steps: optimizer steps skipped because gradients were inf/NaN.
        data: the training data's report, :meth:`holst.data.DataReport.to_dict` (read, kept,
            ``skipped`` by reason, ``converted`` by kind).
        metrics: stage extras (VQGAN held-out PSNR/SSIM, CLIP retrieval R@k, ...).
        model: the trained bare model (eval mode), or None when interrupted.
    """

    stage: str
    step: int
    interrupted: bool
    final_dir: Path | None
    checkpoint: Path
    last_loss: float | None
    skipped_steps: int
    data: dict[str, Any]
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    model: nn.Module | None = dataclasses.field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: everything but the model (what ``holst train`` prints)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "model"}
        out["final_dir"] = str(self.final_dir) if self.final_dir else None
        out["checkpoint"] = str(self.checkpoint)
        out["data"] = {k: self.data.get(k) for k in ("read", "kept", "skipped", "skipped_total")}
        return out


class StateOf:
    """Wrap a getter/setter pair so plain state (a ``random.Random``, a list) checkpoints like a module."""

    def __init__(self, get: Callable[[], Any], set_: Callable[[Any], None]) -> None:
        self.state_dict, self.load_state_dict = get, set_


def seeded(seed: int, build: Callable[[], Any]) -> Any:
    """``build()`` under ``torch.manual_seed(seed)`` without touching the caller's global RNG state.

    The same seed gives the same initial weights on every rank and in every run.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def refuse_unsupported(cfg: Any, stage: str, defaults: dict[str, Any]) -> None:
    """Raise ConfigError naming the first option set away from its default that ``stage`` ignores.

    Args:
        cfg: the train config.
        stage: the command name for the message.
        defaults: option -> the value meaning "off" (e.g. ``{"ema_decay": 0.0}``).
    """
    for name, off in defaults.items():
        if getattr(cfg, name) != off:
            raise ConfigError(f"{name}={getattr(cfg, name)!r}: `holst train {stage}` does not implement {name}; "
                              f"leave it at {off!r}")


class TrainRun:
    """The lifecycle of one training run; see the module docstring.

    Args:
        stage: the trainer's name (tags the checkpoint, so another stage's checkpoint is refused).
        cfg: a TrainConfig subclass (``out_dir``, ``max_steps``, ``save_every``, ``log_every``, ``seed``).
        engine: an existing Engine to use (not closed here); None = make one and close it at exit.
    """

    def __init__(self, stage: str, cfg: Any, *, engine: Engine | None = None) -> None:
        self.stage, self.cfg = stage, cfg
        self._own_engine = engine is None
        self.engine = engine or Engine(cfg)
        self.out_dir = Path(cfg.out_dir)
        self.checkpoint = checkpoint_path(self.out_dir)
        self.step = 0
        self.interrupted = False
        self.stop_early = False  # set by a trainer (e.g. a time budget): save, finish normally
        self._tracked: dict[str, Any] = {}
        if self.engine.is_main:
            cfg.save_yaml(self.out_dir / "train_config.yaml")

    def __enter__(self) -> TrainRun:
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._own_engine:
            self.engine.close()

    def track(self, **objects: Any) -> None:
        """Objects saved in every checkpoint and restored by :meth:`start` (None values are left out)."""
        self._tracked.update({k: v for k, v in objects.items() if v is not None})

    def start(self, resume: str | bool | None) -> dict[str, Any]:
        """Restore the tracked objects from a checkpoint, or seed a fresh start.

        Args:
            resume: see :func:`holst.train.checkpoint.resolve_resume` (an error when it finds nothing).
        Returns:
            The checkpoint's payload (empty for a fresh start).
        """
        ckpt = resolve_resume(self.out_dir, resume)
        if ckpt is None:
            self.engine.seed_everything(self.cfg.seed)
            return {}
        payload = self.engine.load_checkpoint(ckpt, stage=self.stage, **self._tracked)
        self.step = int(payload.get("step", 0))
        log.info("resumed from %s at step %d", ckpt, self.step)
        return payload

    def steps(self) -> Iterator[int]:
        """Step numbers from the resumed one + 1 to ``max_steps``.

        After each step: a checkpoint every ``save_every`` steps, or when a signal arrived (then
        the run is ``interrupted`` and the loop ends), or when the trainer set ``stop_early``.
        """
        cfg = self.cfg
        while self.step < cfg.max_steps:
            yield self.step + 1
            self.step += 1
            stop = self.engine.should_stop()
            periodic = cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps
            if stop or (periodic and not self.stop_early):
                self.save()
            if stop:
                self.interrupted = True
                log.warning("stopped by signal at step %d; continue with --resume", self.step)
                return
            if self.stop_early:
                return

    def save(self, **extra: Any) -> None:
        """Write ``<out_dir>/checkpoint.pt`` with the tracked objects and the step (collective)."""
        self.engine.save_checkpoint(self.checkpoint, stage=self.stage, **self._tracked, step=self.step, **extra)

    def should_log(self, step: int) -> bool:
        """Whether ``step`` is logged: every ``log_every`` steps and the last one."""
        return step % self.cfg.log_every == 0 or step == self.cfg.max_steps

    def log(self, step: int, metrics: dict[str, Any]) -> bool:
        """Log ``metrics`` every ``log_every`` steps and at the last step; True when it logged."""
        if not self.should_log(step):
            return False
        self.engine.log(step, metrics, total=self.cfg.max_steps)
        return True

    def finish(self, model: nn.Module, *, data: dict[str, Any], last_loss: Any = None,
               metrics: dict[str, Any] | None = None, save_final: Callable[[Path], None] | None = None
               ) -> TrainResult:
        """Save the last checkpoint and ``final/`` (only if the run completed) and build the result.

        Args:
            model: the prepared model.
            data: the training data report (``DataReport.to_dict()``), also logged and appended to
                ``metrics.jsonl``.
            last_loss: the last loss (tensor or number).
            metrics: stage extras for the result.
            save_final: writes ``final/`` itself (LoRA, EMA, tokenizer ...); default
                ``engine.save_pretrained(model, final_dir)``.
        """
        engine = self.engine
        final_dir = None
        if not self.interrupted:
            self.save()
            final_dir = self.out_dir / FINAL_DIR
            (save_final or (lambda d: engine.save_pretrained(model, d)))(final_dir)
            log.info("final model written to %s", final_dir)
        self._report_data(data)
        bare = engine.unwrap(model)
        return TrainResult(stage=self.stage, step=self.step, interrupted=self.interrupted, final_dir=final_dir,
                           checkpoint=self.checkpoint, last_loss=None if last_loss is None else float(last_loss),
                           skipped_steps=engine.skipped_steps, data=data, metrics=metrics or {},
                           model=None if self.interrupted else bare.eval())

    def _report_data(self, data: dict[str, Any]) -> None:
        if not self.engine.is_main:
            return
        skipped = data.get("skipped", {})
        text = ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) or "none"
        log.info("training data: %s samples read, %s kept; skipped: %s", data.get("read"), data.get("kept"), text)
        record = {"step": self.step, "event": "data", "data_read": data.get("read"), "data_kept": data.get("kept"),
                  "data_skipped": skipped, "data_skipped_total": sum(skipped.values())}
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
