"""TokenizerConfig: how a BPE text tokenizer is trained and how captions become ``text_ids``."""

from __future__ import annotations

import dataclasses

from holst.config import ConfigBase, _check, check_choice, check_prob


@dataclasses.dataclass
class TokenizerConfig(ConfigBase):
    """How a BPE text tokenizer is trained and how captions become ``text_ids`` (reference.md §3).

    ``vocab_size`` counts every BPE id including the four special ids (16384 for ruDALL-E's
    ``bpe.model``). ``keep_eos=False`` is ruDALL-E's convention (a caption that is too long loses its
    eos); ``keep_eos=True`` is ruCLIP's (the last kept id is always eos). ``bpe_dropout`` is the
    training-time BPE-dropout probability; inference always encodes with 0. ``coverage`` is
    YouTokenToMe's character coverage used when training: the rarest characters covering at most
    ``1 - coverage`` of the text are left out of the alphabet (they encode as unk).
    """

    vocab_size: int = 16384
    text_seq_length: int = dataclasses.field(default=128, metadata={
        "help": "text ids per caption, stored in config.json (default {default})"})
    lowercase: bool = dataclasses.field(default=True, metadata={
        "help": "lower-case captions, as ruDALL-E encodes them (default; --no-lowercase keeps case)"})
    keep_eos: bool = dataclasses.field(default=False, metadata={
        "help": "stored in config.json: truncate keeping eos (ruCLIP convention; default off)"})
    bpe_dropout: float = dataclasses.field(default=0.0, metadata={
        "help": "stored in config.json: BPE-dropout probability for training the transformer (default {default})"})
    coverage: float = dataclasses.field(default=1.0, metadata={
        "help": "character coverage in (0, 1]: the rarest characters beyond it become unk (default {default})"})

    def __post_init__(self) -> None:
        _check(isinstance(self.vocab_size, int) and self.vocab_size >= 2,
               f"vocab_size={self.vocab_size!r} must be an integer >= 2 (at least unk and '▁')")
        _check(isinstance(self.text_seq_length, int) and self.text_seq_length >= 2,
               f"text_seq_length={self.text_seq_length!r} must be an integer >= 2 (room for bos and eos)")
        check_choice("lowercase", self.lowercase, (True, False))
        check_choice("keep_eos", self.keep_eos, (True, False))
        check_prob("bpe_dropout", self.bpe_dropout)
        _check(0.0 < self.coverage <= 1.0, f"coverage={self.coverage!r} must lie in (0, 1]")
