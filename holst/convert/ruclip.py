"""Official ruCLIP -> holst (reference.md §5).

An official ruCLIP directory (``ai-forever/ruclip-vit-*`` on the Hub) holds ``config.json`` (the
CLIP constructor arguments, plus the processor's ``mean``/``std``), ``pytorch_model.bin`` (a pickle
of the reference ``CLIP.state_dict()``, 302 keys for base-patch32-384) and ``bpe.model`` (its own
YouTokenToMe tokenizer). Our :class:`holst.rerank.clip.CLIPModel` uses the same parameter names, so
conversion is: read the config, load the weights safely (``weights_only=True``), check every key and
shape, and write a holst CLIP directory::

    DST/config.json + DST/model.safetensors     (CLIPModel.from_pretrained(DST))
    DST/tokenizer/bpe.model                      (BPETokenizer.from_pretrained(DST / "tokenizer"))
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch

from holst.config import ClipConfig
from holst.rerank.clip import CLIPModel
from holst.utils.persist import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointError,
    load_into,
    load_state_dict_file,
    read_json,
    save_safetensors,
)
from holst.utils.runtime import get_logger, resolve_dtype

log = get_logger(__name__)

REQUIRED_KEYS = ("embed_dim", "image_resolution", "vision_layers", "vision_width", "vision_patch_size",
                 "context_length", "vocab_size", "transformer_width", "transformer_heads", "transformer_layers")
CHECKPOINT_NAMES = ("pytorch_model.bin", "model.safetensors")
TOKENIZER_NAME = "bpe.model"


def ruclip_config(data: dict[str, Any], source: str = "config.json") -> ClipConfig:
    """A ClipConfig from ruCLIP's ``config.json`` mapping.

    Missing constructor keys raise CheckpointError naming them; keys we do not use are logged and
    ignored (``mean``/``std`` are kept: ruCLIP's processor reads them from the same file).
    """
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise CheckpointError(f"{source}: missing ruCLIP config key(s) {missing}")
    known = {f.name for f in dataclasses.fields(ClipConfig)}
    ignored = sorted(k for k in data if k not in known)
    if ignored:
        log.warning("%s: ignoring config key(s) %s", source, ignored)
    values = {k: v for k, v in data.items() if k in known and v is not None}
    return ClipConfig.from_dict(values)


def clean_state(state: Any, source: str) -> dict[str, torch.Tensor]:
    """Unwrap ``{'state_dict': ...}`` and a ``module.`` prefix; every value must be a tensor."""
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: expected a state dict, got {type(state).__name__}")
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{source}: entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key.removeprefix("module.")] = value
    return out


def load_ruclip_model(directory: str | Path, *, device: str | torch.device = "cpu",
                      dtype: torch.dtype | str | None = None) -> CLIPModel:
    """The CLIP weights of an official ruCLIP directory as a :class:`CLIPModel` (eval mode).

    Args:
        directory: holds ``config.json`` and ``pytorch_model.bin`` (or ``model.safetensors``).
        device: where the weights go.
        dtype: cast floating weights (default: keep the file's dtype).
    Raises:
        CheckpointError naming the file and listing missing / unexpected / mis-shaped keys.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"ruCLIP directory {directory} does not exist")
    config = ruclip_config(read_json(directory / CONFIG_NAME), str(directory / CONFIG_NAME))
    file = next((directory / n for n in CHECKPOINT_NAMES if (directory / n).is_file()), None)
    if file is None:
        raise CheckpointError(f"{directory}: no ruCLIP weights found (looked for {list(CHECKPOINT_NAMES)})")
    state = clean_state(load_state_dict_file(file, mmap=True), str(file))
    target = resolve_dtype(dtype) if dtype is not None else None
    state = {k: (v.to(target) if target is not None and v.is_floating_point() else v).to(device)
             for k, v in state.items()}
    with torch.device("meta"):
        model = CLIPModel(config)
    load_into(model, state, strict=True, source=str(file))
    return model.eval()


def load_ruclip(directory: str | Path, *, device: str | torch.device = "cpu",
                dtype: torch.dtype | str | None = None):
    """Load an official ruCLIP directory: the model and its own tokenizer.

    Args:
        directory: an official ruCLIP download (config.json, pytorch_model.bin, bpe.model).
        device: where the weights go (see :func:`load_ruclip_model`).
        dtype: weights dtype (see :func:`load_ruclip_model`).
    Returns:
        (CLIPModel, BPETokenizer). Text ids for the model:
        ``tokenizer.encode_batch(texts, model.config.context_length, keep_eos=True)``.
    """
    from holst.text import BPETokenizer

    directory = Path(directory)
    bpe = directory / TOKENIZER_NAME
    if not bpe.is_file():
        raise CheckpointError(f"{directory}: the ruCLIP tokenizer {TOKENIZER_NAME} is missing")
    model = load_ruclip_model(directory, device=device, dtype=dtype)
    tokenizer = BPETokenizer.load(bpe)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise CheckpointError(f"{bpe}: tokenizer vocab_size {tokenizer.vocab_size} exceeds the model's "
                              f"vocab_size {model.config.vocab_size}")
    return model, tokenizer


def convert_ruclip(src: str | Path, dst: str | Path, *, dtype: str | None = None) -> Path:
    """Write an official ruCLIP directory as a holst CLIP directory (see the module docstring).

    Returns:
        ``dst``; ``CLIPModel.from_pretrained(dst)`` reproduces the official features.
    """
    model, tokenizer = load_ruclip(src, dtype=dtype)
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    model.config.save_json(dst / CONFIG_NAME)
    save_safetensors(model.state_dict(), dst / WEIGHTS_NAME,
                     metadata={"format": "pt", "holst_class": "CLIPModel", "source": Path(src).name})
    tokenizer.save_pretrained(dst / "tokenizer")
    return dst


# ---------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``holst convert ruclip``."""
    parser.add_argument("src", help="official ruCLIP directory (config.json, pytorch_model.bin, bpe.model)")
    parser.add_argument("dst", help="output directory (config.json + model.safetensors + tokenizer/bpe.model)")
    parser.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16 (default: keep the file's dtype)")


def main(args: argparse.Namespace) -> int:
    """Run ``holst convert ruclip``: an official ruCLIP directory -> a CLIP directory; prints it."""
    dst = convert_ruclip(args.src, args.dst, dtype=args.dtype)
    log.info("wrote %s", dst)
    print(dst)
    return 0
