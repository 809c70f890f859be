"""The training engine: the only module that knows the backend, the precision and the loss scaler.

One object hides four ways of running a training step:

- ``single``: one process, one device (CPU, one GPU or MPS).
- ``ddp``: torchrun + DistributedDataParallel (gloo on CPU, nccl on CUDA).
- ``fsdp``: torchrun + PyTorch's ``fully_shard`` (FSDP2): every child of an ``nn.ModuleList`` (the
  transformer layers) is sharded on its own, then the root; for models that do not fit one GPU.
- ``deepspeed``: ZeRO stage 0-3 through DeepSpeed (``pip install holst[deepspeed]``), as the
  ruDALL-E paper did.

Precision ('auto'): bf16 autocast on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX), fp32 on
other CPUs; fp16 autocast with dynamic loss
scaling (GradScaler: initial scale ``loss_scale_init``, growth every ``loss_scale_window`` clean
steps, the CogView settings, research/peers.md §4.5) on the others. A step whose gradients are
inf/NaN is skipped (the optimizer and scheduler are not touched) and counted in ``skipped_steps``.

Typical loop (see holst/train/dalle.py)::

    engine = Engine(cfg)
    model, optimizer = engine.prepare(model, build_optimizer(model, cfg))
    scheduler = build_scheduler(optimizer, cfg)
    for batch in data:
        with engine.autocast():
            loss = model(batch)
        engine.step(loss, optimizer, scheduler, model=model)
        if engine.should_stop():        # SIGTERM seen on any rank
            break
    engine.save_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, step=step)

Collective calls (``prepare``, ``step``, ``save_checkpoint``, ``load_checkpoint``, ``save_pretrained``,
``should_stop``, ``barrier``) must be made by every rank; files are written by rank 0 only.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from holst.errors import ConfigError, MissingPackageError
from holst.train.checkpoint import (
    DEEPSPEED_MARKER,
    load_entry,
    read_checkpoint,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from holst.utils.persist import CheckpointError
from holst.utils.runtime import get_logger, keep_freed_memory

log = get_logger("holst.train")

# DeepSpeed writes a file named 'latest' holding the newest tag, so the tag itself must differ.
DEEPSPEED_TAG = "holst"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True on CPUs with bf16 arithmetic (x86 AVX512-BF16 or AMX-BF16 in /proc/cpuinfo; Arm bf16)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[-1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        pass
    return False


def cpp_compiler_missing() -> bool:
    """True if torch.compile could not build CPU kernels here: inductor finds no C++ compiler ($CXX or g++)."""
    try:
        from torch._inductor import cpp_builder, exc
    except ImportError:  # a torch without inductor: let torch.compile say what it lacks
        return False
    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return True
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """The precision to train in: ``precision`` itself unless it is 'auto'.

    'auto' -> bf16 autocast on CPUs with native bf16 (AVX512-BF16/AMX) and on CUDA GPUs that
    support it, fp16 on older GPUs, fp32 on other CPUs and MPS.
    """
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            log.warning("precision='fp16' on CPU is slow (meant for GPUs without bf16); it works for testing")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


class Engine:
    """Backend, device, precision, gradient accumulation, clipping, skipping, checkpoints and logs.

    Args:
        cfg: a :class:`holst.config.TrainConfig` (or subclass). Fields read: backend, precision,
            compile, device, seed, out_dir, grad_accum, grad_clip, log_every, tensorboard, loss_scale_init,
            loss_scale_window, zero_stage, batch_size (DeepSpeed), fsdp_reshard_after_forward,
            ddp_find_unused_parameters, ddp_broadcast_buffers.
        install_signal_handler: catch SIGTERM (and SIGUSR1, sent by SLURM before a job's time
            limit) in the main thread and turn it into :meth:`should_stop` returning True.
    """

    def __init__(self, cfg: Any, *, install_signal_handler: bool = True) -> None:
        self.cfg = cfg
        self.world_size = _env_int("WORLD_SIZE", 1)
        self.rank = _env_int("RANK", 0)
        self.local_rank = _env_int("LOCAL_RANK", 0)
        self.backend = self._resolve_backend(cfg.backend)
        self.device = self._resolve_device(cfg.device)
        if self.world_size > 1 and not dist.is_initialized():
            pg_backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend=pg_backend)
            self._owns_process_group = True
        else:
            self._owns_process_group = False
        if self.device.type == "cpu":
            keep_freed_memory()  # no page faults for re-allocated activations (~0.1 s a step on 2 cores)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        self.grad_accum = int(cfg.grad_accum)
        self.grad_clip = float(cfg.grad_clip)
        self.scaler = self._make_scaler()
        self.skipped_steps = 0          # optimizer steps skipped because gradients were inf/NaN
        self.applied_steps = 0          # optimizer steps applied
        self.last_grad_norm: float | None = None
        self._micro: dict[int, int] = {}        # id(optimizer) -> micro-steps since the last optimizer step
        self._prepared: list[nn.Module] = []    # wrapped models (DDP/FSDP) whose gradient sync we steer
        self._stop_requested = False
        self._old_handlers: dict[int, Any] = {}
        self._tb = None
        self._log_t0 = time.perf_counter()
        self.out_dir = Path(cfg.out_dir)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        if install_signal_handler:
            self._install_signal_handlers()

    # ------------------------------------------------------------------ set-up
    def _resolve_backend(self, backend: str) -> str:
        if backend == "auto":
            return "ddp" if self.world_size > 1 else "single"
        if backend == "single" and self.world_size > 1:
            raise ValueError(f"backend='single' but WORLD_SIZE={self.world_size}; use 'ddp', 'fsdp' or 'deepspeed'")
        if backend == "deepspeed":
            try:
                import deepspeed  # noqa: F401
            except ImportError as e:
                raise MissingPackageError("backend='deepspeed' needs DeepSpeed: pip install 'holst[deepspeed]'") from e
        return backend

    def _resolve_device(self, device: str) -> torch.device:
        if device in (None, "auto"):
            if torch.cuda.is_available():
                dev = torch.device("cuda", self.local_rank % torch.cuda.device_count())
            elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available() \
                    and self.world_size == 1:
                dev = torch.device("mps")
            else:
                dev = torch.device("cpu")
        else:
            dev = torch.device(device)
            if dev.type == "cuda" and dev.index is None:
                dev = torch.device("cuda", self.local_rank % max(torch.cuda.device_count(), 1))
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return dev

    def _make_scaler(self) -> Any:
        if self.precision != "fp16" or self.backend == "deepspeed":
            return None  # bf16/fp32 need no scaling; DeepSpeed scales fp16 itself
        kwargs = dict(init_scale=float(self.cfg.loss_scale_init), growth_interval=int(self.cfg.loss_scale_window))
        if self.backend == "fsdp":
            # Found-inf must be agreed across shards: each rank only sees its shard's gradients.
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler(self.device.type, **kwargs)
        return torch.amp.GradScaler(self.device.type, **kwargs)

    def _install_signal_handlers(self) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return

        def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
            self._stop_requested = True
            log.warning("signal %d received: will save a checkpoint and stop after this step", signum)

        for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
            if sig is not None:
                self._old_handlers[sig] = signal.signal(sig, handler)

    def seed_everything(self, seed: int) -> None:
        """Seed Python, NumPy and torch (CPU + CUDA) with ``seed + rank``, for dropout etc.

        Called by trainers at a fresh start (a resume restores the saved states instead); ranks
        differ so that their dropout masks differ.
        """
        import numpy as np

        s = int(seed) + self.rank
        random.seed(s)
        np.random.seed(s % 2**32)
        torch.manual_seed(s)

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the process that logs and writes files)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1

    # ------------------------------------------------------------------ wrapping
    def prepare(self, model: nn.Module, optimizer: Any = None) -> tuple[nn.Module, torch.optim.Optimizer | None]:
        """Move ``model`` to the device and wrap it for the backend.

        Args:
            model: the bare module (frozen parameters are fine; they get no gradients).
            optimizer: an optimizer over ``model``'s parameters, a callable ``bare_model -> optimizer``
                (called after wrapping/sharding: preferred with FSDP), or None (e.g. a frozen VQGAN).
                FSDP replaces the parameters by sharded ones, so an optimizer given as an object is
                rebuilt over them (same class and param-group options). Build schedulers *after* this.
        Returns:
            (wrapped model, optimizer to use).
        """
        factory = optimizer if callable(optimizer) and not isinstance(optimizer, torch.optim.Optimizer) else None
        if factory is not None:
            optimizer = None
        if self.backend == "deepspeed":
            if factory is not None:
                optimizer = factory(model)
            return self._prepare_deepspeed(model, optimizer)
        if self.backend == "fsdp":
            model, optimizer = self._prepare_fsdp(model, optimizer)
        else:
            model.to(self.device)
            if self.backend == "ddp" and any(p.requires_grad for p in model.parameters()):
                from torch.nn.parallel import DistributedDataParallel

                model = DistributedDataParallel(
                    model,
                    device_ids=[self.device.index] if self.device.type == "cuda" else None,
                    find_unused_parameters=bool(self.cfg.ddp_find_unused_parameters),
                    broadcast_buffers=bool(self.cfg.ddp_broadcast_buffers),
                )
                self._prepared.append(model)
                self._set_grad_sync(model, self.grad_accum == 1)
        if factory is not None:
            optimizer = factory(self.unwrap(model))
        if getattr(self.cfg, "compile", False):
            model = self._compile(model)
        return model, optimizer

    def _compile(self, model: nn.Module) -> nn.Module:
        """``torch.compile`` the (wrapped) model's forward.

        Its step, backward included, runs as fused kernels (C++ on CPU, Triton on CUDA); the first
        steps pay the compilation.
        """
        if self.backend == "fsdp":
            log.warning("compile: true is not applied under FSDP here; running eager")
            return model
        if self.device.type == "cpu" and cpp_compiler_missing():
            raise ConfigError("compile: true on a CPU needs a C++ compiler for torch.compile's kernels and none "
                              "was found (install g++ or set $CXX), or set compile: false")
        return torch.compile(model)

    def _prepare_fsdp(self, model: nn.Module, optimizer: torch.optim.Optimizer | None
                      ) -> tuple[nn.Module, torch.optim.Optimizer | None]:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # Remember each optimizer parameter's name so the optimizer can be rebuilt on the shards.
        names = {id(p): n for n, p in model.named_parameters()}
        groups = None
        if optimizer is not None:
            groups = [({k: v for k, v in g.items() if k != "params"}, [names[id(p)] for p in g["params"]])
                      for g in optimizer.param_groups]
        model.to(self.device)
        mp = MixedPrecisionPolicy(param_dtype=self.amp_dtype, reduce_dtype=torch.float32) if self.amp_dtype \
            else MixedPrecisionPolicy()
        reshard = bool(self.cfg.fsdp_reshard_after_forward)
        for module in list(model.modules()):
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block, mp_policy=mp, reshard_after_forward=reshard)
        fully_shard(model, mp_policy=mp, reshard_after_forward=reshard)
        self._prepared.append(model)
        self._set_grad_sync(model, self.grad_accum == 1)
        if optimizer is not None:
            params = dict(model.named_parameters())
            new_groups = [{**opts, "params": [params[n] for n in group_names]} for opts, group_names in groups]
            # Group options carry every hyper-parameter; pass only the defaults the constructor accepts.
            accepted = inspect.signature(type(optimizer).__init__).parameters
            defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
            optimizer = type(optimizer)(new_groups, **defaults)
        return model, optimizer

    def _prepare_deepspeed(self, model: nn.Module, optimizer: torch.optim.Optimizer | None
                           ) -> tuple[nn.Module, torch.optim.Optimizer | None]:
        import deepspeed

        cfg = self.cfg
        ds_config: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": int(cfg.batch_size),
            "gradient_accumulation_steps": self.grad_accum,
            "gradient_clipping": self.grad_clip if self.grad_clip > 0 else 0.0,
            "zero_optimization": {"stage": int(cfg.zero_stage)},
            "steps_per_print": 10**9,
        }
        if self.precision == "bf16":
            ds_config["bf16"] = {"enabled": True}
        elif self.precision == "fp16":
            # CogView's 4B settings (research/peers.md §4.5).
            ds_config["fp16"] = {"enabled": True, "loss_scale": 0,
                                 "initial_scale_power": int(round(math.log2(cfg.loss_scale_init))),
                                 "loss_scale_window": int(cfg.loss_scale_window), "hysteresis": 2,
                                 "min_loss_scale": 1}
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                                       model_parameters=[p for p in model.parameters()
                                                                         if p.requires_grad])
        self._prepared.append(engine)
        # ZeRO 1-3 wrap the optimizer in an object that is not a torch Optimizer (LambdaLR refuses it);
        # the wrapper steps the inner one, whose param groups (the learning rates) it shares.
        while not isinstance(optimizer, torch.optim.Optimizer) and isinstance(getattr(optimizer, "optimizer", None),
                                                                             torch.optim.Optimizer):
            optimizer = optimizer.optimizer
        return engine, optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The bare module under DDP / DeepSpeed / torch.compile wrappers (FSDP2 shards in place)."""
        while True:
            if hasattr(model, "_orig_mod"):
                model = model._orig_mod
            elif hasattr(model, "module") and isinstance(model.module, nn.Module) and \
                    type(model).__name__ in ("DistributedDataParallel", "DeepSpeedEngine", "DataParallel"):
                model = model.module
            else:
                return model

    # ------------------------------------------------------------------ the step
    def autocast(self) -> contextlib.AbstractContextManager:
        """bf16/fp16 autocast on the engine's device, or a no-op for fp32 and DeepSpeed."""
        if self.amp_dtype is None or self.backend == "deepspeed":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _set_grad_sync(self, model: nn.Module, enabled: bool) -> None:
        # Gradient sync is only needed on the last micro-step of an accumulation window. DDP reads
        # the flag in forward(), so it is set for the *next* micro-step at the end of step().
        if hasattr(model, "require_backward_grad_sync"):
            model.require_backward_grad_sync = enabled
        elif hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(enabled)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, scheduler: Any = None,
             model: nn.Module | None = None) -> bool:
        """Backward one micro-batch loss; on the last micro-step also clip, check and step.

        The loss is divided by ``grad_accum`` (and scaled for fp16). When the accumulated
        gradients are inf/NaN the optimizer and scheduler are not stepped, ``skipped_steps`` grows
        and the fp16 loss scale is lowered. Gradients are zeroed after every optimizer step.

        Args:
            loss: scalar loss of one micro-batch (mean over its samples).
            optimizer: the optimizer to step (several optimizers: one ``step`` call each).
            scheduler: stepped after each *applied* optimizer step.
            model: the prepared model whose gradients these are (for gradient-sync control);
                None = every prepared model.
        Returns:
            True when an optimizer step was applied.
        """
        if self.backend == "deepspeed":
            return self._step_deepspeed(loss, model, scheduler)
        key = id(optimizer)
        micro = self._micro.get(key, 0) + 1
        loss = loss / self.grad_accum if self.grad_accum > 1 else loss
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        boundary = micro >= self.grad_accum
        self._micro[key] = 0 if boundary else micro
        targets = [model] if model is not None and model in self._prepared else self._prepared
        next_is_last = self.grad_accum == 1 if boundary else micro + 1 >= self.grad_accum
        for m in targets:
            self._set_grad_sync(m, next_is_last)
        if not boundary:
            return False
        applied = self._count_step(self._optimizer_step(optimizer), scheduler)
        optimizer.zero_grad(set_to_none=True)
        return applied

    def _count_step(self, applied: bool, scheduler: Any) -> bool:
        """Count an applied (then step the schedule) or a skipped optimizer step."""
        if applied:
            self.applied_steps += 1
            if scheduler is not None:
                scheduler.step()
        else:
            self.skipped_steps += 1
        return applied

    def _optimizer_step(self, optimizer: torch.optim.Optimizer) -> bool:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if not params:
            norm = torch.zeros(())
        elif self.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip, foreach=True)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor, reduced over the shards
            norm = norm.full_tensor()
        # One host sync per optimizer step: the skip decision must be the same on every rank,
        # and it is (DDP gradients are all-reduced; the FSDP norm is reduced over the shards).
        finite = bool(torch.isfinite(norm).item())
        self.last_grad_norm = float(norm) if finite else float("nan")
        if self.scaler is not None:
            # GradScaler skips the step itself when unscale_ found inf/NaN, and lowers the scale.
            if finite:
                self.scaler.step(optimizer)
            self.scaler.update()
            return finite
        if finite:
            optimizer.step()
        return finite

    def _step_deepspeed(self, loss: torch.Tensor, model: nn.Module | None, scheduler: Any) -> bool:
        ds = model if model is not None else self._prepared[0]
        ds.backward(loss)
        boundary = ds.is_gradient_accumulation_boundary()
        skipped_before = getattr(ds, "skipped_steps", 0)
        ds.step()
        if not boundary:
            return False
        applied = self._count_step(getattr(ds, "skipped_steps", 0) == skipped_before, scheduler)
        norm = ds.get_global_grad_norm() if hasattr(ds, "get_global_grad_norm") else None
        self.last_grad_norm = float(norm) if norm is not None else None
        return applied

    @property
    def loss_scale(self) -> float | None:
        """The current fp16 loss scale (None without loss scaling)."""
        return float(self.scaler.get_scale()) if self.scaler is not None else None

    # ------------------------------------------------------------------ stopping
    def should_stop(self) -> bool:
        """True once SIGTERM/SIGUSR1 reached any rank (collective: all-reduced when distributed)."""
        if not self.distributed:
            return self._stop_requested
        flag = torch.tensor([1.0 if self._stop_requested else 0.0], device=self._collective_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    # ------------------------------------------------------------------ state
    def model_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """A full, CPU state dict of ``model`` (gathered from the shards under FSDP; collective)."""
        if self.backend == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        bare = self.unwrap(model)
        return {k: v.detach().cpu() for k, v in bare.state_dict().items()}

    def load_model_state_dict(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Load a full state dict into a prepared model (scattered to the shards under FSDP)."""
        if self.backend == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))
            return
        self.unwrap(model).load_state_dict(state)

    def _optimizer_state(self, optimizer: torch.optim.Optimizer, model: nn.Module | None) -> dict[str, Any]:
        if self.backend == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            return get_optimizer_state_dict(model, optimizer,
                                            options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return optimizer.state_dict()

    def _load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                              model: nn.Module | None) -> None:
        if self.backend == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
            return
        optimizer.load_state_dict(state)

    def engine_state(self) -> dict[str, Any]:
        """Counters, loss scaler and the RNG states of every rank (collective when distributed)."""
        rng = rng_state(self.device)
        if self.distributed:
            all_rng: list[Any] = [None] * self.world_size
            dist.all_gather_object(all_rng, rng)
        else:
            all_rng = [rng]
        return {
            "skipped_steps": self.skipped_steps,
            "applied_steps": self.applied_steps,
            "micro": list(self._micro.values()),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "rng": all_rng,
            "world_size": self.world_size,
            "precision": self.precision,
            "backend": self.backend,
        }

    def load_engine_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`engine_state` saved (each rank takes its own RNG state)."""
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.applied_steps = int(state.get("applied_steps", 0))
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        rngs = state.get("rng") or []
        if len(rngs) == self.world_size:
            set_rng_state(rngs[self.rank], self.device)
        elif rngs:
            log.warning("checkpoint was written by %d processes, now %d: RNG states are not restored exactly",
                        len(rngs), self.world_size)
            set_rng_state(rngs[0], self.device)

    def save_checkpoint(self, path: str | Path, *, stage: str | None = None, **state: Any) -> None:
        """Atomically write a training checkpoint (temp file + rename) from rank 0. Collective.

        Values that are an ``nn.Module``, an optimizer or an object with ``state_dict()`` (scheduler,
        EMA, generator wrappers) are stored as their (full) state dicts; ``torch.Generator`` values as
        their state; everything else as given (tensors, numbers, strings, lists, dicts). The engine
        adds its own state (counters, loss scaler, RNG states of every rank).

        Args:
            path: the checkpoint file (parent directories are created).
            stage: the trainer writing it ('dalle', 'vqgan', ...); :meth:`load_checkpoint` checks it.
            state: e.g. ``model=model, optimizer=optimizer, scheduler=scheduler, step=step, data=pos``.
        """
        path = Path(path)
        model = state.get("model")
        payload: dict[str, Any] = {}
        if self.backend == "deepspeed":
            # ZeRO partitions the optimizer state over ranks: DeepSpeed's own (collective) checkpoint
            # holds model + optimizer + its loss scaler next to ours; our file keeps the rest.
            ds_dir = path.with_name(path.name + ".deepspeed")
            self._prepared[0].save_checkpoint(str(ds_dir), tag=DEEPSPEED_TAG)
            state = {k: (DEEPSPEED_MARKER if self._is_deepspeed_object(v) else v) for k, v in state.items()}
        for key, value in state.items():
            payload[key] = self._to_state(value, model)
        payload["__engine__"] = self.engine_state()
        if self.is_main:
            write_checkpoint(path, payload, stage=stage)
        self.barrier()

    def _is_deepspeed_object(self, value: Any) -> bool:
        if self.backend != "deepspeed" or not self._prepared:
            return False
        ds = self._prepared[0]
        wrapper = getattr(ds, "optimizer", None)
        return value is ds or value is wrapper or value is getattr(wrapper, "optimizer", None)

    def _to_state(self, value: Any, model: nn.Module | None) -> Any:
        if isinstance(value, nn.Module):
            return self.model_state_dict(value)
        if isinstance(value, torch.optim.Optimizer):
            return self._optimizer_state(value, model)
        if isinstance(value, torch.Generator):
            return value.get_state()
        if hasattr(value, "state_dict") and callable(value.state_dict):
            return value.state_dict()
        return value

    def load_checkpoint(self, path: str | Path, *, stage: str | None = None, **targets: Any) -> dict[str, Any]:
        """Read a checkpoint written by :meth:`save_checkpoint`; restores the engine state.

        Args:
            path: the checkpoint file.
            stage: when given, the checkpoint must have been written by this trainer.
            targets: objects to load saved entries into, by the same keys as at save time, e.g.
                ``model=model, optimizer=optimizer, scheduler=scheduler, generator=g``.
        Returns:
            The dict given to ``save_checkpoint`` (values as state dicts), without engine keys.
        Raises:
            CheckpointError (one line) when the file is missing, corrupt, foreign (another stage or
            model), or lacks an entry of ``targets``.
        """
        path = Path(path)
        payload = read_checkpoint(path, stage=stage)
        missing = sorted(k for k, t in targets.items() if t is not None and k not in payload)
        if missing or "__engine__" not in payload:
            raise CheckpointError(f"training checkpoint {path} has no entry {(missing or ['__engine__'])[0]!r}; "
                                  f"it has {sorted(payload)}")
        load_entry(path, "__engine__", self.load_engine_state, payload.pop("__engine__"))
        model = targets.get("model")
        if self.backend == "deepspeed" and any(self._is_deepspeed_object(t) for t in targets.values()):
            ds_dir = path.with_name(path.name + ".deepspeed")
            self._prepared[0].load_checkpoint(str(ds_dir), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=False)
            targets = {k: v for k, v in targets.items() if not self._is_deepspeed_object(v)}
        for key, target in targets.items():
            if target is None:
                continue
            value = payload[key]
            if isinstance(target, nn.Module):
                load_entry(path, key, lambda v, t=target: self.load_model_state_dict(t, v), value)
            elif isinstance(target, torch.optim.Optimizer):
                load_entry(path, key, lambda v, t=target: self._load_optimizer_state(t, v, model), value)
            elif isinstance(target, torch.Generator):
                load_entry(path, key, target.set_state, value)
            elif hasattr(target, "load_state_dict"):
                load_entry(path, key, target.load_state_dict, value)
            else:
                raise TypeError(f"cannot load checkpoint entry {key!r} into {type(target).__name__}")
        return payload

    def save_pretrained(self, model: nn.Module, directory: str | Path, dtype: torch.dtype | None = None) -> None:
        """Write the bare model as a pipeline-loadable ``config.json`` + ``model.safetensors``. Collective.

        Under FSDP the full weights are gathered first; only rank 0 writes.
        """
        bare = self.unwrap(model)
        if self.backend == "fsdp":
            state = self.model_state_dict(model)
            if self.is_main:
                from holst.utils.persist import CONFIG_NAME, WEIGHTS_NAME, save_safetensors

                directory = Path(directory)
                directory.mkdir(parents=True, exist_ok=True)
                state = {k: v for k, v in state.items() if not k.endswith("_mask_buffer")}
                if dtype is not None:
                    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
                bare.config.save_json(directory / CONFIG_NAME)
                save_safetensors(state, directory / WEIGHTS_NAME, metadata={"format": "pt"})
        elif self.backend == "deepspeed" and int(self.cfg.zero_stage) == 3:
            import deepspeed

            # ZeRO-3 partitions the parameters themselves: gather them (on every rank) to write them.
            with deepspeed.zero.GatheredParameters(list(bare.parameters()), modifier_rank=None):
                if self.is_main:
                    bare.save_pretrained(directory, dtype=dtype)
        elif self.is_main:
            bare.save_pretrained(directory, dtype=dtype)
        self.barrier()

    # ------------------------------------------------------------------ logging
    def log(self, step: int, metrics: dict[str, Any], *, total: int | None = None) -> None:
        """Print one progress line, append to ``out_dir/metrics.jsonl`` and write TensorBoard scalars.

        Tensor values are converted with ``.item()`` here, so the loop itself never syncs the host.
        Only rank 0 logs.
        """
        if not self.is_main:
            return
        values = {k: (float(v.detach().float().item()) if torch.is_tensor(v) else float(v)) for k, v in metrics.items()}
        now = time.perf_counter()
        elapsed = now - self._log_t0
        self._log_t0 = now
        parts = [f"step {step}" + (f"/{total}" if total else "")]
        for k, v in values.items():
            parts.append(f"{k} {v:.4g}")
        parts.append(f"{elapsed:.1f}s")
        if self.skipped_steps:
            parts.append(f"skipped {self.skipped_steps}")
        line = " | ".join(parts)
        try:
            from tqdm import tqdm

            tqdm.write(line, file=sys.stderr)
        except ImportError:
            print(line, file=sys.stderr)
        record = {"step": step, **values, "skipped_steps": self.skipped_steps, "time": time.time()}
        with open(self.out_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        tb = self._tensorboard()
        if tb is not None:
            for k, v in values.items():
                tb.add_scalar(f"train/{k}", v, step)
            tb.add_scalar("train/skipped_steps", self.skipped_steps, step)

    def _tensorboard(self) -> Any:
        if self._tb is None and getattr(self.cfg, "tensorboard", False):
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(self.out_dir / "tensorboard"))
            except ImportError:
                log.info("TensorBoard is not installed (pip install 'holst[train]'); logging to metrics.jsonl only")
                self._tb = False
        return self._tb or None

    def progress(self, total: int, initial: int = 0, desc: str = "train") -> Any:
        """A tqdm progress bar on rank 0 (a disabled one elsewhere); update it with ``set_postfix``."""
        from tqdm import tqdm

        return tqdm(total=total, initial=initial, desc=desc, disable=not self.is_main, dynamic_ncols=True,
                    file=sys.stderr, mininterval=1.0)

    # ------------------------------------------------------------------ teardown
    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.distributed and dist.is_initialized():
            if dist.get_backend() == "nccl":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a tensor over ranks (for logging a global loss)."""
        if not self.distributed:
            return value
        value = value.detach().clone().to(self._collective_device())
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def close(self) -> None:
        """Flush TensorBoard and tear down the process group this engine created."""
        if self._tb:
            self._tb.close()
            self._tb = None
        for sig, old in self._old_handlers.items():  # give the signals back to whoever had them
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._old_handlers = {}
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_process_group = False

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
