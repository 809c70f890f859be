"""VQGAN code shards: images encoded once, so transformer training does not re-run the VQGAN every epoch.

A shard is ``<name>.safetensors`` holding ``codes`` (M, h, w) int16 (int32 when the codebook has more
than 32,767 entries) plus ``<name>.json`` with ``captions`` (M strings, the first language),
``captions_by_lang`` ({lang: M strings}) and ``keys``. ``.npz`` shards (``codes`` + ``captions``
arrays) are read too. :class:`CodeShardDataset` yields ``{"codes": (h*w,) long, "caption": str}``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

SHARD_EXTS = (".safetensors", ".npz")


def write_code_shard(path: str | Path, codes: torch.Tensor, captions_by_lang: dict[str, list[str]],
                     keys: Sequence[str] | None = None, n_embed: int | None = None) -> Path:
    """Write one shard (atomically: a partial shard never looks complete).

    Args:
        path: shard path ending in .safetensors or .npz.
        codes: (M, h, w) integer codes.
        captions_by_lang: {lang: M captions}; the first language also becomes ``captions``.
        keys: M sample names (default: their index).
        n_embed: codebook size, picks int16 vs int32 storage (default: from the codes' maximum).

    Returns:
        The shard path.
    """
    path = Path(path)
    if codes.dim() != 3:
        raise ValueError(f"codes must be (M, h, w), got shape {tuple(codes.shape)}")
    m = codes.shape[0]
    for lang, caps in captions_by_lang.items():
        if len(caps) != m:
            raise ValueError(f"{len(caps)} {lang} captions for {m} code grids")
    top = n_embed if n_embed is not None else int(codes.max()) + 1 if m else 1
    dtype = torch.int16 if top <= 32767 else torch.int32
    codes = codes.to(dtype).contiguous().cpu()
    langs = list(captions_by_lang)
    meta = {"captions": captions_by_lang[langs[0]] if langs else [""] * m, "captions_by_lang": captions_by_lang,
            "keys": [str(k) for k in (keys if keys is not None else range(m))], "grid": list(codes.shape[1:])}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"codes": codes}, str(tmp))
        side = path.with_suffix(".json")
        side_tmp = side.with_name(side.name + ".tmp")
        side_tmp.write_text(json.dumps(meta, ensure_ascii=False), encoding="utf-8")
        side_tmp.replace(side)
    elif path.suffix == ".npz":
        with open(tmp, "wb") as f:
            np.savez(f, codes=codes.numpy(), captions=np.array(meta["captions"], dtype=str),
                     meta=np.array(json.dumps(meta, ensure_ascii=False)))
    else:
        raise ValueError(f"{path}: shard must end in .safetensors or .npz")
    tmp.replace(path)
    return path


def read_code_shard(path: str | Path) -> tuple[torch.Tensor, dict]:
    """(codes (M, h, w) integer tensor, meta dict with captions / captions_by_lang / keys)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        codes = load_file(str(path))["codes"]
        side = path.with_suffix(".json")
        if not side.is_file():
            raise FileNotFoundError(f"shard {path} has no captions file {side}")
        meta = json.loads(side.read_text(encoding="utf-8"))
    elif path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            codes = torch.from_numpy(z["codes"].copy())
            meta = json.loads(str(z["meta"])) if "meta" in z.files else {"captions": [str(c) for c in z["captions"]]}
    else:
        raise ValueError(f"{path}: not a code shard (.safetensors or .npz)")
    if codes.dim() != 3 or len(meta["captions"]) != codes.shape[0]:
        raise ValueError(f"{path}: codes {tuple(codes.shape)} do not match {len(meta['captions'])} captions")
    return codes, meta


def list_shards(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    """Shard files from a folder (all shards inside, sorted), a glob, or a list."""
    if isinstance(paths, (list, tuple)):
        return [p for x in paths for p in list_shards(x)]
    path = Path(paths)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in SHARD_EXTS)
    if any(c in str(paths) for c in "*?["):
        return sorted(p for p in Path().glob(str(paths)) if p.suffix in SHARD_EXTS)
    if not path.is_file():
        raise FileNotFoundError(f"code shard {path} does not exist")
    return [path]


class CodeShardDataset(Dataset):
    """All samples of some code shards, held in memory (2 bytes per code: 1M 32x32 grids = 2 GB).

    Args:
        paths: folder written by ``holst prepare codes``, a glob, or a list of shard files.
        langs: caption languages to yield, one sample per (grid, language); None = the ``captions`` list.

    Yields:
        {"codes": (h*w,) long, "caption": str, "lang": str, "key": str}
    """

    def __init__(self, paths: str | Path | Sequence[str | Path], langs: Sequence[str] | None = None) -> None:
        shards = list_shards(paths)
        if not shards:
            raise FileNotFoundError(f"no code shards found in {paths!r}")
        grids, self.captions, self.keys = [], [], []
        for shard in shards:
            codes, meta = read_code_shard(shard)
            if grids and codes.shape[1:] != grids[0].shape[1:]:
                raise ValueError(f"{shard}: grid {tuple(codes.shape[1:])} differs from {tuple(grids[0].shape[1:])}")
            grids.append(codes)
            by_lang = meta.get("captions_by_lang") or {"": meta["captions"]}
            n = codes.shape[0]
            self.captions += [{lang: by_lang[lang][i] for lang in by_lang} | {"": meta["captions"][i]}
                              for i in range(n)]
            self.keys += meta.get("keys") or [f"{shard.name}:{i}" for i in range(n)]
        self.codes = torch.cat(grids)  # (M, h, w) int16/int32
        self.grid = tuple(self.codes.shape[1:])
        want = list(langs) if langs else [""]
        self.items = [(i, lang) for i in range(len(self.captions)) for lang in want if self.captions[i].get(lang)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        i, lang = self.items[index]
        return {"codes": self.codes[i].reshape(-1).long(),  # (h, w) -> (h*w,) raster order
                "caption": self.captions[i][lang], "lang": lang or "default", "key": self.keys[i]}
