"""Sber VQGAN (ruDALL-E's image tokenizer) checkpoint -> holst ``VQGAN`` (reference.md §4).

The official ``vqgan.gumbelf8-sber.model.ckpt`` is a Lightning checkpoint: weights under
``state_dict`` with GumbelVQ-relative names (``encoder.*``, ``decoder.*``, ``quantize.proj``,
``quantize.embed``, ``quant_conv``, ``post_quant_conv``) plus extra Lightning entries. The DWT
checkpoint ``vqgan.gumbelf8-sber-dwt.model.ckpt`` holds the whole ``vae`` (names prefixed
``model.``) with ``decoder.post_quant_conv``, ``decoder.decoder.*`` (12 output channels) and the
Haar filters ``decoder.idwt.*``. Our names equal taming's, so conversion is a prefix strip plus
shape checks. Loading never executes code (``torch.load(weights_only=True)``).

CLI: ``holst convert vqgan SRC DST [--param ch=64 ...] [--dtype fp32]``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from holst.config import ConfigError, VQGANConfig
from holst.utils.persist import CheckpointError, load_into, load_state_dict_file
from holst.utils.runtime import get_logger, resolve_dtype
from holst.vqgan import VQGAN

log = get_logger("holst.convert.vqgan")

# The reference yml's ddconfig keys plus the codebook shape: what a taming GumbelVQ is built from.
SBER_PARAMS = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "z_channels", "resolution", "in_channels",
               "out_ch", "dropout", "double_z", "n_embed", "embed_dim", "kl_weight")
_ANCHOR = "encoder.conv_in.weight"
_MODULES = ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv")


def extract_vqgan_state(raw: dict[str, Any], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """GumbelVQ-relative tensors from a Lightning checkpoint / raw state dict (any key prefix).

    The prefix is whatever precedes ``encoder.conv_in.weight`` (``''``, ``'model.'``,
    ``'vae.model.'``); other entries (Lightning's ``loss.*``, discriminator, optimizer) are dropped.

    Raises:
        CheckpointError when no VQGAN encoder is found.
    """
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else raw
    if not isinstance(state, dict):
        raise CheckpointError(f"{source}: expected a state dict (or a Lightning checkpoint with 'state_dict')")
    anchors = [k for k in state if isinstance(k, str) and k.endswith(_ANCHOR)]
    if not anchors:
        raise CheckpointError(f"{source} holds no VQGAN weights: no key ends with {_ANCHOR!r} "
                              f"(first keys: {list(state)[:5]})")
    prefix = min(anchors, key=len)[: -len(_ANCHOR)]
    out = {k[len(prefix):]: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefix)
           and k[len(prefix):].split(".", 1)[0] in _MODULES and torch.is_tensor(v)}
    dropped = [k for k in state if not (isinstance(k, str) and k[len(prefix):] in out)]
    if dropped:
        log.info("%s: ignoring %d non-VQGAN entries (e.g. %s)", source, len(dropped), dropped[:3])
    return out


def load_sber_vqgan(path: str | Path, *, dwt: bool | None = None, strict: bool = True, **params: Any) -> VQGAN:
    """Read the official Sber VQGAN checkpoint (or a smaller one in the same layout).

    Args:
        path: ``.ckpt`` / ``.pt`` / ``.safetensors`` file.
        dwt: use the DWT decoder (512 px output); None = detect from the keys.
        strict: missing or unexpected keys raise (the reference loads with strict=False, silently).
        params: the reference yml's ddconfig keys (ch, ch_mult, num_res_blocks, attn_resolutions,
            z_channels, resolution, in_channels, out_ch, dropout, double_z) plus n_embed, embed_dim,
            kl_weight; defaults are the official values (reference.md §4.1).
    Returns:
        Our VQGAN (Gumbel quantizer), fp32, in eval mode, on the CPU.
    Raises:
        CheckpointError naming the file and every mismatching key; ConfigError for unknown params.
    """
    unknown = sorted(set(params) - set(SBER_PARAMS))
    if unknown:
        raise ConfigError(f"load_sber_vqgan: unknown parameter(s) {unknown}; allowed: {list(SBER_PARAMS)}")
    state = extract_vqgan_state(load_state_dict_file(path, mmap=False), str(path))
    if dwt is None:
        dwt = "decoder.decoder.conv_in.weight" in state
    if dwt and params.get("out_ch") == 12:
        params = {k: v for k, v in params.items() if k != "out_ch"}  # the reference mutates its yml to 12
    config = VQGANConfig(**params, quantizer="gumbel", decoder="dwt" if dwt else "plain")
    with torch.device("meta"):
        model = VQGAN(config)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        load_into(model, state, strict=strict, source=str(path))
    except CheckpointError as e:
        raise CheckpointError(f"{e}. If the checkpoint is not the official 256 px Sber model, pass its yml "
                              f"values, e.g. load_sber_vqgan(path, ch=..., ch_mult=[...], n_embed=...)") from None
    if not strict:  # parameters missing from the file are still on the meta device: refuse to run them
        meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if meta:
            raise CheckpointError(f"{path}: no values for {meta[:10]}{' ...' if len(meta) > 10 else ''}")
    if dwt:
        _check_haar(model, str(path))
    return model.eval()


def _check_haar(model: VQGAN, source: str) -> None:
    s = 1.0 / math.sqrt(2.0)
    idwt = model.decoder.idwt
    for name, want in (("g0_col", (s, s)), ("g1_col", (s, -s)), ("g0_row", (s, s)), ("g1_row", (s, -s))):
        got = getattr(idwt, name).flatten().tolist()
        if any(abs(a - b) > 1e-4 for a, b in zip(got, want)):
            raise CheckpointError(f"{source}: decoder.idwt.{name} = {got} is not the Haar (db1) filter {list(want)}")


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``holst convert vqgan SRC DST``."""
    parser.add_argument("src", help="official checkpoint (vqgan.gumbelf8-sber.model.ckpt or the -dwt one)")
    parser.add_argument("dst", help="output directory (config.json + model.safetensors)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help=f"yml value for a non-official model, parsed as YAML; keys: {', '.join(SBER_PARAMS)}")
    dwt = parser.add_mutually_exclusive_group()
    dwt.add_argument("--dwt", dest="dwt", action="store_true", default=None, help="force the DWT decoder")
    dwt.add_argument("--no-dwt", dest="dwt", action="store_false", help="force the plain decoder")
    parser.add_argument("--dtype", default="fp32", help="weights dtype to write: fp32 (default), bf16, fp16")


def main(args: argparse.Namespace) -> int:
    """Run ``holst convert vqgan``: the Sber VQGAN checkpoint -> a VQGAN directory; prints it."""
    import yaml

    params: dict[str, Any] = {}
    for item in args.param:
        if "=" not in item:
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE")
        key, raw = item.split("=", 1)
        params[key.strip()] = yaml.safe_load(raw)
    model = load_sber_vqgan(args.src, dwt=args.dwt, **params)
    dtype = resolve_dtype(args.dtype)
    model.save_pretrained(args.dst, dtype=None if dtype == torch.float32 else dtype)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.dst}: VQGAN f{model.downsample_factor}, {model.config.n_embed} codes, "
          f"{n / 1e6:.2f}M parameters, decoder {model.config.decoder}")
    return 0
