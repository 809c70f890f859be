"""The four ``holst eval`` reports: vqgan, dalle, pipeline, shapes.

Each writes ``<name>.json`` (every number and the settings that produced it), ``<name>.md`` (a short
human summary) and PNG plots / grids ``<name>_*.png`` into one output folder, and returns the JSON dict.
Held-out data come from a dataset folder's fixed ``split`` column (``holst data emoji|tuxpaint|shapes``),
so numbers are comparable across models and over time.

Axis legend: N images, B batch, T text_seq_length, D image_tokens_per_dim, E embedding size.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from holst.errors import InputError
from holst.eval import plots
from holst.eval.config import EvalConfig
from holst.eval.features import FD_NAME, cached_reference_stats, extract_features, try_efflite0
from holst.eval.metrics import (
    codebook_usage,
    diversity,
    feature_stats,
    frechet_distance,
    psnr,
    r_precision,
    ssim,
)
from holst.utils.images import make_grid, pil_to_tensor, save_png, tensor_to_pil
from holst.utils.runtime import get_logger

log = get_logger("holst.eval")

FD_NOTE = (f"{FD_NAME} is the Fréchet distance on ImageNet EfficientNet-Lite0 features (1280-d pooled), "
           "not FID (Inception-v3): compare it only with other FD-EffLite0 numbers at the same resolution; "
           "with fewer images than 1280 it is biased upwards, so compare runs with the same image counts.")


# ---------------------------------------------------------------------------------------------
# Held-out data and report files
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class HeldOut:
    """Held-out rows of a dataset folder, images loaded.

    Attributes:
        images: (N, 3, S, S) float in [0, 1]. captions: N captions (in ``lang``). files: N image paths.
        split, lang, source: where they came from.
    """

    images: torch.Tensor
    captions: list[str]
    files: list[Path]
    split: str
    lang: str
    source: str


def load_heldout(data: str | Path, *, split: str = "test", size: int = 64, lang: str = "ru",
                 limit: int = 0) -> HeldOut:
    """The ``split`` rows of a dataset folder (or table) with their ``lang`` captions.

    Args:
        data: a folder written by ``holst data ...`` (captions.jsonl with a ``split`` column) or a table.
        split: test | test_concept | test_style | train | all.
        size: images are centre-cropped and resized to size x size.
        lang: caption column ('ru' or 'en').
        limit: keep at most this many rows, evenly spaced over the split (0 = all), so a small run
            still covers every style and source.
    Raises:
        ValueError naming the table and split when no row is left.
    """
    from holst.data import TableDataset

    ds = TableDataset(data, split=split, size=size, langs=(lang,))
    n = len(ds)
    if n == 0:
        raise InputError(f"{data}: no rows with split={split!r} and a {lang!r} caption; held-out splits are "
                         "written by 'holst data emoji|tuxpaint|shapes' (column 'split')")
    index = list(range(n))
    if 0 < limit < n:
        index = sorted({round(i * (n - 1) / max(limit - 1, 1)) for i in range(limit)})
    images, captions, files = [], [], []
    for i in index:
        item = ds[i]
        images.append(item["image"])
        captions.append(item["caption"])
        files.append(ds.records[ds.items[i][0]][0])
    return HeldOut(torch.stack(images), captions, files, split, lang, str(data))


def _json_safe(value: Any) -> Any:
    """NaN/inf -> None, tensors -> lists, paths -> str (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, torch.Tensor):
        return _json_safe(value.tolist())
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_report(out: str | Path, name: str, report: dict, markdown: list[str],
                 pngs: dict[str, Image.Image]) -> dict:
    """Write ``<name>.json``, ``<name>_<key>.png`` and ``<name>.md`` into ``out``; returns the report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for key, image in pngs.items():
        path = out / f"{name}_{key}.png"
        save_png(image, path)
        files.append(path.name)
    report = dict(report, files=[f"{name}.json", f"{name}.md"] + files)
    (out / f"{name}.json").write_text(json.dumps(_json_safe(report), indent=2, ensure_ascii=False) + "\n",
                                      encoding="utf-8")
    md = markdown + [""] + [f"![{f}]({f})" for f in files]
    (out / f"{name}.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    return report


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def _fd_features(net: Any, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return extract_features(net, images, batch_size=batch_size)


def _fd_net(given: Any, cfg: EvalConfig, device: torch.device) -> tuple[Any, str | None]:
    """(feature net, None), or (None, why not): ``given`` as is, else EfficientNet-Lite0 on the model's device."""
    if given is not None:
        return given, None
    if not cfg.fd:
        return None, "off"
    net, why = try_efflite0(cfg.fd_resolution)
    return (net.to(device) if net is not None else None), why


