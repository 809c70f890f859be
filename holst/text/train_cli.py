"""``holst train tokenizer``: learn a BPE text tokenizer from caption files (one caption per line).

Example::

    holst train tokenizer captions_ru.txt captions_en.txt --vocab-size 16384 --out models/my/tokenizer

writes ``models/my/tokenizer/bpe.model`` (YouTokenToMe format) and ``config.json``; with ``--out x.model``
(a path ending in ``.model``) only the model file is written.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from pathlib import Path

from holst.cli_common import add_dataclass_arguments, given_values
from holst.config import TokenizerConfig
from holst.utils.runtime import get_logger

# The TokenizerConfig fields that are flags (default None = not given: TokenizerConfig's default applies);
# --vocab-size is required, so it is written by hand.
TOKENIZER_FLAGS = ("coverage", "lowercase", "text_seq_length", "keep_eos", "bpe_dropout")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``holst train tokenizer``."""
    parser.add_argument("inputs", nargs="+", type=Path, help="UTF-8 text file(s) of captions, one per line")
    parser.add_argument("--vocab-size", type=int, required=True,
                        help="total ids including the 4 special ids (ruDALL-E: 16384)")
    parser.add_argument("--out", type=Path, required=True,
                        help="output directory (bpe.model + config.json), or a file path ending in .model")
    add_dataclass_arguments(parser, TokenizerConfig, TOKENIZER_FLAGS)


def _read_lines(paths: list[Path]) -> Iterator[str]:
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    yield line.rstrip("\n")
        except UnicodeDecodeError as e:
            raise SystemExit(f"error: {path}: not UTF-8 text ({e.reason} at byte {e.start} of a chunk)") from e
        except OSError as e:
            raise SystemExit(f"error: cannot read {path}: {e.strerror or e}") from e


def main(args: argparse.Namespace) -> int:
    """Run ``holst train tokenizer``: train a BPE tokenizer on caption files and save it to ``--out``."""
    from holst.text.tokenizer import BPETokenizer, TokenizerError

    log = get_logger("holst.text")
    config = TokenizerConfig(vocab_size=args.vocab_size, **given_values(args, TOKENIZER_FLAGS))  # ConfigError: 1 line
    start = time.perf_counter()

    def progress(done: int, wanted: int) -> None:
        if done % 1000 == 0:
            log.info("%d / %d merges (%.0f s)", done, wanted, time.perf_counter() - start)

    try:
        tok = BPETokenizer.train(_read_lines(args.inputs), config.vocab_size, coverage=config.coverage,
                                 lowercase=config.lowercase, config=config, progress=progress)
    except TokenizerError as e:
        raise SystemExit(f"error: {e}") from e
    out: Path = args.out
    if out.suffix == ".model":
        out.parent.mkdir(parents=True, exist_ok=True)
        tok.save(out)
    else:
        tok.save_pretrained(out)
    log.info("trained BPE: %d ids (%d characters, %d merges) in %.1f s -> %s", tok.vocab_size,
             tok.num_chars, tok.num_merges, time.perf_counter() - start, out)
    return 0
