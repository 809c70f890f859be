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
import sys
import time
from pathlib import Path
from typing import Any

from holst.utils.runtime import get_logger, resolve_device, resolve_dtype

logger = get_logger("holst.generate")
DEFAULT_MODEL = "models/default"
FALLBACK_PRESET = "tiny"

FALLBACK_WARNING = """
==============================================================================================
 WARNING: {path} holds no pipeline (no pipeline.json), so this is an UNTRAINED tiny random
 pipeline: the images are noise. Build the shipped model with scripts/build_default_model.sh,
 or pass --model DIR.
==============================================================================================
"""


def default_model_dir() -> Path:
    """``models/default`` under the current directory, else under the source checkout holst runs from."""
    from holst.hub import is_pipeline_dir

    here, checkout = Path(DEFAULT_MODEL), Path(__file__).resolve().parents[1] / DEFAULT_MODEL
    for candidate in (here, checkout):
        if is_pipeline_dir(candidate):
            return candidate
    return here


def load_pipeline_for_cli(model: str | None, device: str = "auto", dtype: str = "auto", *,
                          cuda_graph: bool = False) -> Any | None:
    """The pipeline a command should use, or None after logging why not.

    ``model`` None means the shipped ``models/default``; only when that is missing does this fall
    back (loudly) to an untrained tiny pipeline, so the README's first command always runs.
    """
    from holst.hub import is_pipeline_dir
    from holst.pipeline import Text2ImagePipeline
    from holst.utils.persist import CheckpointError

    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = Path(model) if model is not None else default_model_dir()
    try:
        if model is None and not is_pipeline_dir(path):
            print(FALLBACK_WARNING.format(path=path), file=sys.stderr)
            pipe = Text2ImagePipeline.from_random(FALLBACK_PRESET, seed=0).to(dev, dt)
        else:
            pipe = Text2ImagePipeline.from_pretrained(path, device=dev, dtype=dt)
        return pipe.enable_cuda_graph() if cuda_graph else pipe
    except (CheckpointError, ValueError) as e:
        logger.error("cannot load --model %s: %s", path, e)
        return None


def set_threads(threads: int | None) -> None:
    """Set torch's CPU thread count once, from the entry point (library code never does)."""
    if threads is not None:
        import torch

        if threads < 1:
            raise SystemExit(f"--threads={threads} must be >= 1")
        torch.set_num_threads(threads)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``holst generate``."""
    parser.add_argument("prompt", help="the caption, e.g. 'рыжий кот на подоконнике'")
    parser.add_argument("--out", required=True, help="output directory (created)")
    parser.add_argument("--model", default=None, help=f"pipeline directory (default {DEFAULT_MODEL})")
    parser.add_argument("--num-images", "-n", type=int, default=None, help="images to sample (default: the model's)")
    parser.add_argument("--seed", type=int, default=None, help="image i uses seed + i (default: random, recorded)")
    parser.add_argument("--top-k", type=int, default=None, help="top-k filter, 0 = off (default: the model's)")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus mass, 1 = off (default: the model's)")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default off)")
    parser.add_argument("--rerank", type=int, default=None, help="keep the best k images (0 = keep all, sorted)")
    parser.add_argument("--upscale", type=int, default=None, help="upscaling factor (1 = none)")
    parser.add_argument("--batch-size", type=int, default=None, help="images sampled at once (results do not change)")
    parser.add_argument("--image-prompt", default=None, help="an image whose top half is kept; the rest is sampled")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, else fp32), fp32, bf16, fp16")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="CUDA only: static KV cache + the decode step replayed as a CUDA graph (faster)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


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
    """Run ``holst generate``; returns 0 on success, 2 on bad input."""
    import torch
    from PIL import Image

    import holst
    from holst.utils.images import make_grid, save_png

    set_threads(args.threads)
    pipe = load_pipeline_for_cli(args.model, args.device, args.dtype, cuda_graph=args.cuda_graph)
    if pipe is None:
        return 2
    image_prompt = None
    if args.image_prompt is not None:
        try:
            image_prompt = Image.open(args.image_prompt)
            image_prompt.load()
        except OSError as e:
            logger.error("cannot read --image-prompt %s: %s", args.image_prompt, e)
            return 2
    start = time.perf_counter()
    try:
        out = pipe(args.prompt, args.num_images, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                   guidance_scale=args.guidance_scale, image_prompt=image_prompt, seed=args.seed, rerank=args.rerank,
                   upscale=args.upscale, batch_size=args.batch_size, progress=not args.no_progress)
    except ValueError as e:
        logger.error("%s", e)
        return 2
    elapsed = time.perf_counter() - start
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
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
