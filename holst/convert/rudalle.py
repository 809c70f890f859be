"""Official ruDALL-E transformer checkpoints -> holst (reference.md §1.1-1.2, §12).

The official ``.bin`` files (Malevich ``pytorch_model_v3.bin``, ``_v2``, Emojich, Surrealist,
Kandinsky) are PyTorch pickles of the reference ``DalleModel.state_dict()``: our parameter names
are identical, so conversion is: load safely, drop the three mask buffers (we rebuild masks from
the config), check every key and shape, and build the model on the meta device so that the
weights are assigned, not copied (a 1.3B model never holds two fp32 copies; Kandinsky 12B can
stream into bf16/fp16 on one GPU).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from holst.config import DalleConfig
from holst.dalle.model import DalleModel
from holst.presets import get_preset
from holst.utils.persist import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    load_into,
    load_state_dict_file,
    save_safetensors,
)
from holst.utils.runtime import get_logger, resolve_dtype

log = get_logger(__name__)

# Mask buffers the reference saves (current layout, and the top-level layout before Nov 2021).
MASK_KEYS = (
    "transformer.row_mask", "transformer.col_mask", "transformer.conv_mask", "row_mask", "col_mask", "conv_mask",
)
# model_params keys of the reference that have no effect on the weights or numerics here.
IGNORED_PARAMS = ("is_bool_mask", "device", "fp16", "pretrained", "cache_dir")
CHECKPOINT_NAMES = ("pytorch_model_v3.bin", "pytorch_model.bin", "pytorch_model_v2.bin", "model.safetensors")


def config_from_params(preset: str | None = None, **model_params: Any) -> DalleConfig:
    """A DalleConfig from the reference's ``model_params`` keys (optionally on top of a preset).

    Unknown keys raise ConfigError naming them; reference-only keys (``is_bool_mask``...) are ignored.
    """
    params = {k: v for k, v in model_params.items() if k not in IGNORED_PARAMS}
    if preset is not None:
        return get_preset(preset, **params)
    return DalleConfig.from_dict(params)


def clean_official_state(state: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    """Drop mask buffers and a ``module.`` wrapper prefix; unwrap ``{'state_dict': ...}`` / ``{'module': ...}``."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: expected a state dict, got {type(state).__name__}")
    for wrapper in ("state_dict", "module", "model"):
        if wrapper in state and isinstance(state[wrapper], dict) and not isinstance(state[wrapper], torch.Tensor):
            state = state[wrapper]
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        key = key[len("module."):] if key.startswith("module.") else key
        if key in MASK_KEYS:
            continue
        out[key] = value
    return out


def find_checkpoint(path: str | Path) -> Path:
    """A file path, or the official file inside a downloaded model directory."""
    path = Path(path)
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: no checkpoint found (looked for {list(CHECKPOINT_NAMES)})")
    return path


def load_rudalle_transformer(path: str | Path, *, preset: str | None = None, device: str | torch.device = "cpu",
                             dtype: torch.dtype | str | None = None, **model_params: Any) -> DalleModel:
    """Load an official ruDALL-E transformer checkpoint into a :class:`DalleModel` (eval mode).

    Args:
        path: the official ``.bin`` (or a directory holding it). Loaded with ``weights_only=True``
            and memory-mapped, so no pickled code runs and no second copy is made.
        preset: optional base preset ('malevich', 'emojich', 'kandinsky', ...).
        device: where the weights end up; tensors move one by one (streaming).
        dtype: cast floating weights while streaming (e.g. torch.bfloat16 for Kandinsky on one GPU).
            Default: keep the file's dtype (fp32 for the official files on CPU).
        model_params: the reference's ``model_params`` keys (num_layers, hidden_size, ..., hf_version).
    Returns:
        DalleModel whose ``forward(input_ids)`` gives the reference's logits.
    Raises:
        CheckpointError listing missing, unexpected or mis-shaped keys, or naming an unreadable file.
    """
    config = config_from_params(preset, **model_params)
    file = find_checkpoint(path)
    state = clean_official_state(load_state_dict_file(file, mmap=True), str(file))
    target_dtype = resolve_dtype(dtype) if dtype is not None else None
    state = {k: _stream(v, device, target_dtype) for k, v in state.items()}
    with torch.device("meta"):
        model = DalleModel(config)
    load_into(model, state, strict=True, source=str(file))
    return model.eval()


def _stream(t: torch.Tensor, device: str | torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    """Move one tensor (cast first when it shrinks, so peak memory stays at the smaller size)."""
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.to(device)


def convert_rudalle(src: str | Path, dst: str | Path, *, preset: str | None = None, dtype: str | None = None,
                    **model_params: Any) -> Path:
    """Write an official checkpoint as a holst component directory (config.json + model.safetensors).

    Returns:
        The destination directory; ``DalleModel.from_pretrained(dst)`` loads it bit-exactly.
    """
    model = load_rudalle_transformer(src, preset=preset, dtype=dtype, **model_params)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    model.config.save_json(dst / CONFIG_NAME)
    save_safetensors(model.state_dict(), dst / WEIGHTS_NAME, metadata={"format": "pt", "holst_class": "DalleModel",
                                                                        "source": Path(src).name})
    return dst


# ---------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``holst convert rudalle``."""
    parser.add_argument("src", help="official checkpoint (.bin) or the directory it was downloaded to")
    parser.add_argument("dst", help="output directory (config.json + model.safetensors)")
    parser.add_argument("--preset", default="malevich",
                        help="base config: malevich (v3), malevich_v2, emojich (v2), surrealist, kandinsky, dummy")
    parser.add_argument("--hf-version", choices=("v2", "v3"), default=None, help="override the preset's hf_version")
    parser.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: keep the file's dtype)")


def main(args: argparse.Namespace) -> int:
    """Run ``holst convert rudalle``: an official transformer checkpoint -> a DalleModel directory; prints it."""
    params = {"hf_version": args.hf_version} if args.hf_version else {}
    dst = convert_rudalle(args.src, args.dst, preset=args.preset, dtype=args.dtype, **params)
    log.info("wrote %s", dst)
    print(dst)
    return 0
