"""Training-step throughput through the real engine path (autocast, loss scaling, clipping, AdamW).

Each variant runs ``Engine.step`` on the DALL-E loss over random ids and reports tokens/s (batch *
(T + N) tokens per optimizer step), the median step time after the warm-up steps (compilation
included in ``warmup_s``, not in the median), the peak memory (CUDA: max allocated; CPU: growth of
the process's peak RSS) and, on CPU, the process CPU seconds per step (a busy shared machine
inflates wall time much more than CPU time). The variants of one run share the machine, so each
row's ``speedup_vs_baseline`` and ``share_of_gain`` compare like with like. The changes are added
one at a time, in this order:

- CPU (default preset emoji, the shipped model, batch 32): fp32 with the reference's explicit
  'math' attention, the loss over the full fp32 logits and AdamW with ``foreach=True`` (holst's CPU
  optimizer before the fused one; the baseline), then + sdpa, + bf16 autocast, + block-sparse
  attention ('sparse'), + the lean loss, + fused AdamW, + holst's dropout (four 16-bit fields from
  one 64-bit draw instead of torch's one bernoulli draw an element; the rows before run torch's),
  + ``torch.compile``.
- GPU (default preset malevich, batch 8): the reference's set-up (fp16 + loss scaling, 'math',
  full fp32 logits; reference fp16 step 26.8k tokens/s at batch 8 on an H100), then bf16 + sdpa,
  + sparse, + lean loss, + compile, and the last one again with activation checkpointing (on CUDA
  holst's dropout is torch's).

With ``--interleave`` every variant is built first and their steps are timed round-robin (step i of
each before step i + 1 of any): a shared CPU's slow phases then fall on all rows alike, which matters
on the dev box, where the same step drifts 10-20% over minutes. It needs memory for all models at
once and reports no per-row peak memory. The models then share caches and the allocator: on the dev
box the fp32 baseline's step ran 2.5-3.4 s among all eight rows but 2.1-2.2 s beside the compiled
row alone, so interleaving moves the ratios too.

With ``--rounds R`` the whole list runs R times over (each round sequential, or interleaved with
``--interleave``); each row reports the median of its rounds' step times, its ratio is the median of the
rounds' ratios, and ``rounds`` lists every round's step times: the spread shows what one run can say.

    .venv/bin/python bench/train.py [--preset emoji] [--batch 32] [--steps 5] [--threads 2] [--only N,..]
                                    [--interleave] [--rounds R]
    .venv/bin/python bench/train.py --variants gpu --preset tiny --batch 4   # the GPU list, smoke-tested on a CPU

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from timing import bench_device, device_label, interleaved_steps, timed_steps

from holst.config import DalleConfig, TrainConfig
from holst.dalle import DalleModel
from holst.presets import get_preset
from holst.train.engine import Engine
from holst.train.optim import build_optimizer, build_scheduler


@dataclass(frozen=True)
class Variant:
    """One benchmarked set-up; ``change`` names what it adds to the previous row."""

    change: str
    attn_impl: str
    precision: str
    lean_loss: bool = False
    fast_dropout: bool = False
    compile: bool = False
    checkpointing: bool = False
    fused_adamw: bool = True  # False: foreach AdamW, the CPU optimizer before the fused one


CPU_VARIANTS = [
    Variant("baseline: fp32, explicit attention, full fp32 logits, foreach AdamW", "math", "fp32", fused_adamw=False),
    Variant("+ sdpa attention", "sdpa", "fp32", fused_adamw=False),
    Variant("+ bf16 autocast", "sdpa", "bf16", fused_adamw=False),
    Variant("+ block-sparse attention", "sparse", "bf16", fused_adamw=False),
    Variant("+ lean loss", "sparse", "bf16", lean_loss=True, fused_adamw=False),
    Variant("+ fused AdamW", "sparse", "bf16", lean_loss=True),
    Variant("+ cheap dropout bits", "sparse", "bf16", lean_loss=True, fast_dropout=True),
    Variant("+ torch.compile", "sparse", "bf16", lean_loss=True, fast_dropout=True, compile=True),
]
GPU_VARIANTS = [
    Variant("baseline: reference set-up, fp16 + loss scaling, explicit attention, full fp32 logits", "math", "fp16"),
    Variant("+ bf16 autocast, sdpa attention", "sdpa", "bf16"),
    Variant("+ block-sparse attention", "sparse", "bf16"),
    Variant("+ lean loss", "sparse", "bf16", lean_loss=True),
    Variant("+ torch.compile", "sparse", "bf16", lean_loss=True, compile=True),
    Variant("+ activation checkpointing", "sparse", "bf16", lean_loss=True, compile=True, checkpointing=True),
]


def use_torch_dropout(model: DalleModel) -> None:
    """Replace the model's holst ``Dropout`` modules (16-bit fields, holst/dalle/dropout.py) by ``nn.Dropout``
    (one bernoulli draw an element), for good: each model of a run is built for one variant."""
    from holst.dalle.dropout import Dropout

    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, Dropout):
                setattr(module, name, torch.nn.Dropout(child.p))


def foreach_adamw(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The same AdamW (groups, hyper-parameters) with ``foreach=True`` instead of ``fused=True``: what
    holst's trainers ran on a CPU before the fused kernel (60 against 11 ms a step for the emoji model)."""
    groups = [dict(g, fused=False, foreach=True) for g in optimizer.param_groups]
    return torch.optim.AdamW(groups)