# ---------------------------------------------------------------------------------------------
# vqgan: reconstruction quality on held-out images
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def eval_vqgan(vqgan: Any, data: str | Path, out: str | Path, cfg: EvalConfig | None = None, *,
               size: int | None = None, cache_dir: str | Path | None = None, fd_net: Any = None) -> dict:
    """PSNR, SSIM, codebook usage and FD-EffLite0 (real vs reconstructed) on held-out images.

    Args:
        vqgan: a ``holst.vqgan.VQGAN`` (encode / decode / config.n_embed).
        data: dataset folder with a split column.
        out: report folder.
        cfg: split, lang, limit, batch_size, fd, fd_resolution.
        size: encoder input size (default the VQGAN's ``config.resolution``).
        cache_dir: where the real images' reference statistics are cached (default ``$HOLST_CACHE/eval-stats``).
        fd_net: feature net override (tests); default EfficientNet-Lite0 when installed.
    Returns:
        The report dict (also in ``out/vqgan.json``).
    """
    cfg = cfg or EvalConfig()
    t0 = time.perf_counter()
    size = size or int(vqgan.config.resolution)
    held = load_heldout(data, split=cfg.split, size=size, lang="ru" if cfg.lang == "both" else cfg.lang,
                        limit=cfg.limit)
    device = next(vqgan.parameters()).device
    recons, codes, ps, ss = [], [], [], []
    targets = held.images
    for i in range(0, held.images.shape[0], cfg.batch_size):
        x = held.images[i:i + cfg.batch_size]
        c = vqgan.encode(x.to(device))
        r = vqgan.decode(c).float().clamp(0, 1).cpu()
        t = x if r.shape[-1] == x.shape[-1] else F.interpolate(x, size=r.shape[-2:], mode="bicubic",
                                                               antialias=True, align_corners=False).clamp(0, 1)
        ps.append(psnr(r, t).clamp(max=100.0))
        ss.append(ssim(r, t))
        recons.append(r)
        codes.append(c.cpu())
    recon, all_codes, p, s = torch.cat(recons), torch.cat(codes), torch.cat(ps), torch.cat(ss)
    if recon.shape[-1] != targets.shape[-1]:  # a DWT decoder doubles the size: compare at the output size
        targets = F.interpolate(targets, size=recon.shape[-2:], mode="bicubic", antialias=True,
                                align_corners=False).clamp(0, 1)
    n_embed = int(vqgan.config.n_embed)
    usage = codebook_usage(all_codes, n_embed)
    report: dict[str, Any] = {
        "report": "vqgan", "data": held.source, "split": held.split, "n_images": int(recon.shape[0]),
        "input_size": size, "output_size": int(recon.shape[-1]), "n_embed": n_embed,
        "psnr": float(p.mean()), "psnr_std": float(p.std()) if p.numel() > 1 else 0.0, "ssim": float(s.mean()),
        "codebook_perplexity": usage["perplexity"], "codebook_used": usage["used"],
        "codebook_used_fraction": usage["used_fraction"],
    }
    fd_key = "fd_efflite0"
    net, why = _fd_net(fd_net, cfg, device)
    if net is not None:
        # the same images as the pipeline report's reference when the decoder keeps the size: one cache entry
        tag = f"heldout|{size}" if recon.shape[-1] == size else f"heldout|{size}->{recon.shape[-1]}"
        fp = f"{getattr(net, 'fingerprint', type(net).__name__)}|{tag}"
        mu_r, sig_r, info = cached_reference_stats(held.files, lambda: targets.split(cfg.batch_size), net,
                                                   fingerprint=fp, cache_dir=cache_dir, batch_size=cfg.batch_size)
        mu_g, sig_g = feature_stats(_fd_features(net, recon, cfg.batch_size))
        report[fd_key] = frechet_distance(mu_r, sig_r, mu_g, sig_g)
        report["fd_resolution"] = getattr(net, "resolution", None)
        report["fd_reference_cached"] = info["cached"]
    else:
        report[fd_key], report["fd_skipped"] = None, why
    report["seconds"] = time.perf_counter() - t0
    report["settings"] = cfg.to_dict()

    counts = torch.bincount(all_codes.flatten().long(), minlength=n_embed)
    k = min(16, recon.shape[0])
    shown = [round(i * (recon.shape[0] - 1) / max(k - 1, 1)) for i in range(k)]  # spread over styles and sources
    pairs = [targets[i] for i in shown] + [recon[i] for i in shown]  # originals on one row, reconstructions below
    pngs = {
        "grid": make_grid(tensor_to_pil(torch.stack(pairs)), nrow=k),
        "codebook": plots.sorted_frequency_plot(counts, f"codebook usage: {usage['used']}/{n_embed} codes used, "
                                                        f"perplexity {usage['perplexity']:.1f}"),
        "psnr": plots.histogram(p, f"PSNR per held-out image (mean {report['psnr']:.2f} dB)", x_label="dB"),
    }
    md = [f"# VQGAN report ({held.source}, split {held.split}, {report['n_images']} images)", "",
          "| metric | value |", "|---|---|",
          f"| PSNR (dB) | {_fmt(report['psnr'])} |", f"| SSIM | {_fmt(report['ssim'])} |",
          f"| codebook used | {usage['used']} / {n_embed} ({usage['used_fraction']:.1%}) |",
          f"| codebook perplexity | {_fmt(usage['perplexity'])} |",
          f"| {FD_NAME} (real vs reconstructed) | {_fmt(report[fd_key])} |", "",
          "Grid: top row held-out originals, bottom row reconstructions. " + FD_NOTE]
    return write_report(out, "vqgan", report, md, pngs)


