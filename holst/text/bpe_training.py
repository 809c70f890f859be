"""Learning a YouTokenToMe-style BPE model from text (YouTokenToMe 1.0.6 ``learn_bpe_from_string``).

What YouTokenToMe does, and this module repeats:
    * characters are counted outside whitespace (C ``isspace`` below 256, and "▁"); the text length
      used for ``coverage`` counts every character, whitespace and line ends included;
    * alphabet: the rarest characters are dropped while the rest still covers more than
      ``coverage`` of the text; dropped characters are deleted from the text before words are
      formed (so they encode as unk later);
    * ids: the special ids first, then "▁", then the characters by decreasing frequency (ties: larger
      code point first), then one id per merge in merge order; ids are then renamed onto the ids
      the special tokens leave free;
    * each word is "▁" + its characters; pair counts are weighted by word frequency, and a run of k
      equal tokens counts as k // 2 pairs (non-overlapping), as YouTokenToMe's run-length lists do;
    * the most frequent pair is merged everywhere (left to right) until ``vocab_size`` ids exist or no
      pair is left. Among equally frequent pairs the one queued last wins, as in YouTokenToMe's queue:
      pairs made by the newest merge are queued at once, pairs whose count fell are re-queued lazily
      when their stale entry comes up. YouTokenToMe queues the initial pairs in hash-table order; here
      they are queued in the order of its DETERMINISTIC_QUEUE comparator, so models are reproducible
      and share ~99.9% of their vocabulary with YouTokenToMe's (bench/tokenizer.py), not all of it.
"""

from __future__ import annotations

import heapq
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from operator import eq

from holst.text.tokenizer import _WORD_RE, SPACE_CHAR, TokenizerError

Pair = tuple[int, int]


def _pair_counts(word: list[int]) -> dict[Pair, int]:
    """Pairs in one word; a run of k equal tokens holds k // 2 (non-overlapping) self-pairs."""
    counts: dict[Pair, int] = {}
    get = counts.get
    for pair in zip(word, word[1:]):
        counts[pair] = get(pair, 0) + 1
    if any(map(eq, word, word[1:])):  # rare: fix the self-pairs of runs (zip counted k - 1 per run)
        i, n = 0, len(word)
        while i < n:
            j = i
            while j + 1 < n and word[j + 1] == word[i]:
                j += 1
            if j > i:
                pair = (word[i], word[i])
                counts[pair] -= (j - i) - (j - i + 1) // 2
                if not counts[pair]:
                    del counts[pair]
            i = j + 1
    return counts


def _apply_merge(word: list[int], x: int, y: int, z: int) -> list[int]:
    """Replace every (x, y) by z, left to right without overlap ("aaa" with (a, a) -> "z a")."""
    out: list[int] = []
    i, n = 0, len(word)
    find = word.index
    while True:
        try:
            j = find(x, i)
        except ValueError:
            break
        if j + 1 < n and word[j + 1] == y:
            out += word[i:j]
            out.append(z)
            i = j + 2
        else:
            out += word[i: j + 1]
            i = j + 1
    out += word[i:]
    return out


def _priority(count: int, a: int, b: int) -> tuple[int, int, int, int]:
    # smaller = better: YouTokenToMe's DETERMINISTIC_QUEUE comparator (count, then smaller ids, larger left)
    return (-count, max(a, b), min(a, b), -a)


def _alphabet(word_counts: Counter, data_len: int, coverage: float, n_special: int) -> tuple[dict[str, int], set[str]]:
    """Characters kept (char -> internal id, "▁" first) and the rare characters removed."""
    char_counts: Counter = Counter()
    for word, count in word_counts.items():
        for ch, k in Counter(word).items():
            char_counts[ch] += k * count
    if not char_counts:
        raise TokenizerError("the training texts contain no characters outside whitespace")
    frequencies = sorted((count, ord(ch)) for ch, count in char_counts.items())
    cut, n_removed = 0, 0
    while cut < len(frequencies) and (data_len - n_removed - frequencies[cut][0]) > data_len * coverage:
        n_removed += frequencies[cut][0]
        cut += 1
    removed = {chr(cp) for _, cp in frequencies[:cut]}
    chars = {SPACE_CHAR: n_special}
    for _, cp in reversed(frequencies[cut:]):
        chars[chr(cp)] = len(chars) + n_special
    return chars, removed


