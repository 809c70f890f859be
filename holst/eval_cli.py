"""``holst eval vqgan|dalle|pipeline|shapes|recognise``: offline evaluation reports (JSON + Markdown + PNG).

```
holst eval vqgan    --model models/default --data data/default --out eval/     # PSNR, SSIM, codebook, FD-EffLite0
holst eval dalle    --model models/default --data data/default --out eval/     # held-out text/image loss, bits/token
holst eval pipeline --model models/default --data data/default --out models/default/eval --num-captions 16
holst eval shapes   --model models/shapes  --out eval/                         # attribute accuracy, held-out combos
holst eval recognise --model models/default --data data/default --out eval/ -n 4   # kNN recognisability
```
``--model`` is a pipeline directory (its ``vqgan/``, ``dalle/``, ``tokenizer/`` are used) or, for
vqgan/dalle, a component directory; ``random:tiny`` / ``random:emoji`` is an untrained pipeline (smoke tests),
loaded by :func:`holst.cli_common.load_pipeline` as in every command. The sampling flags (``--top-k``,
``--top-p``, ``--temperature``, ``--guidance-scale``, ``--sample-batch-size``) are the
:class:`holst.sampling.SamplingSettings` fields, with its ranges.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from holst.cli_common import (
    add_dataclass_arguments,
    add_runtime_arguments,
    add_sampling_arguments,
    check_sampling_flags,
    given_values,
)
from holst.cli_common import load_pipeline as _load_pipeline
from holst.config import EvalConfig
from holst.errors import InputError
from holst.utils.runtime import get_logger, resolve_device, resolve_dtype, set_threads

log = get_logger("holst.eval")


# The SamplingSettings an eval report lets the user set (num_images, seeds and ranking are the report's own).
EVAL_SAMPLING = ("top_k", "top_p", "temperature", "guidance_scale", "batch_size")


# The EvalConfig fields that are flags (default None = not given: EvalConfig's default applies). Hand-written:
# --batch-size (its dest is eval_batch_size, beside the SamplingSettings batch_size of --sample-batch-size),
# --lang (the choices differ per report) and recognise's --num-captions (its own default, 16).
EVAL_FLAGS = ("seed", "split", "fd", "fd_resolution", "num_captions", "num_images", "candidates", "limit",
              "grid_rows")
EVAL_SPELLINGS = {"num_images": ["--num-images", "-n"]}


def _config_flags(parser: argparse.ArgumentParser, *names: str, helps: dict[str, str] | None = None) -> None:
    add_dataclass_arguments(parser, EvalConfig, names, flags=EVAL_SPELLINGS, helps=helps)


def _lang(parser: argparse.ArgumentParser, choices: tuple[str, ...] = ("ru", "en")) -> None:
    parser.add_argument("--lang", default=EvalConfig().lang, choices=choices, help="caption language (default ru)")


def _common(parser: argparse.ArgumentParser, name: str) -> None:
    d = EvalConfig()
    parser.add_argument("--model", required=True,
                        help="pipeline directory (e.g. models/default)"
                             + (", or the component's own directory" if name in ("vqgan", "dalle") else "")
                             + "; random:tiny|random:emoji = an untrained pipeline")
    parser.add_argument("--out", required=True, help="report folder (created); files <command>.json/.md/_*.png")
    add_runtime_arguments(parser, device="cpu", dtype="fp32")  # reports compare like with like: CPU fp32 by default
    parser.add_argument("--batch-size", dest="eval_batch_size", type=int, default=d.batch_size,
                        help=f"images per forward (default {d.batch_size})")
    _config_flags(parser, "seed")
    if name not in ("shapes", "recognise"):
        _config_flags(parser, "split")
    if name in ("vqgan", "pipeline"):
        _config_flags(parser, "fd", "fd_resolution")
        parser.add_argument("--cache-dir", default=None, help="reference statistics cache "
                                                              "(default $HOLST_CACHE/eval-stats)")


def _sampling(parser: argparse.ArgumentParser) -> None:
    _config_flags(parser, "num_captions", "num_images")
    _lang(parser)
    add_sampling_arguments(parser, EVAL_SAMPLING, flags={"batch_size": ["--sample-batch-size"]})
    _config_flags(parser, "grid_rows")


def add_arguments_for(name: str, parser: argparse.ArgumentParser) -> None:
    """Options of ``holst eval <name>``."""
    _common(parser, name)
    if name == "vqgan":
        parser.add_argument("--data", required=True, help="dataset folder with a split column (e.g. data/default)")
        _config_flags(parser, "limit")
        parser.add_argument("--size", type=int, default=None, help="encoder input size (default: the VQGAN's)")
    elif name == "dalle":
        parser.add_argument("--data", default=None, help="dataset folder; held-out images are encoded with the VQGAN")
        parser.add_argument("--codes", default=None,
                            help="held-out code shards instead (holst prepare codes --split test)")
        parser.add_argument("--tokenizer", default=None, help="tokenizer dir / bpe.model (if --model is a dalle dir)")
        parser.add_argument("--vqgan", default=None, help="VQGAN dir (if --model is a dalle dir and --data is used)")
        _lang(parser, ("ru", "en", "both"))
        _config_flags(parser, "limit", helps={"limit": "at most this many held-out pairs (0 = all)"})
    elif name == "pipeline":
        parser.add_argument("--data", required=True, help="dataset folder with a split column (e.g. data/default)")
        _sampling(parser)
        _config_flags(parser, "candidates")
    elif name == "recognise":
        parser.add_argument("--data", default=None, help="dataset folder with concept + split columns (all its images "
                                                         "are the real reference), e.g. data/default")
        parser.add_argument("--reference", default=None,
                            help="a compact reference file instead of --data (e.g. "
                                 "models/default/eval/recognise_reference.safetensors)")
        parser.add_argument("--save-reference", default=None, help="also write the compact reference of --data here")
        parser.add_argument("--reference-dim", type=int, default=128,
                            help="dimensions kept by --save-reference (default 128)")
        parser.add_argument("--num-captions", type=int, default=16,
                            help="captions per group (training / held-out concepts), 0 = all (default 16)")
        _config_flags(parser, "num_images")
        _lang(parser)
        parser.add_argument("--neighbours", type=int, default=5, help="nearest real images looked at (default 5)")
        _config_flags(parser, "fd_resolution", helps={
            "fd_resolution": "images are resized to this for EfficientNet-Lite0 (default 224)"})
        parser.add_argument("--cache-dir", default=None, help="feature cache (default $HOLST_CACHE/eval-stats)")
        _config_flags(parser, "grid_rows", helps={"grid_rows": "captions shown per grid"})
    elif name == "shapes":
        parser.add_argument("--data", default=None, help="shapes dataset folder whose held-out rows give the specs "
                                                         "(default: the default hold-out combinations)")
        _sampling(parser)
    else:
        raise InputError(f"unknown eval command {name!r}")


def _config(args: argparse.Namespace) -> EvalConfig:
    """EvalConfig from the flags given (ConfigError naming the first bad one); the rest its defaults."""
    return EvalConfig(**given_values(args, (*EVAL_FLAGS, "lang")), batch_size=args.eval_batch_size)


def _sampling_kwargs(args: argparse.Namespace) -> dict:
    """The sampling flags given (checked on their SamplingSettings ranges); the rest come from pipeline.json."""
    check_sampling_flags(args, EVAL_SAMPLING)
    return given_values(args, EVAL_SAMPLING)


def _load_tokenizer(path: str | Path) -> Any:
    from holst.text import BPETokenizer

    path = Path(path)
    return BPETokenizer.load(path) if path.is_file() else BPETokenizer.from_pretrained(path)


def _components(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(vqgan, dalle, tokenizer) from --model (pipeline or component dir) and the optional overrides."""
    from holst.hub import is_pipeline_dir

    model = args.model
    if model.startswith("random:") or is_pipeline_dir(model):
        pipe = _load_pipeline(model, args.device, args.dtype)
        return pipe.vqgan, pipe.dalle, pipe.tokenizer
    dev = resolve_device(args.device)
    if args.command == "vqgan":
        from holst.vqgan import VQGAN

        return VQGAN.from_pretrained(model, device=dev), None, None
    from holst.dalle import DalleModel

    dalle = DalleModel.from_pretrained(model, device=dev, dtype=resolve_dtype(args.dtype, dev))
    if args.tokenizer is None:
        raise InputError(f"--model {model} is a transformer directory: give --tokenizer (and --vqgan with --data)")
    vqgan = None
    if args.vqgan is not None:
        from holst.vqgan import VQGAN

        vqgan = VQGAN.from_pretrained(args.vqgan, device=dev)
    return vqgan, dalle, _load_tokenizer(args.tokenizer)


