"""Text tokenizer: YouTokenToMe-compatible BPE with BPE-dropout and training (reference.md §3)."""

from holst.text.tokenizer import SPACE_CHAR, BPETokenizer, TokenizerError

__all__ = ["BPETokenizer", "TokenizerError", "SPACE_CHAR"]