# ---------------------------------------------------------------------------------------------
# dalle: held-out loss, text and image parts, bits per image token
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def eval_dalle(dalle: Any, tokenizer: Any, out: str | Path, cfg: EvalConfig | None = None, *,
               vqgan: Any = None, data: str | Path | None = None, codes: str | Path | Sequence | None = None
               ) -> dict:
    """The transformer's held-out loss split into text and image parts, and bits per image token.

    Pairs come from held-out code shards (``holst prepare codes --split test``) or from a dataset
    folder's held-out images encoded with ``vqgan``.

    Args:
        dalle: a ``DalleModel``.
        tokenizer: its ``BPETokenizer``.
        out: report folder.
        cfg: split, lang ('ru', 'en' or 'both'), limit, batch_size.
        vqgan: encodes the images of ``data`` (give both, or ``codes``).
        data: dataset folder with a split column.
        codes: held-out code shards instead of ``vqgan`` + ``data``.
    Returns:
        The report dict (also in ``out/dalle.json``): loss (the training objective), text_loss,
        image_loss (nats per token), bits_per_image_token, bits_per_image, image_perplexity.
    """
    cfg = cfg or EvalConfig()
    t0 = time.perf_counter()
    dc = dalle.config
    T, N, D = dc.text_seq_length, dc.image_seq_length, dc.image_tokens_per_dim
    langs = ("ru", "en") if cfg.lang == "both" else (cfg.lang,)
    if codes is not None:
        from holst.data.codes import CodeShardDataset

        ds = CodeShardDataset(codes, langs=langs)
        pairs = [(ds[i]["caption"], ds[i]["codes"]) for i in range(len(ds))]
        source, split = str(codes), "code shards"
    elif data is not None and vqgan is not None:
        size = D * vqgan.downsample_factor
        pairs = []
        for lang in langs:
            held = load_heldout(data, split=cfg.split, size=size, lang=lang, limit=cfg.limit)
            dev = next(vqgan.parameters()).device
            for i in range(0, held.images.shape[0], cfg.batch_size):
                grid = vqgan.encode(held.images[i:i + cfg.batch_size].to(dev)).cpu()  # (B, D, D)
                pairs += list(zip(held.captions[i:i + cfg.batch_size], grid.reshape(grid.shape[0], -1)))
        source, split = str(data), cfg.split
    else:
        raise InputError("eval_dalle needs held-out code shards (codes=...) or a dataset folder and a VQGAN "
                         "(data=..., vqgan=...)")
    if cfg.limit and codes is not None:
        pairs = pairs[: cfg.limit]
    if not pairs:
        raise InputError(f"no held-out pairs in {source}")
    if pairs[0][1].numel() != N:
        raise InputError(f"held-out codes have {pairs[0][1].numel()} tokens per image but the transformer reads "
                         f"N = {N} ({D}x{D}): codes of another VQGAN or image size?")
    device = next(dalle.parameters()).device
    P = dalle.num_text_positions
    was_training = dalle.training
    dalle.eval()
    sums = {"loss": 0.0, "text": 0.0, "image": 0.0}
    pos_ce = torch.zeros(N, dtype=torch.float64)
    per_image_bits = []
    for i in range(0, len(pairs), cfg.batch_size):
        batch = pairs[i:i + cfg.batch_size]
        text_ids = tokenizer.encode_batch([c for c, _ in batch], T)
        image = torch.stack([c for _, c in batch]).long()
        if int(image.min()) < 0 or int(image.max()) >= dc.image_vocab_size:
            raise InputError(f"held-out codes lie outside [0, image_vocab_size={dc.image_vocab_size})")
        ids = torch.cat([text_ids, image], dim=1).to(device)  # (B, T + N)
        hidden = dalle.hidden_states(ids)  # (B, S, H)
        loss, parts = dalle.compute_loss(ids, logits=dalle.to_logits(hidden))
        b = len(batch)
        sums["loss"] += float(loss) * b
        sums["text"] += float(parts["text"]) * b
        sums["image"] += float(parts["image"]) * b
        # image token j is predicted by layer position P - 1 + j (DalleModel.num_text_positions)
        logits = dalle.image_logits(hidden[:, P - 1: P - 1 + N]).float()  # (B, N, image_vocab)
        ce = F.cross_entropy(logits.transpose(1, 2), image.to(device), reduction="none").double().cpu()  # (B, N)
        pos_ce += ce.sum(0)
        per_image_bits.append(ce.mean(1) / math.log(2))
    dalle.train(was_training)
    n = len(pairs)
    image_loss = sums["image"] / n
    report = {
        "report": "dalle", "data": source, "split": split, "langs": list(langs), "n_pairs": n,
        "loss": sums["loss"] / n, "text_loss": sums["text"] / n, "image_loss": image_loss,
        "bits_per_image_token": image_loss / math.log(2), "bits_per_image": image_loss / math.log(2) * N,
        "image_perplexity": math.exp(image_loss), "image_tokens": N, "image_vocab_size": dc.image_vocab_size,
        "uniform_bits_per_image_token": math.log2(dc.image_vocab_size),
        "loss_img_weight": dc.loss_img_weight,
        "bits_per_position": (pos_ce / n / math.log(2)).tolist(),
        "seconds": time.perf_counter() - t0, "settings": cfg.to_dict(),
    }
    bits = torch.cat(per_image_bits)
    pngs = {
        "position_bits": plots.heatmap((pos_ce / n / math.log(2)).reshape(D, D).float(),
                                       "bits per image token by position (row-major)", cell=max(6, 192 // D)),
        "image_bits": plots.histogram(bits, f"bits per image token, per held-out image (mean "
                                            f"{report['bits_per_image_token']:.2f})", x_label="bits/token"),
    }
    md = [f"# Transformer report ({source}, {split}, {n} pairs, captions {'+'.join(langs)})", "",
          "| metric | value |", "|---|---|",
          f"| loss (training objective, text + {dc.loss_img_weight} x image, / {dc.loss_img_weight + 1}) "
          f"| {_fmt(report['loss'])} |",
          f"| text loss (nats/token, pads included) | {_fmt(report['text_loss'])} |",
          f"| image loss (nats/token) | {_fmt(image_loss)} |",
          f"| bits per image token | {_fmt(report['bits_per_image_token'])} "
          f"(uniform: {report['uniform_bits_per_image_token']:.2f}) |",
          f"| bits per image ({N} tokens) | {_fmt(report['bits_per_image'])} |",
          f"| image perplexity | {_fmt(report['image_perplexity'])} |"]
    return write_report(out, "dalle", report, md, pngs)


# ---------------------------------------------------------------------------------------------
# pipeline: generated images against held-out captions
# ---------------------------------------------------------------------------------------------


def _distinct(captions: Sequence[str]) -> tuple[list[str], list[int]]:
    """(distinct captions in first-seen order, index of each input caption in that list)."""
    order: dict[str, int] = {}
    index = [order.setdefault(c, len(order)) for c in captions]
    return list(order), index


def _pick(n_total: int, n: int, seed: int) -> list[int]:
    """A fixed seeded choice of n of n_total indices (all when n is 0 or too large)."""
    if n <= 0 or n >= n_total:
        return list(range(n_total))
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[:n].tolist()


def _generate(pipe: Any, captions: Sequence[str], cfg: EvalConfig, sampling: dict) -> tuple[list[Any], int]:
    """One pipeline call per caption, ``num_images`` images each, no reranking cut, no upscaling.

    Returns:
        (one PipelineOutput per caption, how many captions were cut to fit the model's text length).
    """
    import warnings

    outs, truncated = [], 0
    for i, caption in enumerate(captions):
        seed = cfg.seed * 1_000_003 + i * cfg.num_images  # distinct per image, fixed per (seed, caption slot)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # counted and reported once below instead of one warning per caption
            outs.append(pipe(caption, num_images=cfg.num_images, seed=seed, rerank=0, upscale=1, **sampling))
        truncated += any("cut off" in str(w.message) for w in caught)
        log.info("eval: generated %d/%d captions", i + 1, len(captions))
    if truncated:
        log.warning("eval: %d of %d captions were longer than the model's text length and were cut",
                    truncated, len(captions))
    return outs, truncated


@torch.no_grad()
def eval_pipeline(pipe: Any, data: str | Path, out: str | Path, cfg: EvalConfig | None = None, *,
                  sampling: dict | None = None, cache_dir: str | Path | None = None, fd_net: Any = None) -> dict:
    """Generate ``num_images`` images for each of ``num_captions`` held-out captions and score them.

    Metrics: in-domain CLIP score of the best and of the average image, R-precision (own caption
    ranked first among ``candidates`` held-out captions by the pipeline's CLIP), FD-EffLite0 between
    the generated images and all held-out real images, diversity (mean pairwise cosine distance)
    between the images of one caption, mean perplexity. The same CLIP numbers for the real held-out
    images are reported beside them as the reachable reference.

    Args:
        pipe: a ``Text2ImagePipeline``.
        data: dataset folder with a split column.
        out: report folder.
        cfg: split, lang, num_captions, num_images, candidates, fd, fd_resolution, seed, grid_rows.
        sampling: top_k / top_p / temperature / guidance_scale / batch_size overrides (default pipeline.json).
        cache_dir: where the real images' reference statistics are cached (default ``$HOLST_CACHE/eval-stats``).
        fd_net: feature net override (tests).
    Returns:
        The report dict (also in ``out/pipeline.json``).
    """
    cfg = cfg or EvalConfig()
    if cfg.lang == "both":
        raise InputError("lang='both' is for the dalle report; evaluate the pipeline per language (ru or en)")
    sampling = {k: v for k, v in (sampling or {}).items() if v is not None}
    t0 = time.perf_counter()
    held = load_heldout(data, split=cfg.split, size=pipe.image_size, lang=cfg.lang)
    distinct, cap_index = _distinct(held.captions)
    chosen = _pick(len(distinct), cfg.num_captions, cfg.seed)
    captions = [distinct[i] for i in chosen]
    outs, truncated = _generate(pipe, captions, cfg, sampling)
    t_gen = time.perf_counter() - t0
    gen = torch.stack([pil_to_tensor(im) for o in outs for im in o.images])  # (C * n, 3, H, W), best first per caption
    groups = torch.arange(len(captions)).repeat_interleave(cfg.num_images)  # (C * n,)
    real_rows = [next(r for r, c in enumerate(cap_index) if c == i) for i in chosen]  # one real image per caption
    report: dict[str, Any] = {
        "report": "pipeline", "model": getattr(pipe, "source", "memory"), "data": held.source, "split": held.split,
        "lang": cfg.lang, "n_captions": len(captions), "images_per_caption": cfg.num_images,
        "n_generated": int(gen.shape[0]), "n_heldout_images": int(held.images.shape[0]),
        "n_heldout_captions": len(distinct), "image_size": pipe.image_size,
        "sampling": outs[0].settings if outs else {}, "captions_truncated": truncated,
        "mean_perplexity": float(torch.tensor([p for o in outs for p in o.perplexities]).mean()),
    }
    # 1. CLIP score and R-precision (in-domain CLIP: comparable between holst models with the same CLIP only)
    clip_emb_gen = None
    if pipe.clip is not None:
        from holst.rerank.ranker import ClipRanker

        ranker = ClipRanker(pipe.clip, pipe.components.clip_tokenizer)
        scores = torch.tensor([o.clip_scores for o in outs])  # (C, n), best first
        report["clip_score_best"] = float(scores.max(1).values.mean())
        report["clip_score_mean"] = float(scores.mean())
        text_emb = ranker.text_embeddings(distinct, cfg.batch_size)  # (M, E) every distinct held-out caption
        clip_emb_gen = ranker.image_embeddings(gen, cfg.batch_size)
        true_gen = torch.tensor(chosen).repeat_interleave(cfg.num_images)
        rp = r_precision(clip_emb_gen, text_emb, true_gen, candidates=cfg.candidates,
                         generator=torch.Generator().manual_seed(cfg.seed))
        rp_best = r_precision(clip_emb_gen[:: cfg.num_images], text_emb, torch.tensor(chosen),
                              candidates=cfg.candidates, generator=torch.Generator().manual_seed(cfg.seed))
        real = held.images[real_rows]
        real_emb = ranker.image_embeddings(real, cfg.batch_size)
        rp_real = r_precision(real_emb, text_emb, torch.tensor(chosen), candidates=cfg.candidates,
                              generator=torch.Generator().manual_seed(cfg.seed))
        scale = ranker.logit_scale
        real_scores = scale * (real_emb * text_emb[chosen]).sum(-1)
        report.update({"r_precision": rp["r_precision"], "r_precision_best_image": rp_best["r_precision"],
                       "r_precision_candidates": rp["candidates"], "r_precision_chance": rp["chance"],
                       "real_clip_score": float(real_scores.mean()), "real_r_precision": rp_real["r_precision"],
                       "diversity_clip": diversity(clip_emb_gen, groups)})
    else:
        report["clip_skipped"] = "the pipeline has no CLIP ranker: no CLIP score / R-precision"
    # 2. FD-EffLite0 against every held-out real image, and feature diversity
    net, why = _fd_net(fd_net, cfg, pipe.device)
    if net is not None:
        fp = f"{getattr(net, 'fingerprint', type(net).__name__)}|heldout|{pipe.image_size}"
        mu_r, sig_r, info = cached_reference_stats(held.files, lambda: held.images.split(cfg.batch_size), net,
                                                   fingerprint=fp, cache_dir=cache_dir, batch_size=cfg.batch_size)
        feats = _fd_features(net, gen, cfg.batch_size)
        report["fd_efflite0"] = frechet_distance(mu_r, sig_r, *feature_stats(feats))
        report["fd_resolution"] = getattr(net, "resolution", None)
        report["fd_reference_cached"] = info["cached"]
        report["diversity_efflite0"] = diversity(feats, groups)
    else:
        report["fd_efflite0"], report["fd_skipped"] = None, why
    report["per_caption"] = [{"caption": c, "seeds": o.seeds, "clip_scores": o.clip_scores,
                              "perplexities": o.perplexities} for c, o in zip(captions, outs)]
    report["seconds"] = time.perf_counter() - t0
    report["seconds_generating"] = t_gen
    report["settings"] = cfg.to_dict()

    k = min(cfg.grid_rows, len(captions))
    labels_ok = plots.has_cyrillic_font() or cfg.lang == "en"
    rows = [[tensor_to_pil(held.images[real_rows[i]])[0]] + list(outs[i].images) for i in range(k)]
    labels = [f"{i + 1}. {captions[i]}" if labels_ok else f"{i + 1}." for i in range(k)]
    pngs = {"grid": plots.labeled_grid(rows, labels, cell=max(64, min(128, pipe.image_size)))}
    md = [f"# Pipeline report ({report['model']})", "",
          f"{len(captions)} held-out captions ({held.source}, split {held.split}, {cfg.lang}) x {cfg.num_images} "
          f"images each; sampling {json.dumps(report['sampling'], ensure_ascii=False)}.", "",
          "| metric | generated | real held-out images |", "|---|---|---|",
          f"| in-domain CLIP score, best of {cfg.num_images} | {_fmt(report.get('clip_score_best'))} | |",
          f"| in-domain CLIP score, mean | {_fmt(report.get('clip_score_mean'))} "
          f"| {_fmt(report.get('real_clip_score'))} |",
          f"| R-precision ({report.get('r_precision_candidates', cfg.candidates)} captions, chance "
          f"{_fmt(report.get('r_precision_chance'))}) | {_fmt(report.get('r_precision'))} "
          f"| {_fmt(report.get('real_r_precision'))} |",
          f"| {FD_NAME} vs {report['n_heldout_images']} held-out images | {_fmt(report['fd_efflite0'])} | 0 |",
          f"| diversity (1 - cos, EffLite0 features) | {_fmt(report.get('diversity_efflite0'))} | |",
          f"| diversity (1 - cos, CLIP image embeddings) | {_fmt(report.get('diversity_clip'))} | |",
          f"| mean image perplexity | {_fmt(report['mean_perplexity'])} | |", "",
          f"Captions cut to the model's text length: {truncated} of {len(captions)}.", "",
          "Grid: one row per caption; first column a real held-out image, then the generated images best first.",
          "", "Captions: " + "; ".join(f"{i + 1}. {c}" for i, c in enumerate(captions[:k])), "",
          "The CLIP model is the pipeline's own in-domain ranker (trained on this data's train split): its "
          "scores are not comparable with published CLIP scores. " + FD_NOTE]
    return write_report(out, "pipeline", report, md, pngs)


# ---------------------------------------------------------------------------------------------
# shapes: attribute accuracy on held-out combinations
# ---------------------------------------------------------------------------------------------


def shapes_heldout(data: str | Path | None = None) -> tuple[list[Any], str]:
    """Held-out shape specs: the dataset folder's test rows (their "spec" column), else the default hold-out."""
    from holst.data import shapes

    if data is None:
        return shapes.heldout_specs(shapes.DEFAULT_HOLDOUT), "default hold-out " + json.dumps(
            list(shapes.DEFAULT_HOLDOUT))
    from holst.data.loaders import read_table

    path = Path(data)
    table = path / "captions.jsonl" if path.is_dir() else path
    if not table.is_file():
        raise FileNotFoundError(f"shapes dataset table {table} does not exist (make it with 'holst data shapes')")
    seen, specs = set(), []
    for row in read_table(table):
        if str(row.get("split", "train")).startswith("test") and isinstance(row.get("spec"), dict):
            spec = shapes.ShapeSpec.from_dict(row["spec"])
            if spec.id not in seen:
                seen.add(spec.id)
                specs.append(spec)
    if not specs:
        raise InputError(f"{table}: no held-out rows with a 'spec' column: is it a 'holst data shapes' folder?")
    return specs, str(data)


@torch.no_grad()
def eval_shapes(pipe: Any, out: str | Path, cfg: EvalConfig | None = None, *, data: str | Path | None = None,
                sampling: dict | None = None) -> dict:
    """Per-attribute accuracy (``holst.data.shapes.evaluate``) of generated images on held-out combinations.

    Args:
        pipe: a ``Text2ImagePipeline`` (trained on ``holst data shapes``).
        out: report folder.
        cfg: num_captions (held-out specs drawn, 0 = all), num_images, lang, seed, grid_rows.
        sampling: top_k / top_p / temperature / guidance_scale / batch_size overrides (default pipeline.json).
        data: a shapes dataset folder whose held-out rows give the specs (default: the default hold-out).
    Returns:
        The report dict (also in ``out/shapes.json``): accuracy per attribute over all images, of the
        best-ranked image per spec, the share of specs with at least one fully right image, and the
        checker's accuracy on the ground-truth renders of the same specs (should be 1.0).
    """
    from holst.data import shapes

    cfg = cfg or EvalConfig()
    if cfg.lang == "both":
        raise InputError("lang='both' is for the dalle report; use ru or en")
    sampling = {k: v for k, v in (sampling or {}).items() if v is not None}
    t0 = time.perf_counter()
    all_specs, source = shapes_heldout(data)
    specs = [all_specs[i] for i in _pick(len(all_specs), cfg.num_captions, cfg.seed)]
    captions = [shapes.caption(s, cfg.lang) for s in specs]
    outs, truncated = _generate(pipe, captions, cfg, sampling)
    side = max(64, pipe.image_size)  # the checker needs >= 32 px; small models are upsampled (nearest keeps colours)
    images = [[im if im.width >= side else im.resize((side, side), Image.Resampling.NEAREST) for im in o.images]
              for o in outs]
    flat = [im for row in images for im in row]
    flat_specs = [s for s in specs for _ in range(cfg.num_images)]
    acc = shapes.evaluate(flat, flat_specs)
    best = shapes.evaluate([row[0] for row in images], specs)
    any_right = sum(any(shapes.check(im, s)["all"] for im in row) for row, s in zip(images, specs)) / len(specs)
    truth = shapes.evaluate([shapes.render(s, side) for s in specs], specs)
    report = {
        "report": "shapes", "model": getattr(pipe, "source", "memory"), "specs_from": source,
        "n_heldout_specs": len(all_specs), "n_specs": len(specs), "images_per_spec": cfg.num_images,
        "lang": cfg.lang, "accuracy": acc, "accuracy_best_image": best, "any_image_all_right": any_right,
        "checker_on_ground_truth": truth, "sampling": outs[0].settings if outs else {},
        "captions_truncated": truncated,
        "per_spec": [{"caption": c, "spec": s.to_dict(), "seeds": o.seeds} for c, s, o in zip(captions, specs, outs)],
        "seconds": time.perf_counter() - t0, "settings": cfg.to_dict(),
    }
    attrs = [a for a in ("background", "colour", "shape", "size", "position", "relation", "all") if a in acc]
    k = min(cfg.grid_rows, len(specs))
    labels_ok = plots.has_cyrillic_font() or cfg.lang == "en"
    pngs = {
        "accuracy": plots.bar_chart([acc[a] for a in attrs], attrs, f"attribute accuracy, {len(flat)} images "
                                    f"of {len(specs)} held-out specs", y_max=1.0),
        "grid": plots.labeled_grid([[shapes.render(specs[i], side)] + images[i] for i in range(k)],
                                   [f"{i + 1}. {captions[i]}" if labels_ok else f"{i + 1}." for i in range(k)],
                                   cell=96),
    }
    md = [f"# Shapes report ({report['model']})", "",
          f"{len(specs)} of {len(all_specs)} held-out specs ({source}) x {cfg.num_images} images, captions in "
          f"{cfg.lang}.", "", "| attribute | all images | best image | ground truth |", "|---|---|---|---|"]
    md += [f"| {a} | {_fmt(acc[a], 3)} | {_fmt(best.get(a), 3)} | {_fmt(truth.get(a), 3)} |" for a in attrs]
    md += ["", f"Specs with at least one fully right image: {any_right:.3f}.", "",
           "Grid: one row per spec; first column the ground-truth render, then the generated images best first."]
    return write_report(out, "shapes", report, md, pngs)
