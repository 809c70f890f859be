"""Text tokenizer speed: our pure-Python BPE vs YouTokenToMe (C++) on the same model file, one core.

Corpus: Russian/English/... emoji captions from the cached npm package emojibase-data (``holst data
emoji`` caches it; ``label, tag, tag`` per emoji, 8 languages) when present, else synthetic Russian and
English captions. Trains a BPE model with our trainer (and YouTokenToMe's when installed, as the
baseline), then times, on one thread:

* ``encode`` per caption (warm per-word cache) and cold (cache cleared before every pass),
* ``encode_batch`` (B=64, T=128) without and with BPE-dropout 0.1,
* ``encode_batch([caption])`` with a per-sample torch.Generator (how holst.train.dalle calls it),
* YouTokenToMe's ``encode`` on the same captions and file (the C++ baseline), plus an id-parity count
  and the total-variation distance between the two BPE-dropout segmentation distributions.

Prints one JSON object.

    .venv/bin/python bench/tokenizer.py [--vocab-size 8192] [--captions 20000]
"""

from __future__ import annotations

import argparse
import json
import random
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from holst.text import BPETokenizer

LANGS = ("ru", "en", "uk", "de", "fr", "es", "pl", "it")


def emoji_captions() -> list[str]:
    """``label, tag, tag`` captions from a cached emojibase-data tarball, or [] when it is not cached."""
    from holst.data.packages import cache_dir

    tarballs = sorted((cache_dir() / "npm").glob("emojibase-data-*.tgz"))
    if not tarballs:
        return []
    out = []
    with tarfile.open(tarballs[-1]) as tar:
        for lang in LANGS:
            try:
                entries = json.load(tar.extractfile(f"package/{lang}/data.json"))
            except (KeyError, AttributeError):
                continue
            for e in entries:
                if e.get("label"):
                    out.append(", ".join([e["label"]] + list(e.get("tags", []))[:3]).lower())
                    out.extend(s["label"].lower() for s in e.get("skins", []) if s.get("label"))
    return out


def synthetic_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    adj = "красный синий зелёный рыжий белый чёрный большой маленький старый новый red blue green big small".split()
    noun = "кот собака яблоко дом машина ракета ёлка дерево книга гитара cat dog apple house car rocket tree".split()
    place = ["на подоконнике", "в лесу", "на столе", "у моря", "on the table", "in the forest", "by the sea"]
    return [f"{rng.choice(adj)} {rng.choice(noun)} {rng.choice(place)}, {rng.randint(1, 99)}" for _ in range(n)]


def per_second(fn, n_items: int, repeat: int = 3) -> float:
    """Best items/s of ``repeat`` timed calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_items / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--captions", type=int, default=20000, help="captions timed per pass")
    args = parser.parse_args()
    torch.set_num_threads(1)

    corpus = emoji_captions()
    source = "emojibase-data " + "/".join(LANGS) if corpus else "synthetic"
    if not corpus:
        corpus = synthetic_captions(50_000)
    rng = random.Random(0)
    captions = [rng.choice(corpus) for _ in range(args.captions)]
    out: dict = {"machine": "CPU, 1 thread", "corpus": source, "corpus_captions": len(corpus),
                 "mean_caption_chars": round(sum(map(len, captions)) / len(captions), 1)}

    t0 = time.perf_counter()
    tok = BPETokenizer.train(corpus, args.vocab_size)
    out["train_s"] = round(time.perf_counter() - t0, 2)
    out["vocab_size"] = tok.vocab_size
    workdir = Path(tempfile.mkdtemp())
    tok.save(workdir / "bpe.model")
    out["mean_ids_per_caption"] = round(sum(len(tok.encode(c)) for c in captions) / len(captions), 2)

    def cold() -> None:
        tok._cache.clear()
        for c in captions:
            tok.encode(c)

    batches = [captions[i: i + 64] for i in range(0, len(captions), 64)]
    gens = [torch.Generator().manual_seed(i) for i in range(len(batches))]
    speed = {
        "encode_warm": per_second(lambda: [tok.encode(c) for c in captions], len(captions)),
        "encode_cold": per_second(cold, len(captions), repeat=1),
        "encode_batch_64x128": per_second(lambda: [tok.encode_batch(b, 128) for b in batches], len(captions)),
        "encode_batch_64x128_dropout0.1": per_second(
            lambda: [tok.encode_batch(b, 128, dropout=0.1, generator=g) for b, g in zip(batches, gens)],
            len(captions), repeat=1),
        "encode_batch_1x128_dropout0.1_per_sample_generator": per_second(
            lambda: [tok.encode_batch([c], 128, dropout=0.1, generator=torch.Generator().manual_seed(i))
                     for i, c in enumerate(captions[:5000])], 5000, repeat=1),
    }
    try:
        import youtokentome as yttm
    except ImportError:
        yttm = None
        out["baseline"] = "youtokentome not installed: no C++ baseline"
    if yttm is not None:
        ref = yttm.BPE(str(workdir / "bpe.model"), n_threads=1)
        speed["yttm_encode_list_1thread"] = per_second(lambda: ref.encode(captions), len(captions))
        speed["yttm_encode_one_by_one_1thread"] = per_second(lambda: [ref.encode([c]) for c in captions],
                                                            len(captions))
        speed["yttm_encode_list_dropout0.1_1thread"] = per_second(lambda: ref.encode(captions, dropout_prob=0.1),
                                                                 len(captions))
        ref_ids = ref.encode(captions)
        out["id_mismatches_vs_yttm"] = sum(tok.encode(c) != r for c, r in zip(captions, ref_ids))
        data = workdir / "corpus.txt"
        data.write_text("\n".join(corpus) + "\n", encoding="utf-8")
        t0 = time.perf_counter()
        yttm.BPE.train(data=str(data), model=str(workdir / "yttm.model"), vocab_size=args.vocab_size, n_threads=1)
        out["yttm_train_s_1thread"] = round(time.perf_counter() - t0, 2)
        # BPE-dropout distribution: total-variation distance between our and YouTokenToMe's segmentation
        # frequencies of a few words (RNGs differ; ~0.01 is the sampling noise of 20k draws)
        tv = {}
        for word, p in (("подоконнике", 0.3), ("улыбающееся", 0.1), ("smiling", 0.5)):
            draws = random.Random(1)
            ours = Counter(tuple(tok.encode(word, dropout=p, generator=draws)) for _ in range(20_000))
            ref_draws = Counter(map(tuple, ref.encode([word] * 20_000, dropout_prob=p)))
            gap = sum(abs(ours[k] - ref_draws[k]) for k in set(ours) | set(ref_draws))
            tv[f"{word}@p={p}"] = round(gap / 40_000, 4)
        out["dropout_tv_distance_vs_yttm"] = tv
        theirs = set(BPETokenizer.load(workdir / "yttm.model").vocab())
        out["vocab_overlap_with_yttm_trained"] = round(len(theirs & set(tok.vocab())) / len(theirs), 4)
    out["captions_per_s"] = {k: round(v) for k, v in speed.items()}
    out["target_captions_per_s"] = 20000
    print(json.dumps(out, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