def _recognise(args: argparse.Namespace, cfg: EvalConfig) -> dict:
    """``holst eval recognise``: build or load the real reference, then the report (flat headline keys added)."""
    from holst.eval.features import EffLite0Features
    from holst.eval.recognise import RealReference, eval_recognise, load_reference

    if (args.data is None) == (args.reference is None):
        raise InputError("give --data (a dataset folder) or --reference (a compact reference file), one of them")
    if args.save_reference and args.data is None:
        raise InputError("--save-reference needs --data")
    pipe = _load_pipeline(args.model, args.device, args.dtype)
    net = EffLite0Features(cfg.fd_resolution).eval().to(pipe.device)
    if args.data is not None:
        reference = load_reference(args.data, net, size=pipe.image_size, batch_size=cfg.batch_size,
                                   cache_dir=args.cache_dir)
        if args.save_reference:
            reference.compact(args.reference_dim).save(args.save_reference)
            print(f"compact reference ({args.reference_dim} dims) written to {args.save_reference}", file=sys.stderr)
    else:
        reference = RealReference.load(args.reference)
    report = eval_recognise(pipe, reference, args.out, net, num_captions=cfg.num_captions,
                            num_images=cfg.num_images, seed=cfg.seed, lang=cfg.lang, k=args.neighbours,
                            grid_rows=cfg.grid_rows, batch_size=cfg.batch_size)
    for group in ("train", "heldout"):
        for key in ("hit_rate", "chance", "ceiling"):
            report[f"{group}_{key}"] = (report.get(group) or {}).get(key)
    return report