def learn_bpe(texts: Iterable[str], vocab_size: int, *, coverage: float = 1.0,
              special_ids: tuple[int, int, int, int] = (0, 1, 2, 3),
              progress: Callable[[int, int], None] | None = None) -> tuple[dict[str, int], list[tuple[int, int, int]]]:
    """Learn the alphabet and the merge rules.

    Args:
        texts: the corpus (each item is one line of YouTokenToMe's training file).
        vocab_size: total number of ids wanted, special ids included.
        coverage: character coverage in (0, 1].
        special_ids: (pad, unk, bos, eos); -1 = absent (unk is required).
        progress: optional callable(merges_done, merges_wanted), called every 100 merges.

    Returns:
        (chars: character -> id, merges: [(left, right, new)] in rank order), final ids.
    """
    pad_id, unk_id, bos_id, eos_id = special_ids
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise TokenizerError(f"vocab_size={vocab_size!r} must be a positive integer")
    if not 0.0 < coverage <= 1.0:
        raise TokenizerError(f"coverage={coverage!r} must lie in (0, 1]")
    if not 0 <= unk_id < vocab_size:
        raise TokenizerError(f"unk_id={unk_id} must lie in [0, vocab_size - 1 = {vocab_size - 1}]")
    for name, value in (("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)):
        if not -1 <= value < vocab_size:
            raise TokenizerError(f"{name}={value} must be -1 or lie in [0, vocab_size - 1 = {vocab_size - 1}]")
    taken = [i for i in special_ids if i != -1]
    if len(set(taken)) != len(taken):
        raise TokenizerError(f"special ids {special_ids} (pad, unk, bos, eos) must be different")
    n_special = len(taken)

    word_counts: Counter = Counter()
    data_len = 0
    for k, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"training text {k} must be a str, got {type(text).__name__}")
        word_counts.update(_WORD_RE.findall(text))
        data_len += len(text) + 1  # + the line end YouTokenToMe's training file has

    chars, removed = _alphabet(word_counts, data_len, coverage, n_special)
    used = len(chars) + n_special
    if used > vocab_size:
        raise TokenizerError(f"vocab_size={vocab_size} is too small: the alphabet alone needs {used} ids "
                             f"({n_special} special, '▁' and {len(chars) - 1} characters); set vocab_size >= {used} "
                             "or lower coverage")

    # Words as internal-id lists ("▁" + characters), rare characters deleted first.
    merged_counts: Counter = Counter()
    for word, count in word_counts.items():
        if removed:
            word = "".join(ch for ch in word if ch not in removed)
            if not word:
                continue
        merged_counts[word] += count
    words = [[chars[SPACE_CHAR]] + [chars[ch] for ch in word] for word in merged_counts]
    freqs = list(merged_counts.values())

    pair_count: dict[Pair, int] = {}
    where: dict[Pair, set[int]] = {}
    for wi, word in enumerate(words):
        for pair, c in _pair_counts(word).items():
            pair_count[pair] = pair_count.get(pair, 0) + c * freqs[wi]
            where.setdefault(pair, set()).add(wi)
    # Heap entries (-count, -seq, left, right): most frequent first, then the most recently queued.
    # Initial pairs are queued worst-first by the comparator, so among ties its best is the newest.
    order = sorted(pair_count.items(), key=lambda kv: _priority(kv[1], *kv[0]), reverse=True)
    heap = [(-c, -seq, a, b) for seq, ((a, b), c) in enumerate(order, 1)]
    seq = len(heap)
    heapq.heapify(heap)

    merges: list[tuple[int, int, int]] = []
    wanted = vocab_size - used
    next_id = used
    while next_id < vocab_size:
        while heap:
            neg_count, _, x, y = heapq.heappop(heap)
            real = pair_count.get((x, y), 0)
            if real == -neg_count > 0:
                break
            if real > 0:  # its count fell since it was queued: queue it again (as the newest)
                seq += 1
                heapq.heappush(heap, (-real, -seq, x, y))
        else:
            warnings.warn(f"BPE training merged only {len(merges)} pairs: no pair is left; the vocabulary has "
                          f"{next_id} ids instead of vocab_size={vocab_size}", UserWarning, stacklevel=3)
            break
        z = next_id
        next_id += 1
        merges.append((x, y, z))
        changed: dict[Pair, int] = {}
        for wi in where.pop((x, y)):
            word = words[wi]
            new_word = _apply_merge(word, x, y, z)
            if len(new_word) == len(word):
                continue  # stale entry: the pair left this word in an earlier merge
            f = freqs[wi]
            old = _pair_counts(word)
            for pair, c in _pair_counts(new_word).items():
                d = c - old.pop(pair, 0)
                if d:
                    pair_count[pair] = pair_count.get(pair, 0) + d * f
                    changed[pair] = 1
                    if d > 0:
                        where.setdefault(pair, set()).add(wi)
            for pair, c in old.items():  # pairs that left the word
                pair_count[pair] -= c * f
                changed[pair] = 1
            words[wi] = new_word
        pair_count.pop((x, y), None)
        for pair in changed:
            c = pair_count.get(pair, 0)
            if c > 0:
                if z in pair:  # a new pair; pairs whose count fell keep their stale entry (see above)
                    seq += 1
                    heapq.heappush(heap, (-c, -seq, *pair))
            elif pair in pair_count:
                del pair_count[pair]
        if progress is not None and len(merges) % 100 == 0:
            progress(len(merges), wanted)

    # Rename internal ids (specials counted first) onto the ids the special tokens leave free.
    taken_set = set(taken)
    free = [i for i in range(max(vocab_size, next_id)) if i not in taken_set]
    rename = {internal: free[internal - n_special] for internal in range(n_special, next_id)}
    chars = {ch: rename[i] for ch, i in chars.items()}
    merges = [(rename[x], rename[y], rename[z]) for x, y, z in merges]
    return chars, merges
