r"""YouTokenToMe-compatible BPE text tokenizer with BPE-dropout (research/reference.md §3).

Pure Python: reads and writes YouTokenToMe's ``bpe.model`` and encodes / decodes exactly as
YouTokenToMe 1.0.6 does on the same file (``BaseEncoder::encode_sentence`` / ``decode``).

Model file (text; integers separated by whitespace, one record per line)::

    n_chars n_merges
    code_point id            x n_chars   the alphabet, U+2581 "▁" (the word boundary) included
    left_id right_id new_id  x n_merges  merge rules in rank order (earlier = applied first)
    unk_id pad_id bos_id eos_id          -1 = absent (ruDALL-E: 1 0 2 3)

Encoding one text:
    * words are maximal runs of characters that are neither ASCII whitespace (``\\t\\n\\v\\f\\r`` and
      space: C ``isspace`` below 256) nor "▁" itself;
    * a word becomes ``["▁", c1, ..., cn]``; each run of characters missing from the alphabet becomes
      ONE placeholder that never merges and is emitted as unk;
    * merges are applied lowest rank first, leftmost first (a priority queue of (rank, position));
    * BPE-dropout (probability p): every candidate popped from that queue is skipped with
      probability p; the skipped ones return to the queue once a candidate is taken; a word is done
      when a whole pass skips everything (YouTokenToMe's ``DropoutQueue``). p = 1 gives characters.
      The random source differs (a ``random.Random`` seeded from your generator, not a C++ mt19937),
      so draws differ but the distribution of segmentations is the same (checked in tests/bench).
Decoding joins the pieces, turns a piece's leading "▁" into a space and drops the very first space.

Deterministic encodings are cached per word, which makes encoding short captions cost a regex
split plus a few dict look-ups. Under dropout, one draw per word decides whether the word's
deterministic run is kept; only otherwise is its queue simulated.
"""

from __future__ import annotations

import heapq
import math
import random
import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from holst.text.config import TokenizerConfig

SPACE_CHAR = "\u2581"  # "▁", YouTokenToMe's word-boundary symbol (SPACE_TOKEN = 9601)
UNK_TOKEN, PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<UNK>", "<PAD>", "<BOS>", "<EOS>"
MODEL_FILE = "bpe.model"
CONFIG_FILE = "config.json"

# YouTokenToMe's is_space(): C isspace() below 256 (space, \t \n \v \f \r) or "▁". Python's str.split()
# would also split on U+00A0, U+2028, \x1c..\x1f etc., which YouTokenToMe keeps inside words.
_WORD_RE = re.compile("[^\t\n\v\f\r \u2581]+")
_ASCII_SPACE = " \t\n\v\f\r"
_CACHE_MAX = 1 << 17  # words; the cache is cleared when full so memory stays bounded
_CACHE_WORD_MAX = 64  # characters; longer words are rare and seldom repeat: not cached
_SHORT_WORD = 40  # symbols; longer words use the O(n log n) queue instead of repeated scans


class TokenizerError(ValueError):
    """A BPE model file, or an argument given to the tokenizer, is invalid."""


def _rng_from(generator: torch.Generator | random.Random | None) -> random.Random:
    """A private ``random.Random`` for BPE-dropout, never the global RNG.

    A torch.Generator is advanced by one draw that seeds the Random, so the same generator state
    gives the same segmentations. ``None`` gives a Random seeded from the OS (not reproducible).
    """
    if isinstance(generator, random.Random):
        return generator
    if generator is None:
        return random.Random()
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, random.Random or None, got {type(generator).__name__}")
    seed = torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item()
    return random.Random(seed)


def _check_dropout(dropout: float) -> float:
    dropout = float(dropout)
    if not 0.0 <= dropout <= 1.0:
        raise TokenizerError(f"dropout={dropout!r} must lie in [0, 1]")
    return dropout