def main(args: argparse.Namespace) -> int:
    """Run the report named by ``args.command``; prints the JSON summary path and headline numbers."""
    from holst.eval import reports

    set_threads(args.threads)
    cfg = _config(args)
    if args.command == "vqgan":
        vqgan, _, _ = _components(args)
        report = reports.eval_vqgan(vqgan, args.data, args.out, cfg, size=args.size, cache_dir=args.cache_dir)
        keys = ("psnr", "ssim", "codebook_used_fraction", "codebook_perplexity", "fd_efflite0")
    elif args.command == "dalle":
        vqgan, dalle, tokenizer = _components(args)
        if args.codes is None and (args.data is None or vqgan is None):
            raise InputError("give --codes (held-out code shards) or --data with a VQGAN "
                             "(a pipeline --model, or --vqgan)")
        report = reports.eval_dalle(dalle, tokenizer, args.out, cfg, vqgan=vqgan, data=args.data, codes=args.codes)
        keys = ("loss", "text_loss", "image_loss", "bits_per_image_token")
    elif args.command == "pipeline":
        pipe = _load_pipeline(args.model, args.device, args.dtype)
        report = reports.eval_pipeline(pipe, args.data, args.out, cfg, sampling=_sampling_kwargs(args),
                                       cache_dir=args.cache_dir)
        keys = ("clip_score_best", "clip_score_mean", "r_precision", "real_r_precision", "fd_efflite0",
                "diversity_efflite0")
    elif args.command == "recognise":
        report = _recognise(args, cfg)
        keys = ("train_hit_rate", "train_chance", "train_ceiling", "heldout_hit_rate", "heldout_chance",
                "heldout_ceiling")
    elif args.command == "shapes":
        pipe = _load_pipeline(args.model, args.device, args.dtype)
        report = reports.eval_shapes(pipe, args.out, cfg, data=args.data, sampling=_sampling_kwargs(args))
        keys = ("accuracy", "any_image_all_right")
    else:
        raise InputError(f"unknown eval command {args.command!r}")
    summary = {k: report.get(k) for k in keys}
    print(json.dumps({"report": str(Path(args.out) / f"{args.command}.json"), **reports._json_safe(summary)},
                     ensure_ascii=False))
    return 0
