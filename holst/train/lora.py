"""Parameter-efficient fine-tuning: freezing by name patterns and LoRA adapters.

LoRA (Hu et al. 2021, arXiv 2106.09685) adds a low-rank update to chosen ``nn.Linear`` layers:
``y = W x + b + (alpha / r) * B (A x)`` with A (r, in) small random and B (out, r) zero, so training
starts from the unchanged model. The adapters live *on* the Linear modules as parameters
``lora_A`` / ``lora_B`` applied by a forward hook, so the base model's parameter names do not change:
the base checkpoint still loads, and an adapter file holds only the ``*.lora_A`` / ``*.lora_B``
tensors. :func:`merge_lora` folds ``W += (alpha / r) B A`` into the weights and removes the adapters.

Adapter directory: ``lora.json`` (rank, alpha, targets) + ``lora.safetensors``.
"""

from __future__ import annotations

import fnmatch
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from holst.config import ConfigError
from holst.utils.persist import CheckpointError, load_state_dict_file, save_safetensors

LORA_CONFIG = "lora.json"
LORA_WEIGHTS = "lora.safetensors"

# The Emojich recipe (reference.md §7): train everything except self-attention and feed-forward.
EMOJICH_FREEZE = ("transformer.layers.*.attention.*", "transformer.layers.*.mlp.*")
# Default LoRA targets of the DALL-E transformer: attention in/out projections and the MLP.
DALLE_LORA_TARGETS = ("*.attention.query_key_value", "*.attention.dense", "*.mlp.dense_h_to_4h", "*.mlp.dense_4h_to_h")


