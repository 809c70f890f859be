"""``holst generate "caption" --out DIR``: PNGs best first, a grid, and a JSON to make any image again.

Files written to ``--out``:
  ``00_seed<S>.png`` ...   one per image, best first (the caption, seed and model are in the PNG's text chunks)
  ``grid.png``             all images in one picture
  ``generate.json``        every setting, each image's seed and scores, and the command that remakes it
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from typing import Any

from holst.cli_common import (
    DEFAULT_MODEL,
    add_runtime_arguments,
    add_sampling_arguments,
    check_out_dir,
    check_sampling_flags,
    load_pipeline,
    sampling_settings,
)
from holst.errors import InputError
from holst.utils.runtime import get_logger, set_threads

logger = get_logger("holst.generate")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``holst generate``: the sampling flags come from :class:`holst.sampling.SamplingSettings`."""
    parser.add_argument("prompt", help="the caption, e.g. 'рыжий кот на подоконнике'")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--model", default=None, help=f"pipeline directory (default {DEFAULT_MODEL}), or "
                                                      "random:tiny / random:emoji (an untrained pipeline)")
    add_sampling_arguments(parser)
    parser.add_argument("--image-prompt", default=None, help="an image whose top half is kept; the rest is sampled")
    add_runtime_arguments(parser)
    parser.add_argument("--cuda-graph", action="store_true",
                        help="CUDA only: static KV cache + the decode step replayed as a CUDA graph (faster)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def read_image_prompt(path: str | None) -> Any:
    """The ``--image-prompt`` picture (PIL), None without one; InputError when it cannot be read."""
    if path is None:
        return None
    from PIL import Image

    try:
        image = Image.open(path)
        image.load()
    except (OSError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot read --image-prompt {path}: {e}") from None
    return image


def remake_command(args: argparse.Namespace, seed: int, settings: dict[str, Any]) -> str:
    """The shell command that makes one image again (same model, settings and seed)."""
    parts = ["holst", "generate", args.prompt, "--out", "remade", "--num-images", "1", "--seed", str(seed),
             "--top-k", str(settings["top_k"]), "--top-p", str(settings["top_p"]),
             "--temperature", str(settings["temperature"]), "--upscale", str(settings["upscale"]), "--rerank", "0"]
    if args.model is not None:
        parts += ["--model", args.model]
    if settings["guidance_scale"] is not None:
        parts += ["--guidance-scale", str(settings["guidance_scale"])]
    if args.image_prompt is not None:
        parts += ["--image-prompt", args.image_prompt]
    for flag, value in (("--device", args.device), ("--dtype", args.dtype), ("--threads", args.threads)):
        if value not in (None, "auto"):
            parts += [flag, str(value)]
    return shlex.join(parts)


def main(args: argparse.Namespace) -> int:
    """Run ``holst generate``; returns 0. A user's mistake raises a HolstError (one line, exit 2).

    Everything that can be refused is checked before the model samples: the caption, the settings,
    the output folder, the device and the image prompt.
    """
    import torch

    import holst
    from holst.pipeline import check_prompt
    from holst.utils.images import make_grid, save_png

    check_prompt(args.prompt)
    check_sampling_flags(args)
    check_out_dir(args.out, create=False)
    set_threads(args.threads)
    image_prompt = read_image_prompt(args.image_prompt)
    pipe = load_pipeline(args.model, args.device, args.dtype, cuda_graph=args.cuda_graph)
    settings = sampling_settings(args, pipe.config)  # the flags given, pipeline.json for the rest
    out_dir = check_out_dir(args.out)
    start = time.perf_counter()
    out = pipe(args.prompt, image_prompt=image_prompt, progress=not args.no_progress, **settings.to_dict())
    elapsed = time.perf_counter() - start
    records = []
    for rank, (image, seed) in enumerate(zip(out.images, out.seeds)):
        name = f"{rank:02d}_seed{seed}.png"
        # Text chunks hold only what determines the pixels, so equal settings give equal bytes.
        save_png(image, out_dir / name, {"prompt": args.prompt, "seed": str(seed), "model": pipe.source,
                                         "software": f"holst {holst.__version__}"})
        records.append({"file": name, "rank": rank, "seed": seed, "perplexity": out.perplexities[rank],
                        "clip_score": None if out.clip_scores is None else out.clip_scores[rank],
                        "remake": remake_command(args, seed, out.settings)})
    save_png(make_grid(out.images), out_dir / "grid.png")
    report = {
        "holst_version": holst.__version__, "prompt": args.prompt, "model": pipe.source,
        "device": str(pipe.device), "dtype": str(pipe.dtype).replace("torch.", ""),
        "threads": torch.get_num_threads(),
        "seed": args.seed, "settings": out.settings, "image_prompt": args.image_prompt,
        "images": records, "grid": "grid.png", "elapsed_s": round(elapsed, 3),
        "note": "image i is remade by its 'remake' command with the same model, settings, device and dtype "
                "(on a CPU also the same --threads: float sums in another order can move a pixel by one level)",
    }
    (out_dir / "generate.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{len(out.images)} image(s) in {elapsed:.1f} s -> {out_dir}/ (grid.png, generate.json)")
    return 0
