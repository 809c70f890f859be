"""Training-step throughput through the real engine path (autocast, loss scaling, clipping, AdamW).

Each variant runs ``Engine.step`` on ``DalleModel.compute_loss`` over random ids and reports
tokens/s (batch * (T + N) tokens per optimizer step), the median step time and the peak memory
(CUDA: max allocated; CPU: growth of the process's peak RSS) and, on CPU, the process CPU seconds per
step (a busy shared machine inflates wall time but much less the CPU time). Variants of one run share the device,
so the baseline row is comparable:

- GPU (default preset malevich, batch 8): the reference's set-up, fp16 + loss scaling + the
  explicit 'math' attention (reference fp16 step: 26.8k tokens/s at batch 8 on an H100), against
  bf16 + sdpa, and bf16 + sdpa + activation checkpointing.
- CPU (default preset emoji, the shipped model, batch 32): fp32 'math' (baseline) against fp32 sdpa
  and bf16-autocast sdpa.

    .venv/bin/python bench/train.py [--preset emoji] [--batch 32] [--steps 5] [--threads 2]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

import torch

from holst.config import TrainConfig
from holst.dalle import DalleModel
from holst.presets import get_preset
from holst.train.engine import Engine
from holst.train.optim import build_optimizer, build_scheduler


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def bench_variant(preset: str, batch: int, steps: int, *, attn_impl: str, precision: str, checkpointing: bool,
                  device: str) -> dict:
    """Median time of one optimizer step (after two warm-up steps) for one configuration."""
    with tempfile.TemporaryDirectory() as out_dir:
        cfg = TrainConfig(out_dir=out_dir, precision=precision, device=device, tensorboard=False, grad_clip=1.0,
                          warmup_steps=0, max_steps=1000)
        engine = Engine(cfg, install_signal_handler=False)
        config = get_preset(preset)
        torch.manual_seed(0)
        model = DalleModel(config, attn_impl=attn_impl)
        model.gradient_checkpointing = checkpointing
        model, optimizer = engine.prepare(model, None)
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, cfg)
        g = torch.Generator().manual_seed(0)
        text = torch.randint(4, config.bpe_vocab_size, (batch, config.text_seq_length), generator=g)
        image = torch.randint(0, config.image_vocab_size, (batch, config.image_seq_length), generator=g)
        ids = torch.cat([text, image], 1).to(engine.device)  # (B, T + N)
        rss0 = _peak_rss_mb()
        if engine.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

        def step() -> None:
            with engine.autocast():
                logits = model(ids)
            loss, _ = model.compute_loss(ids, logits=logits)
            engine.step(loss, optimizer, scheduler, model=model)

        times, cpu_times = [], []
        for i in range(steps + 2):
            _sync(engine.device)
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            _sync(engine.device)
            if i >= 2:
                times.append(time.perf_counter() - t0)
                cpu_times.append(time.process_time() - c0)
        median = sorted(times)[len(times) // 2]
        cpu_median = sorted(cpu_times)[len(cpu_times) // 2]
        tokens = batch * ids.shape[1]
        if engine.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated() / 2**20
            mem = {"peak_mem_mb": round(peak, 1)}
        else:
            mem = {"peak_rss_growth_mb": round(_peak_rss_mb() - rss0, 1)}
        result = {"attn_impl": attn_impl, "precision": engine.precision, "checkpointing": checkpointing,
                  "step_s": round(median, 4), "tokens_per_s": round(tokens / median, 1),
                  # CPU seconds of this process per step (all threads): less sensitive to other load on a CPU box
                  "process_cpu_s": round(cpu_median, 4), **mem,
                  "skipped_steps": engine.skipped_steps}
        engine.close()
        if engine.device.type == "cuda":
            torch.cuda.empty_cache()
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--preset", default=None, help="default: malevich on CUDA, emoji on CPU")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CUDA, 32 on CPU")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and args.device in ("auto", "cuda")
    device = "cuda" if cuda else "cpu"
    preset = args.preset or ("malevich" if cuda else "emoji")
    batch = args.batch or (8 if cuda else 32)
    if cuda:
        variants = [("math", "fp16", False), ("sdpa", "bf16", False), ("sdpa", "bf16", True)]
    else:
        variants = [("math", "fp32", False), ("sdpa", "fp32", False), ("sdpa", "bf16", False)]
    config = get_preset(preset)
    rows = [bench_variant(preset, batch, args.steps, attn_impl=a, precision=p, checkpointing=c, device=device)
            for a, p, c in variants]
    base = rows[0]["tokens_per_s"]
    for r in rows:
        r["speedup_vs_baseline"] = round(r["tokens_per_s"] / base, 3)
    out = {
        "bench": "train_step",
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
        "preset": preset, "parameters_m": round(config.num_parameters() / 1e6, 2), "batch": batch,
        "seq_len": config.total_seq_length, "steps": args.steps,
        "baseline": f"{variants[0][0]} attention, {variants[0][1]}",
        "reference_fp16_tokens_per_s_h100": 26800 if preset == "malevich" and batch == 8 else None,
        "results": rows,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
