"""Transformer forward and training-step timing, fused attention vs the reference-style kernel.

Builds a preset with random weights (malevich on CUDA, 'small' on CPU unless --preset is given),
times a forward over the full sequence (T + N tokens, 1152 for the official shape) and a training
step (forward + loss + backward + AdamW), for attn_impl='sdpa' (ours) and 'math' (the reference's
explicit masked softmax with PB-relax) in the same run. Prints one JSON object.

    .venv/bin/python bench/dalle.py [--preset malevich] [--batch 8] [--dtype bf16] [--steps 5]
"""

from __future__ import annotations

import argparse
import json

import torch
from timing import timed

from holst.dalle import DalleModel
from holst.presets import get_preset
from holst.utils.runtime import resolve_device, resolve_dtype


def bench_impl(preset: str, impl: str, batch: int, dtype: torch.dtype, device: torch.device, steps: int,
               train: bool) -> dict:
    config = get_preset(preset)
    torch.manual_seed(0)
    model = DalleModel(config, attn_impl=impl).to(device)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(4, config.bpe_vocab_size, (batch, config.text_seq_length), generator=g)
    image = torch.randint(0, config.image_vocab_size, (batch, config.image_seq_length), generator=g)
    ids = torch.cat([text, image], 1).to(device)
    tokens = batch * ids.shape[1]
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    model.eval()

    def forward():
        with torch.no_grad(), autocast:
            model(ids)

    result = {"impl": impl, "forward_s": timed(forward, steps, device)}
    result["forward_tokens_per_s"] = tokens / result["forward_s"]
    if train:
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

        def step():
            with autocast:
                loss, _ = model.compute_loss(ids)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        result["train_step_s"] = timed(step, steps, device)
        result["train_tokens_per_s"] = tokens / result["train_step_s"]
    if device.type == "cuda":
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default=None)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-train", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    preset = args.preset or ("malevich" if device.type == "cuda" else "small")
    batch = args.batch or (8 if device.type == "cuda" else 2)
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    config = get_preset(preset)
    out = {
        "bench": "dalle_forward_train", "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "preset": preset, "params": config.num_parameters(), "batch": batch,
        "seq_len": config.total_seq_length, "dtype": str(dtype).replace("torch.", ""),
        "results": [bench_impl(preset, impl, batch, dtype, device, args.steps, not args.no_train)
                    for impl in ("sdpa", "math")],
    }
    ours, ref = out["results"]
    out["speedup_forward"] = ref["forward_s"] / ours["forward_s"]
    if "train_step_s" in ours:
        out["speedup_train"] = ref["train_step_s"] / ours["train_step_s"]
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
