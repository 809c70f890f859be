"""``holst prepare pipeline``: trained component directories -> one pipeline directory.

:func:`holst.hub.assemble_pipeline` does the work:

```
holst prepare pipeline --out models/default --tokenizer runs/tok --vqgan runs/vqgan/final --dalle runs/dalle/final \
    --clip runs/clip/final --top-k 64 --name "emoji"
```
The sampling defaults stored in ``pipeline.json`` are the :class:`holst.sampling.SamplingSettings`
flags (``--num-images``, ``--top-k``, ... with its ranges); the model card fields are plain strings.
"""

from __future__ import annotations

import argparse

from holst.cli_common import add_sampling_arguments, check_sampling_flags, given_values
from holst.sampling import PIPELINE_SETTINGS

MODEL_CARD = ("name", "description", "language", "license", "training_data")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``holst prepare pipeline``."""
    from holst.config import PipelineConfig

    d = PipelineConfig()
    parser.add_argument("--out", required=True, help="pipeline directory to write, e.g. models/default")
    parser.add_argument("--tokenizer", required=True, help="tokenizer directory or bpe.model file")
    parser.add_argument("--vqgan", required=True, help="VQGAN directory (holst train vqgan's <out_dir>/final)")
    parser.add_argument("--dalle", required=True, help="transformer directory (holst train dalle's <out_dir>/final)")
    parser.add_argument("--clip", default=None, help="CLIP directory (holst train clip's <out_dir>/final)")
    parser.add_argument("--clip-tokenizer", default=None, help="default: <clip>/tokenizer")
    parser.add_argument("--superres", default=None, help="RRDBNet directory (e.g. models/default/superres)")
    parser.add_argument("--dtype", default=None, help="save the transformer and CLIP as fp16/bf16 (default: as is)")
    add_sampling_arguments(parser, PIPELINE_SETTINGS, flags={"num_images": ["--num-images"]},
                           default_note=" (default stored in pipeline.json: see PipelineConfig)")
    for name in MODEL_CARD:
        parser.add_argument("--" + name.replace("_", "-"), default=None,
                            help=f"model card field (default {getattr(d, name)!r})")


def main(args: argparse.Namespace) -> int:
    """Run ``holst prepare pipeline``; 0 on success. A missing or misfit component raises a HolstError (exit 2)."""
    from holst.config import PipelineConfig
    from holst.hub import assemble_pipeline
    from holst.utils.runtime import resolve_dtype

    check_sampling_flags(args, PIPELINE_SETTINGS)
    config = PipelineConfig(**given_values(args, (*PIPELINE_SETTINGS, *MODEL_CARD)))
    dtype = resolve_dtype(args.dtype) if args.dtype else None
    parts = assemble_pipeline(args.out, tokenizer=args.tokenizer, vqgan=args.vqgan, dalle=args.dalle,
                              clip=args.clip, clip_tokenizer=args.clip_tokenizer, superres=args.superres,
                              config=config, dtype=dtype)
    print(f"pipeline written to {args.out} (components: {', '.join(parts.names())})")
    return 0