def _matches(name: str, patterns: tuple[str, ...] | list[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def freeze_parameters(model: nn.Module, patterns: list[str] | tuple[str, ...]) -> list[str]:
    """Set ``requires_grad=False`` on parameters whose name matches a glob pattern.

    Args:
        model: the module.
        patterns: fnmatch globs over ``named_parameters()`` names, e.g. ``transformer.layers.*.mlp.*``.
    Returns:
        The frozen names.
    Raises:
        ValueError when a pattern matches no parameter (a typo would silently train everything).
    """
    frozen, used = [], set()
    for name, p in model.named_parameters():
        for pat in patterns:
            if fnmatch.fnmatchcase(name, pat):
                used.add(pat)
                p.requires_grad_(False)
                frozen.append(name)
                break
    unused = [p for p in patterns if p not in used]
    if unused:
        raise ConfigError(f"freeze pattern(s) {unused} match no parameter; names look like "
                         f"{[n for n, _ in model.named_parameters()][:4]}")
    return frozen


def _lora_hook(module: nn.Linear, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
    x = module.lora_dropout(inputs[0])
    # x (..., in) @ A^T (in, r) @ B^T (r, out) -> (..., out)
    update = (x.to(module.lora_A.dtype) @ module.lora_A.t()) @ module.lora_B.t()
    return output + update.to(output.dtype) * module.lora_scaling


def apply_lora(model: nn.Module, *, rank: int, alpha: float, targets: list[str] | tuple[str, ...] = DALLE_LORA_TARGETS,
               dropout: float = 0.0, generator: torch.Generator | None = None, freeze_base: bool = True) -> list[str]:
    """Add LoRA adapters to every ``nn.Linear`` whose module name matches a target glob.

    Args:
        model: the module (adapters are created on the device/dtype of each Linear's weight).
        rank: r > 0.
        alpha: scaling numerator (update scaled by alpha / r).
        targets: fnmatch globs over module names.
        dropout: dropout on the adapter input.
        generator: for A's random init.
        freeze_base: freeze every non-LoRA parameter (the usual LoRA set-up).
    Returns:
        Names of the adapted modules.
    """
    if rank <= 0:
        raise ValueError(f"lora_rank={rank!r} must be > 0")
    adapted = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not _matches(name, targets):
            continue
        if hasattr(module, "lora_A"):
            raise ValueError(f"{name} already has a LoRA adapter")
        w = module.weight
        a = torch.empty(rank, module.in_features, dtype=torch.float32)
        # Kaiming-uniform with a=sqrt(5), as nn.Linear and the LoRA paper's reference code.
        bound = 1.0 / math.sqrt(module.in_features)
        a.uniform_(-bound, bound, generator=generator)
        module.lora_A = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        module.lora_B = nn.Parameter(torch.zeros(module.out_features, rank, device=w.device, dtype=w.dtype))
        module.lora_scaling = float(alpha) / rank
        module.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        module._lora_handle = module.register_forward_hook(_lora_hook)
        adapted.append(name)
    if not adapted:
        raise ConfigError(f"lora_targets {list(targets)} match no nn.Linear module")
    if freeze_base:
        for pname, p in model.named_parameters():
            p.requires_grad_(pname.endswith(".lora_A") or pname.endswith(".lora_B"))
    model._lora_config = {"rank": rank, "alpha": float(alpha), "targets": list(targets), "dropout": dropout}
    return adapted


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter tensors (names end with ``.lora_A`` / ``.lora_B``), detached on CPU."""
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def save_lora(model: nn.Module, directory: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``lora.json`` + ``lora.safetensors`` (adapters only, a few MB for a 1.3B model).

    Args:
        model: a model with adapters from :func:`apply_lora`.
        directory: output directory.
        state: the adapter tensors if already gathered (e.g. from a sharded model); else taken from model.
    """
    config = getattr(model, "_lora_config", None)
    if config is None:
        raise ValueError("the model has no LoRA adapters (apply_lora was not called)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = lora_state_dict(model) if state is None else {k: v for k, v in state.items()
                                                           if k.endswith((".lora_A", ".lora_B"))}
    save_safetensors(state, directory / LORA_WEIGHTS, metadata={"format": "pt", "holst_class": "LoRA"})
    (directory / LORA_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Fold every adapter into its Linear weight (``W += alpha/r * B @ A``) and remove it.

    Returns:
        Names of the merged modules; afterwards the model has exactly the base parameter names.
    """
    merged = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and hasattr(module, "lora_A"):
            delta = (module.lora_B.float() @ module.lora_A.float()) * module.lora_scaling  # (out, r) @ (r, in)
            module.weight.add_(delta.to(module.weight.dtype))
            module._lora_handle.remove()
            for attr in ("lora_A", "lora_B", "lora_scaling", "lora_dropout", "_lora_handle"):
                delattr(module, attr)
            merged.append(name)
    if hasattr(model, "_lora_config"):
        del model._lora_config
    return merged


def load_lora(model: nn.Module, directory: str | Path, *, merge: bool = True) -> nn.Module:
    """Attach the adapters saved in ``directory`` to a base model, and merge them by default.

    Args:
        model: the base model the adapters were trained on.
        directory: written by :func:`save_lora`.
        merge: fold into the weights (no runtime cost); False keeps them as trainable adapters.
    Returns:
        ``model`` (modified in place).
    Raises:
        CheckpointError when the files are missing or do not fit the model.
    """
    directory = Path(directory)
    cfg_path = directory / LORA_CONFIG
    if not cfg_path.is_file():
        raise CheckpointError(f"{directory} is not a LoRA adapter directory: {LORA_CONFIG} is missing")
    config: dict[str, Any] = json.loads(cfg_path.read_text(encoding="utf-8"))
    state = load_state_dict_file(directory / LORA_WEIGHTS)
    apply_lora(model, rank=int(config["rank"]), alpha=float(config["alpha"]), targets=config["targets"],
               dropout=float(config.get("dropout", 0.0)), freeze_base=not merge)
    expected = lora_state_dict(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(f"LoRA adapters in {directory} do not fit the model: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}, mis-shaped {shapes[:4]}")
    model.load_state_dict(state, strict=False)
    if merge:
        merge_lora(model)
    return model