class BPETokenizer:
    """Byte-pair-encoding tokenizer compatible with YouTokenToMe model files.

    Args:
        chars: alphabet, character -> id; must contain "▁" (U+2581).
        merges: ``(left_id, right_id, new_id)`` rules in rank order.
        unk_id, pad_id, bos_id, eos_id: special ids (-1 = absent; unk is required).
        config: how captions are turned into ``text_ids`` (:meth:`encode_batch` defaults).
        source: where the model came from, used in error messages.

    All ids (characters, merge results, specials) must be exactly ``0 .. vocab_size - 1``.
    """

    def __init__(self, chars: dict[str, int], merges: Sequence[tuple[int, int, int]], *, unk_id: int = 1,
                 pad_id: int = 0, bos_id: int = 2, eos_id: int = 3, config: TokenizerConfig | None = None,
                 source: str = "<memory>") -> None:
        self.source = source
        self._char_to_id = {str(c): int(i) for c, i in chars.items()}
        self._merges = [(int(x), int(y), int(z)) for x, y, z in merges]
        self.unk_id, self.pad_id, self.bos_id, self.eos_id = int(unk_id), int(pad_id), int(bos_id), int(eos_id)
        self._validate()
        self.vocab_size = len(self._char_to_id) + len(self._merges) + sum(
            i != -1 for i in (self.unk_id, self.pad_id, self.bos_id, self.eos_id))
        self.config = (config or TokenizerConfig()).replace(vocab_size=self.vocab_size)
        self._build_tables()
        self._cache: dict[str, list[int]] = {}  # word -> ids (deterministic encoding)
        self._dropout_cache: dict[str, tuple[list[int], list[int], list[int], int]] = {}  # see _dropout_entry
        self._warned_truncation = False

    # ------------------------------------------------------------------------------------------
    # Construction and validation
    # ------------------------------------------------------------------------------------------

    def _fail(self, problem: str) -> None:
        raise TokenizerError(f"BPE model {self.source}: {problem}")

    def _validate(self) -> None:
        """The checks YouTokenToMe skips (it would crash or silently misbehave on such files)."""
        specials = {"unk_id": self.unk_id, "pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id}
        if self.unk_id < 0:
            self._fail(f"unk_id={self.unk_id} but an unk id is required")
        for name, value in specials.items():
            if value < -1:
                self._fail(f"{name}={value} must be -1 (absent) or a non-negative id")
        owner: dict[int, str] = {}

        def claim(i: int, what: str) -> None:
            if i < 0:
                self._fail(f"{what} has negative id {i}")
            if i in owner:
                self._fail(f"id {i} is used twice ({owner[i]} and {what})")
            owner[i] = what

        for name, value in specials.items():
            if value != -1:
                claim(value, name)
        for ch, i in self._char_to_id.items():
            if len(ch) != 1:
                self._fail(f"alphabet entry {ch!r} is not a single character")
            claim(i, f"character U+{ord(ch):04X}")
        if SPACE_CHAR not in self._char_to_id:
            self._fail("the alphabet lacks the word-boundary character U+2581 '▁' (not a YouTokenToMe BPE model?)")
        defined = set(self._char_to_id.values())
        seen_pairs: set[tuple[int, int]] = set()
        for rank, (x, y, z) in enumerate(self._merges):
            for operand in (x, y):
                if operand not in defined:
                    self._fail(f"merge rule {rank} ({x} {y} -> {z}) uses id {operand}, which is neither a character "
                               "nor the result of an earlier rule")
            if (x, y) in seen_pairs:
                self._fail(f"merge rule {rank} repeats the pair ({x}, {y})")
            seen_pairs.add((x, y))
            claim(z, f"merge rule {rank}")
            defined.add(z)
        n = len(owner)
        if owner and max(owner) != n - 1:
            missing = sorted(set(range(max(owner) + 1)) - set(owner))[:5]
            self._fail(f"ids must be exactly 0..{n - 1}; largest is {max(owner)}, missing e.g. {missing}")

    def _build_tables(self) -> None:
        """Look-up tables for encoding and decoding."""
        self._space_id = self._char_to_id[SPACE_CHAR]
        self._ranks: dict[tuple[int, int], int] = {(x, y): r for r, (x, y, _) in enumerate(self._merges)}
        self._left = [x for x, _, _ in self._merges]
        self._right = [y for _, y, _ in self._merges]
        self._result = [z for _, _, z in self._merges]
        # Each id's characters ("recipe"), the raw subword and the piece decode() emits.
        recipe: list[str] = [""] * self.vocab_size
        for ch, i in self._char_to_id.items():
            recipe[i] = ch
        for x, y, z in self._merges:
            recipe[z] = recipe[x] + recipe[y]
        for i, token in ((self.unk_id, UNK_TOKEN), (self.pad_id, PAD_TOKEN), (self.bos_id, BOS_TOKEN),
                         (self.eos_id, EOS_TOKEN)):
            if i != -1:
                recipe[i] = token
        self._subwords = recipe
        self._specials = {i for i in (self.unk_id, self.pad_id, self.bos_id, self.eos_id) if i != -1}
        self._pieces = [" " + s[1:] if s[:1] == SPACE_CHAR and i not in self._specials else s
                        for i, s in enumerate(recipe)]
        self._subword_to_id = {s: i for i, s in enumerate(recipe) if i not in self._specials}
        self._subword_to_id.update({t: i for i, t in ((self.unk_id, UNK_TOKEN), (self.pad_id, PAD_TOKEN),
                                                      (self.bos_id, BOS_TOKEN), (self.eos_id, EOS_TOKEN))})

    # ------------------------------------------------------------------------------------------
    # Files
    # ------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path, config: TokenizerConfig | None = None) -> BPETokenizer:
        """Read a YouTokenToMe model file (e.g. ruDALL-E's ``bpe.model``).

        Raises:
            TokenizerError: the file is missing, unreadable, truncated or not a YouTokenToMe model;
                the message names the file, the line and the problem.
        """
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise TokenizerError(f"cannot read BPE model {path}: {e.strerror or e}") from e
        return cls.from_model_text(data, source=str(path), config=config)

    @classmethod
    def from_model_text(cls, data: str | bytes, *, source: str = "<memory>",
                        config: TokenizerConfig | None = None) -> BPETokenizer:
        """Parse the text of a YouTokenToMe model file (see the module docstring for the format)."""
        if isinstance(data, bytes):
            try:
                data = data.decode("ascii")
            except UnicodeDecodeError as e:
                raise TokenizerError(f"BPE model {source}: byte {e.start} is not ASCII; a YouTokenToMe model is "
                                     "lines of integers (is this a sentencepiece/tokenizers file?)") from e
        if data.startswith("version https://git-lfs"):
            raise TokenizerError(f"BPE model {source}: this is a Git LFS pointer, not the model; fetch the real file "
                                 "(git lfs pull) first")
        lines = data.splitlines()
        while lines and not lines[-1].strip():
            lines.pop()

        def ints(lineno: int, count: int, what: str) -> list[int]:
            if lineno > len(lines):
                raise TokenizerError(f"BPE model {source}: truncated: line {lineno} ({what}) is missing; "
                                     f"the file has {len(lines)} lines")
            fields = lines[lineno - 1].split()
            try:
                values = [int(f) for f in fields]
            except ValueError:
                values = []
            if len(values) != count:
                shown = lines[lineno - 1][:60]
                raise TokenizerError(f"BPE model {source}: line {lineno}: expected {what} ({count} integers), "
                                     f"got {shown!r}")
            return values

        n_chars, n_merges = ints(1, 2, "'n_chars n_merges'")
        if n_chars < 1 or n_merges < 0:
            raise TokenizerError(f"BPE model {source}: line 1: n_chars={n_chars}, n_merges={n_merges} are invalid")
        expected = n_chars + n_merges + 2
        if len(lines) > expected:
            raise TokenizerError(f"BPE model {source}: {len(lines)} lines but the header promises {expected} "
                                 f"(1 + {n_chars} characters + {n_merges} merges + 1); extra data after line "
                                 f"{expected}")
        chars: dict[str, int] = {}
        for k in range(n_chars):
            code_point, token_id = ints(2 + k, 2, "'code_point id'")
            if not 0 <= code_point <= 0x10FFFF:
                raise TokenizerError(f"BPE model {source}: line {2 + k}: code point {code_point} is not Unicode")
            if chr(code_point) in chars:
                raise TokenizerError(f"BPE model {source}: line {2 + k}: character U+{code_point:04X} listed twice")
            chars[chr(code_point)] = token_id
        merges = [tuple(ints(2 + n_chars + k, 3, "'left_id right_id new_id'")) for k in range(n_merges)]
        unk, pad, bos, eos = ints(expected, 4, "'unk_id pad_id bos_id eos_id'")
        return cls(chars, merges, unk_id=unk, pad_id=pad, bos_id=bos, eos_id=eos, config=config, source=source)

    def to_model_text(self) -> str:
        """The YouTokenToMe model file text (characters listed in id order)."""
        lines = [f"{len(self._char_to_id)} {len(self._merges)}"]
        lines += [f"{ord(c)} {i}" for c, i in sorted(self._char_to_id.items(), key=lambda kv: kv[1])]
        lines += [f"{x} {y} {z}" for x, y, z in self._merges]
        lines.append(f"{self.unk_id} {self.pad_id} {self.bos_id} {self.eos_id}")
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> None:
        """Write a YouTokenToMe model file (readable by ``youtokentome.BPE(model=path)``), atomically."""
        from holst.utils.persist import atomic_write_bytes

        atomic_write_bytes(path, self.to_model_text().encode("ascii"))

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``directory/bpe.model`` and ``directory/config.json`` (the :class:`TokenizerConfig`)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save(directory / MODEL_FILE)
        self.config.save_json(directory / CONFIG_FILE)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> BPETokenizer:
        """Load ``directory/bpe.model`` (+ ``config.json`` when present, else the ruDALL-E defaults)."""
        directory = Path(directory)
        model = directory / MODEL_FILE if directory.is_dir() else directory
        config = None
        if directory.is_dir() and (directory / CONFIG_FILE).is_file():
            config = TokenizerConfig.load_json(directory / CONFIG_FILE)
        tok = cls.load(model, config=config)
        if config is not None and config.vocab_size != tok.vocab_size:
            raise TokenizerError(f"{directory / CONFIG_FILE} says vocab_size={config.vocab_size} but {model} has "
                                 f"{tok.vocab_size} ids: the config and the model file do not belong together")
        return tok

    # ------------------------------------------------------------------------------------------
    # Vocabulary
    # ------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.vocab_size

    def __getstate__(self) -> dict[str, Any]:
        # Pickled into every DataLoader worker: leave the per-word caches behind (they refill fast).
        state = self.__dict__.copy()
        state["_cache"], state["_dropout_cache"] = {}, {}
        return state

    def __repr__(self) -> str:
        return (f"BPETokenizer(vocab_size={self.vocab_size}, chars={len(self._char_to_id)}, "
                f"merges={len(self._merges)}, source={self.source!r})")

    @property
    def num_chars(self) -> int:
        """Alphabet size ("▁" included)."""
        return len(self._char_to_id)

    @property
    def num_merges(self) -> int:
        """Number of merge rules."""
        return len(self._merges)

    def vocab(self) -> list[str]:
        """Subword of every id (with "▁", specials as ``<UNK>``...), like ``youtokentome.BPE.vocab()``."""
        return list(self._subwords)

    def id_to_subword(self, token_id: int) -> str:
        """The subword of one id (raises TokenizerError outside ``0 .. vocab_size - 1``)."""
        self._check_id(token_id)
        return self._subwords[token_id]

    def subword_to_id(self, subword: str) -> int:
        """Id of a subword (``"▁кот"``, ``"<EOS>"``); unk id when it is not in the vocabulary."""
        return self._subword_to_id.get(subword, self.unk_id)

    def _check_id(self, token_id: int) -> None:
        if not 0 <= token_id < self.vocab_size:
            raise TokenizerError(f"id {token_id} is outside the vocabulary 0..{self.vocab_size - 1}")

    # ------------------------------------------------------------------------------------------
    # Encoding
    # ------------------------------------------------------------------------------------------

    def _symbols(self, word: str) -> list[int]:
        """"▁" + the word's character ids; each run of unknown characters is one negative placeholder."""
        lookup = self._char_to_id.get
        symbols = [self._space_id]
        placeholder = 0
        in_unknown = False
        for ch in word:
            i = lookup(ch)
            if i is not None:
                symbols.append(i)
                in_unknown = False
            elif not in_unknown:
                placeholder -= 1  # distinct per run, like YouTokenToMe's ids >= 1e9: never part of a rule
                symbols.append(placeholder)
                in_unknown = True
        return symbols

    def _merge_scan(self, symbols: list[int]) -> list[int]:
        """Deterministic BPE of one short word by repeated scans.

        Equals the (rank, position) queue: every rule using a token has a higher rank than the rule
        that made it (checked in _validate), so applying all occurrences of the best rule left to
        right, then rescanning, merges in exactly the queue's order.
        """
        ranks = self._ranks
        while len(symbols) > 1:
            best = -1
            for pair in zip(symbols, symbols[1:]):
                r = ranks.get(pair)
                if r is not None and (best < 0 or r < best):
                    best = r
            if best < 0:
                break
            x, y, z = self._left[best], self._right[best], self._result[best]
            merged: list[int] = []
            i, n = 0, len(symbols)
            while i < n:
                if i + 1 < n and symbols[i] == x and symbols[i + 1] == y:
                    merged.append(z)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _dropout_entry(self, word: str) -> tuple[list[int], list[int], list[int], int]:
        """(symbols, sorted initial candidate keys, deterministic result, D) of a word; cached.

        A candidate is the int ``rank << 32 | position`` (ints compare faster than tuples in heapq; a
        sorted list is already a heap). D is the number of queue pops of the deterministic run:
        under dropout the run equals it exactly when none of those D pops is skipped.
        """
        entry = self._dropout_cache.get(word)
        if entry is None:
            symbols = self._symbols(word)
            ranks = map(self._ranks.get, zip(symbols, symbols[1:]))
            keys = sorted(r << 32 | i for i, r in enumerate(ranks) if r is not None)
            merged, pops = self._merge_queue(symbols, keys)
            entry = (symbols, keys, merged, pops)
            if len(word) <= _CACHE_WORD_MAX:
                if len(self._dropout_cache) >= _CACHE_MAX:
                    self._dropout_cache.clear()
                self._dropout_cache[word] = entry
        return entry

    def _merge_queue(self, symbols: list[int], keys: list[int], dropout: float = 0.0,
                     rng: random.Random | None = None, first_skip: int = -1) -> tuple[list[int], int]:
        """BPE of one word with YouTokenToMe's priority queue of (rank, position) candidates.

        Positions index a linked list of the word's symbols; a merge keeps the left node and kills the
        right one. Stale candidates are recognised when popped. With ``dropout`` > 0 this is
        YouTokenToMe's DropoutQueue: candidates are skipped with probability ``dropout`` and put back
        after the next candidate taken (stale ones included); the word ends when a pass skips all.

        Args:
            symbols: the word's initial symbols (not modified).
            keys: its initial candidates ``rank << 32 | position``, sorted (not modified).
            dropout: skip probability (0: deterministic).
            rng: the random source of the skips (None: deterministic).
            first_skip: when >= 0, pops ``0 .. first_skip - 1`` are taken without a draw and pop
                ``first_skip`` is skipped (a draw already decided the first skip; see ``_encode``).

        Returns:
            (merged symbols, number of queue pops).
        """
        if not keys:
            return symbols, 0
        n = len(symbols)
        ranks, left, right, result = self._ranks, self._left, self._right, self._result
        tok: list[int | None] = list(symbols)
        nxt = list(range(1, n + 1))
        nxt[-1] = -1
        prv = list(range(-1, n - 1))
        heap = list(keys)
        pop, push = heapq.heappop, heapq.heappush
        draw = rng.random if (dropout > 0 and rng is not None) else None
        skipped: list[int] = []
        mask = 0xFFFFFFFF
        pops = 0
        while True:
            if draw is None or pops < first_skip:
                if not heap:
                    break
                key = pop(heap)
                pops += 1
            else:
                if pops == first_skip:
                    skipped.append(pop(heap))
                    pops += 1
                while heap:
                    key = pop(heap)
                    if draw() < dropout:
                        skipped.append(key)
                    else:
                        break
                else:  # every candidate was skipped: the word is finished
                    break
                if skipped:
                    for event in skipped:
                        push(heap, event)
                    skipped.clear()
            rank, p1 = key >> 32, key & mask
            p2 = nxt[p1]
            if p2 == -1 or tok[p1] != left[rank] or tok[p2] != right[rank]:
                continue  # stale: one of the two nodes changed since this candidate was queued
            p3 = nxt[p2]
            tok[p1], nxt[p1] = result[rank], p3
            tok[p2], nxt[p2], prv[p2] = None, -1, -1
            if p3 != -1:
                prv[p3] = p1
                r = ranks.get((tok[p1], tok[p3]))
                if r is not None:
                    push(heap, r << 32 | p1)
            p0 = prv[p1]
            if p0 != -1:
                r = ranks.get((tok[p0], tok[p1]))
                if r is not None:
                    push(heap, r << 32 | p0)
        return [t for t in tok if t is not None], pops

    def _encode_word(self, word: str) -> list[int]:
        symbols = self._symbols(word)
        if len(symbols) <= _SHORT_WORD:
            merged = self._merge_scan(symbols)
        else:  # long words: O(n log n); not kept in the queue cache (they would bloat it)
            ranks = map(self._ranks.get, zip(symbols, symbols[1:]))
            merged = self._merge_queue(symbols, sorted(r << 32 | i for i, r in enumerate(ranks) if r is not None))[0]
        unk = self.unk_id
        return [t if t >= 0 else unk for t in merged]

    def _encode(self, text: str, dropout: float, rng: random.Random | None) -> list[int]:
        out: list[int] = []
        if dropout == 0.0:
            cache = self._cache
            for word in _WORD_RE.findall(text):
                ids = cache.get(word)
                if ids is None:
                    ids = self._encode_word(word)
                    if len(word) <= _CACHE_WORD_MAX:
                        if len(cache) >= _CACHE_MAX:
                            cache.clear()
                        cache[word] = ids
                out += ids
            return out
        if dropout >= 1.0:  # every candidate is always skipped: pure characters
            for word in _WORD_RE.findall(text):
                out += self._symbols(word)
        else:
            # One draw per word decides whether any of the D pops of the deterministic run is skipped
            # (probability 1 - (1-p)^D) and, if so, which is the first (truncated geometric); only then
            # is the queue simulated. Same distribution as drawing for every pop, far fewer draws.
            entry, merge, rand, log_q = self._dropout_entry, self._merge_queue, rng.random, math.log1p(-dropout)
            for word in _WORD_RE.findall(text):
                symbols, keys, merged, pops = entry(word)
                first = math.log(1.0 - rand()) / log_q  # the first skipped pop, before flooring
                out += merged if first >= pops else merge(symbols, keys, dropout, rng, int(first))[0]
        unk = self.unk_id
        return [t if t >= 0 else unk for t in out]

    def encode(self, text: str, dropout: float = 0.0,
               generator: torch.Generator | random.Random | None = None) -> list[int]:
        """Raw BPE ids of one text, without specials and without any normalisation.

        With ``dropout=0`` this equals ``youtokentome.BPE(model).encode([text], output_type=ID)[0]``.

        Args:
            text: any Unicode string; whitespace-only or empty text gives ``[]``.
            dropout: BPE-dropout probability in [0, 1] (training only; 0 = deterministic).
            generator: randomness for dropout (never the global RNG); ``None`` = OS-seeded.

        Returns:
            list of ids in ``0 .. vocab_size - 1``.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        dropout = _check_dropout(dropout)
        return self._encode(text, dropout, _rng_from(generator) if dropout > 0 else None)

    def encode_batch(self, texts: Sequence[str], text_seq_length: int | None = None, *, dropout: float = 0.0,
                     generator: torch.Generator | random.Random | None = None, keep_eos: bool | None = None,
                     lowercase: bool | None = None) -> torch.Tensor:
        """Captions -> ``text_ids`` the ruDALL-E way: ``[bos] + ids + [eos]``, padded / truncated.

        Each caption is lower-cased (``lowercase``, default from the config) and stripped, encoded,
        wrapped in bos/eos and right-padded with the pad id. A caption that does not fit is cut to
        ``text_seq_length``: ruDALL-E's convention drops the eos (``keep_eos=False``, warns once per
        tokenizer); ruCLIP's (``keep_eos=True``) keeps ``text_seq_length - 2`` BPE ids and the eos.

        Args:
            texts: B captions.
            text_seq_length: T, >= 2 (default: ``config.text_seq_length``, 128).
            dropout: BPE-dropout probability (training); 0 at inference.
            generator: randomness for dropout; one draw per call.
            keep_eos: truncation convention (default ``config.keep_eos``).
            lowercase: lower-case captions first (default ``config.lowercase``).

        Returns:
            LongTensor (B, T) of ids in ``0 .. vocab_size - 1``.
        """
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of captions, not one str (wrap it in a list)")
        length = self.config.text_seq_length if text_seq_length is None else int(text_seq_length)
        if length < 2:
            raise TokenizerError(f"text_seq_length={length} must be >= 2 (room for bos and eos)")
        keep_eos = self.config.keep_eos if keep_eos is None else bool(keep_eos)
        lowercase = self.config.lowercase if lowercase is None else bool(lowercase)
        for name in ("bos_id", "eos_id", "pad_id"):
            if getattr(self, name) < 0:
                raise TokenizerError(f"BPE model {self.source} has no {name}; encode_batch needs bos, eos and pad")
        dropout = _check_dropout(dropout)
        rng = _rng_from(generator) if dropout > 0 else None
        texts = list(texts)
        out = np.full((len(texts), length), self.pad_id, dtype=np.int64)
        bos, eos, room = self.bos_id, self.eos_id, length - 2
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"caption {row} must be a str, got {type(text).__name__}")
            text = text.lower().strip() if lowercase else text.strip()
            ids = self._encode(text, dropout, rng)
            if len(ids) > room:
                if keep_eos:
                    ids = ids[:room]
                else:  # ruDALL-E: [bos] + ids + [eos] cut to the length, so the eos is lost
                    out[row, 0] = bos
                    out[row, 1:] = ids[: length - 1]
                    self._warn_truncation(len(ids), length)
                    continue
            out[row, 0] = bos
            out[row, 1: len(ids) + 1] = ids
            out[row, len(ids) + 1] = eos
        return torch.from_numpy(out)

    def _warn_truncation(self, n_ids: int, length: int) -> None:
        if not self._warned_truncation:
            self._warned_truncation = True
            warnings.warn(f"a caption of {n_ids} BPE ids does not fit text_seq_length={length} with bos/eos; it is cut "
                          "(ruDALL-E convention: the eos is dropped). Further cuts by this tokenizer are not reported.",
                          UserWarning, stacklevel=3)

    # ------------------------------------------------------------------------------------------
    # Decoding
    # ------------------------------------------------------------------------------------------

    def decode(self, ids: Iterable[int] | torch.Tensor | np.ndarray, ignore_ids: Iterable[int] | None = None) -> str:
        """Ids -> text, as ``youtokentome.BPE.decode``.

        Args:
            ids: one sequence of ids (list, 1-D tensor or array).
            ignore_ids: ids to skip. ``None`` skips pad, bos and eos (so ``decode(text_ids[i])`` shows
                the caption, unknown characters as ``<UNK>``); pass ``[]`` to show every special
                token like YouTokenToMe's default, or ``[0, 1, 2, 3]`` for ruDALL-E's ``decode_text``.

        Returns:
            the text; the leading space of the first word is dropped.
        """
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            if ids.ndim != 1:
                raise TokenizerError(f"decode takes one sequence of ids (1-D); got shape {tuple(ids.shape)}; "
                                     "use decode_batch for (B, T)")
            ids = ids.tolist()
        if ignore_ids is None:
            skip = {i for i in (self.pad_id, self.bos_id, self.eos_id) if i != -1}
        else:
            skip = {int(i) for i in ignore_ids}
        pieces, vocab_size, first = self._pieces, self.vocab_size, True
        parts: list[str] = []
        for token_id in ids:
            token_id = int(token_id)
            if token_id in skip:
                continue
            if not 0 <= token_id < vocab_size:
                raise TokenizerError(f"id {token_id} is outside the vocabulary 0..{vocab_size - 1}")
            piece = pieces[token_id]
            if first and piece[:1] == " ":
                piece = piece[1:]
            first = False
            parts.append(piece)
        return "".join(parts)

    def decode_batch(self, text_ids: torch.Tensor | Sequence[Sequence[int]],
                     ignore_ids: Iterable[int] | None = None) -> list[str]:
        """Decode each row of a (B, T) batch; see :meth:`decode`."""
        rows = text_ids.tolist() if isinstance(text_ids, (torch.Tensor, np.ndarray)) else text_ids
        return [self.decode(row, ignore_ids) for row in rows]

    # ------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, coverage: float = 1.0, lowercase: bool = False,
              pad_id: int = 0, unk_id: int = 1, bos_id: int = 2, eos_id: int = 3,
              config: TokenizerConfig | None = None, progress: Any = None) -> BPETokenizer:
        """Learn a BPE model from texts the way YouTokenToMe's ``BPE.train`` does.

        Args:
            texts: the corpus, e.g. one caption per item (any iterable; read once).
            vocab_size: total ids including the 4 special ids; training stops early (with a warning)
                when no pair is left to merge.
            coverage: YouTokenToMe's character coverage in (0, 1].
            lowercase: lower-case (and strip) every text first, matching ``encode_batch``.
            pad_id: padding id (-1 = absent).
            unk_id: id of unknown characters.
            bos_id: begin-of-sentence id (-1 = absent).
            eos_id: end-of-sentence id (-1 = absent).
            config: stored with the model; its vocab_size and coverage are overridden by the arguments.
            progress: optional callable(n_merges_done, n_merges_wanted).

        Returns:
            the trained tokenizer (save it with :meth:`save` or :meth:`save_pretrained`).
        """
        from holst.text.bpe_training import learn_bpe

        if lowercase:
            texts = (t.lower().strip() if isinstance(t, str) else t for t in texts)
        chars, merges = learn_bpe(texts, vocab_size, coverage=coverage, special_ids=(pad_id, unk_id, bos_id, eos_id),
                                  progress=progress)
        config = (config or TokenizerConfig()).replace(vocab_size=vocab_size, coverage=coverage)
        return cls(chars, merges, unk_id=unk_id, pad_id=pad_id, bos_id=bos_id, eos_id=eos_id, config=config,
                   source="<trained>")


__all__ = ["BPETokenizer", "TokenizerError", "SPACE_CHAR"]