def _torch_attention_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    return F.dropout(x, p, training) if p > 0 else x


@contextlib.contextmanager
def torch_attention_dropout(enabled: bool) -> Iterator[None]:
    """While open (if ``enabled``), attention-probability dropout is ``F.dropout``. The function swapped in
    is always the same object, so a compiled model's guard on it holds from step to step."""
    import holst.dalle.attention as attention

    fast = attention.dropout
    if enabled:
        attention.dropout = _torch_attention_dropout
    try:
        yield
    finally:
        attention.dropout = fast


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def full_logits_loss(bare: DalleModel, model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The loss as it was before the lean loss: the whole (B, S, V) logits tensor, copied to fp32."""
    logits = model(ids)
    loss, _ = bare.compute_loss(ids, logits=logits.float())
    return loss


@dataclass
class Prepared:
    """One variant built and ready: ``step()`` runs one optimizer step (inside the variant's dropout set-up)."""

    variant: Variant
    engine: Engine
    step: Callable[[], torch.Tensor]
    tokens: int  # batch * (T + N) tokens per optimizer step


def prepare_variant(preset: str, batch: int, v: Variant, device: str, out_dir: str,
                    overrides: dict | None = None) -> Prepared:
    """Model, engine, optimizer and fixed random ids for one configuration (nothing run yet);
    ``overrides``: DalleConfig fields changed from the preset's."""
    cfg = TrainConfig(out_dir=out_dir, precision=v.precision, compile=v.compile, device=device,
                      tensorboard=False, grad_clip=1.0, warmup_steps=0, max_steps=1000)
    engine = Engine(cfg, install_signal_handler=False)
    config = get_preset(preset, **(overrides or {}))
    torch.manual_seed(0)
    bare = DalleModel(config, attn_impl=v.attn_impl)
    bare.gradient_checkpointing = v.checkpointing
    if not v.fast_dropout:
        use_torch_dropout(bare)
    def optim(m: torch.nn.Module) -> torch.optim.Optimizer:
        fused = build_optimizer(m, cfg)
        return fused if v.fused_adamw else foreach_adamw(fused)

    model, optimizer = engine.prepare(bare, optim)
    scheduler = build_scheduler(optimizer, cfg)
    model.train()
    g = torch.Generator().manual_seed(0)
    text = torch.randint(4, config.bpe_vocab_size, (batch, config.text_seq_length), generator=g)
    image = torch.randint(0, config.image_vocab_size, (batch, config.image_seq_length), generator=g)
    ids = torch.cat([text, image], 1).to(engine.device)  # (B, T + N)

    def step() -> torch.Tensor:
        with torch_attention_dropout(not v.fast_dropout), engine.autocast():
            if v.lean_loss:
                loss, _ = model(ids, return_loss=True)
            else:
                loss = full_logits_loss(bare, model, ids)
        engine.step(loss, optimizer, scheduler, model=model)
        return loss.detach()

    return Prepared(v, engine, step, batch * ids.shape[1])


def result_row(p: Prepared, t: dict, mem: dict) -> dict:
    """The JSON row of one variant from its :func:`timing.timed_steps`-style timings."""
    median = t["step_s"]
    return {**asdict(p.variant), "precision": p.engine.precision, "step_s": round(median, 4),
            "tokens_per_s": round(p.tokens / median, 1), "warmup_s": round(t["warmup_s"], 1),
            # CPU seconds of this process per step (all threads): less sensitive to other load on a CPU box
            "process_cpu_s": round(t["cpu_s"], 4), **mem, "loss": round(float(t["last"]), 4),
            "skipped_steps": p.engine.skipped_steps}


def bench_variant(preset: str, batch: int, steps: int, warmup: int, v: Variant, device: str) -> dict:
    """Median time of one optimizer step (after ``warmup`` steps) for one configuration, with its peak memory."""
    with tempfile.TemporaryDirectory() as out_dir:
        p = prepare_variant(preset, batch, v, device, out_dir)
        rss0 = _peak_rss_mb()  # the steps' growth, not the model's build
        if p.engine.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = timed_steps(p.step, steps, warmup, p.engine.device)
        if p.engine.device.type == "cuda":
            mem = {"peak_mem_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
        else:
            mem = {"peak_rss_growth_mb": round(_peak_rss_mb() - rss0, 1)}
        row = result_row(p, t, mem)
        p.engine.close()
        if p.engine.device.type == "cuda":
            torch.cuda.empty_cache()
        return row


def bench_interleaved(preset: str, batch: int, steps: int, warmup: int, variants: list[Variant], device: str,
                      overrides: dict | None = None) -> list[dict]:
    """All variants built at once and timed round-robin (step i of each before step i + 1 of any), so that a
    shared machine's drift hits every row alike; no per-row peak memory (the models share the process)."""
    with contextlib.ExitStack() as stack:
        prepared = [prepare_variant(preset, batch, v, device, stack.enter_context(tempfile.TemporaryDirectory()),
                                    overrides) for v in variants]
        timings = interleaved_steps([p.step for p in prepared], steps, warmup, prepared[0].engine.device)
        rows = [result_row(p, t, {}) for p, t in zip(prepared, timings)]
        for p in prepared:
            p.engine.close()
        return rows


def step_gemms(config: DalleConfig, batch: int) -> list[tuple[int, int, int]]:
    """(M, K, N) of every dense matmul of one training step: for each linear layer of the transformer (qkv,
    dense, fc1, fc2 of every layer) and of the lean loss's head (text rows over the text vocabulary, image rows
    over the image vocabulary), the forward product, the input gradient and the weight gradient."""
    m, h, f = batch * config.total_seq_length, config.hidden_size, config.mlp_ratio * config.hidden_size
    layer = [(m, h, 3 * h), (m, h, h), (m, h, f), (m, f, h)]  # (rows, in, out)
    head = [(batch * (config.text_seq_length - 1), h, config.vocab_size),
            (batch * config.image_seq_length, h, config.image_vocab_size)]
    gemms = []
    for rows, k, n in layer * config.num_layers + head:
        gemms += [(rows, k, n), (rows, n, k), (n, rows, k)]
    return gemms


def matmul_floor(config: DalleConfig, batch: int, passes: int, device: torch.device) -> dict:
    """Median seconds of one step's dense matmuls (:func:`step_gemms`) alone, back to back in bf16 on
    contiguous operands: what no change to the rest of the step can go below."""
    gemms = step_gemms(config, batch)
    operands = {(m, k, n): (torch.randn(m, k, dtype=torch.bfloat16, device=device),
                            torch.randn(k, n, dtype=torch.bfloat16, device=device)) for m, k, n in set(gemms)}

    def run() -> None:
        for shape in gemms:
            torch.mm(*operands[shape])

    seconds = timed_steps(run, passes, 1, device)["step_s"]
    flop = 2 * sum(m * k * n for m, k, n in gemms)
    return {"gflop": round(flop / 1e9, 1), "s": round(seconds, 4), "gflop_per_s": round(flop / seconds / 1e9, 1)}


def add_ratios(rows: list[dict]) -> None:
    """Speed-up of each row over the first, and each change's share of the best row's gain."""
    for r in rows:
        r["speedup_vs_baseline"] = round(r["tokens_per_s"] / rows[0]["tokens_per_s"], 3)
    add_shares(rows)


def add_shares(rows: list[dict]) -> None:
    """Each change's share of the best row's gain in tokens/s over the first row."""
    base = rows[0]["tokens_per_s"]
    total = max(r["tokens_per_s"] for r in rows) - base
    prev = base
    for r in rows:
        r["share_of_gain"] = round((r["tokens_per_s"] - prev) / total, 3) if total else None
        prev = r["tokens_per_s"]


def merge_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per variant from several rounds of the whole list (each with :func:`add_ratios` applied):
    the median round's fields, the median step time and ratio, and every round's step time and ratio."""
    rows = []
    for per_round in zip(*rounds):
        median = sorted(per_round, key=lambda r: r["step_s"])[len(per_round) // 2]
        ratios = sorted(r["speedup_vs_baseline"] for r in per_round)
        rows.append({**median, "speedup_vs_baseline": ratios[len(ratios) // 2],
                     "rounds": {"step_s": [r["step_s"] for r in per_round],
                                "speedup_vs_baseline": [r["speedup_vs_baseline"] for r in per_round]}})
    add_shares(rows)  # from the merged rows' own tokens/s
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--preset", default=None, help="default: malevich on CUDA, emoji on CPU")
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CUDA, 32 on CPU")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--only", default="", help="comma-separated variant indices to run (default: all)")
    parser.add_argument("--interleave", action="store_true",
                        help="build every variant first, then time their steps round-robin (a shared CPU's drift "
                             "then hits all rows alike; needs memory for all models at once; no per-row peak memory)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the whole list this many times; rows report medians over the rounds and each round")
    parser.add_argument("--variants", choices=("auto", "cpu", "gpu"), default="auto",
                        help="which list to run (auto: gpu on CUDA; gpu on a CPU is a smoke test with a tiny preset)")
    args = parser.parse_args()
    device = bench_device(args.device, args.threads)
    cuda = device == "cuda"
    preset = args.preset or ("malevich" if cuda else "emoji")
    batch = args.batch or (8 if cuda else 32)
    variants = GPU_VARIANTS if (args.variants == "gpu" or (args.variants == "auto" and cuda)) else CPU_VARIANTS
    if args.only:
        variants = [variants[int(i)] for i in args.only.split(",")]
    config = get_preset(preset)
    rounds = []
    for _ in range(max(1, args.rounds)):
        if args.interleave:
            rows = bench_interleaved(preset, batch, args.steps, args.warmup, variants, device)
        else:
            rows = [bench_variant(preset, batch, args.steps, args.warmup, v, device) for v in variants]
        add_ratios(rows)
        rounds.append(rows)
    rows = merge_rounds(rounds) if len(rounds) > 1 else rounds[0]
    floor = matmul_floor(config, batch, args.steps, torch.device(device))
    best = min(r["step_s"] for r in rows)
    floor["rest_of_best_step_s"] = round(best - floor["s"], 4)  # everything but the dense matmuls
    if variants[0] == CPU_VARIANTS[0]:
        floor["step_s_for_3x"] = round(rows[0]["step_s"] / 3, 4)  # issue 15's CPU target
    out = {
        "bench": "train_step",
        "device": device_label(device),
        "preset": preset, "parameters_m": round(config.num_parameters() / 1e6, 2), "batch": batch,
        "seq_len": config.total_seq_length, "steps": args.steps, "warmup": args.warmup, "interleaved": args.interleave,
        "rounds": len(rounds),
        "baseline": variants[0].change,
        "reference_fp16_tokens_per_s_h100": 26800 if preset == "malevich" and batch == 8 else None,
        "results": rows,
        "matmul_floor": floor,  # one step's dense matmuls alone, bf16
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
