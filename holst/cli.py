"""The ``holst`` command line: a thin shell over the library.

Each leaf command lives in the module that owns the work and exposes two functions:
``add_arguments(parser: argparse.ArgumentParser) -> None`` and ``main(args: argparse.Namespace) -> int``.
Only the module of the command being run is imported, so ``holst --help`` stays fast and one
stage's optional dependencies never break another's command. Flags shared by several commands are
derived from the config dataclasses by :mod:`holst.cli_common`.

One error style: a mistake the user can fix (a :class:`holst.errors.HolstError`, an ``OSError``
such as a missing file, a bad flag, ``SystemExit("message")``) ends the command with one line
``holst <command>: error: <message>`` on stderr and exit status 2; only a bug prints a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from typing import Any, NoReturn

# (group, command) -> (module, one-line help). group None = top-level command.
COMMANDS: dict[tuple[str | None, str], tuple[str, str]] = {
    (None, "generate"): ("holst.generate_cli", "generate images from a caption"),
    (None, "serve"): ("holst.serve.cli", "HTTP API and web page"),
    (None, "finetune"): ("holst.train.finetune", "teach a model your pictures (folder -> new pipeline)"),
    ("train", "dalle"): ("holst.train.dalle", "train or fine-tune the transformer"),
    ("train", "vqgan"): ("holst.train.vqgan", "train the VQGAN image tokenizer"),
    ("train", "clip"): ("holst.train.clip", "train a CLIP model for ranking"),
    ("train", "superres"): ("holst.train.superres", "train / fine-tune Real-ESRGAN"),
    ("train", "tokenizer"): ("holst.text.train_cli", "train a BPE text tokenizer"),
    ("convert", "rudalle"): ("holst.convert.rudalle", "official ruDALL-E transformer -> holst"),
    ("convert", "vqgan"): ("holst.convert.vqgan", "Sber VQGAN checkpoint -> holst"),
    ("convert", "ruclip"): ("holst.convert.ruclip", "official ruCLIP -> holst"),
    ("convert", "realesrgan"): ("holst.convert.realesrgan", "Real-ESRGAN .pth or ncnn -> holst"),
    ("prepare", "filter"): ("holst.data.filter_cli", "filter image-caption pairs"),
    ("prepare", "codes"): ("holst.data.prepare", "encode a dataset into VQGAN code shards"),
    ("prepare", "pipeline"): ("holst.assemble_cli", "assemble a pipeline directory from trained components"),
    ("data", "emoji"): ("holst.data.emoji", "build the emoji dataset from npm packages"),
    ("data", "tuxpaint"): ("holst.data.tuxpaint", "build the Tux Paint dataset from Debian packages"),
    ("data", "shapes"): ("holst.data.shapes", "render the synthetic shapes dataset"),
    ("data", "merge"): ("holst.data.builtin", "merge built datasets into one folder (no copies)"),
    ("eval", "vqgan"): ("holst.eval_cli", "VQGAN reconstruction report"),
    ("eval", "dalle"): ("holst.eval_cli", "transformer held-out loss report"),
    ("eval", "pipeline"): ("holst.eval_cli", "whole-pipeline report"),
    ("eval", "shapes"): ("holst.eval_cli", "shapes attribute accuracy"),
    ("eval", "recognise"): ("holst.eval_cli", "do generated images show the caption's concept (kNN)"),
    (None, "bench"): ("holst.bench_cli", "run a benchmark script from bench/"),
}

GROUP_HELP = {
    "train": "train a stage",
    "convert": "convert official checkpoints",
    "prepare": "filter data / pre-compute code shards",
    "data": "build built-in datasets",
    "eval": "evaluation reports",
}


class HolstArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line on stderr (exit 2), like every other error."""

    def error(self, message: str) -> NoReturn:
        """Print ``<prog>: error: <message> (see --help)`` and exit 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _top_parser() -> argparse.ArgumentParser:
    lines = []
    for (group, name), (_, text) in COMMANDS.items():
        lines.append(f"  {(group + ' ' if group else '') + name:<20} {text}")
    return HolstArgumentParser(
        prog="holst",
        description="holst: ruDALL-E text-to-image.\n\ncommands:\n" + "\n".join(lines),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def _resolve(argv: list[str]) -> tuple[tuple[str | None, str] | None, list[str]]:
    """Find the command key in argv; returns (key, remaining args)."""
    if not argv:
        return None, argv
    first = argv[0]
    if (None, first) in COMMANDS:
        return (None, first), argv[1:]
    if first in GROUP_HELP and len(argv) > 1 and (first, argv[1]) in COMMANDS:
        return (first, argv[1]), argv[2:]
    return None, argv


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``holst`` console script."""
    from holst.utils.runtime import setup_cli_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    key, rest = _resolve(argv)
    if key is None:
        parser = _top_parser()
        if argv and argv[0] in GROUP_HELP:
            names = [n for (g, n) in COMMANDS if g == argv[0]]
            parser.error(f"'{argv[0]}' needs one of: {', '.join(names)}")
        if argv and argv[0] not in ("-h", "--help"):
            parser.error(f"unknown command {argv[0]!r}")
        parser.print_help()
        return 0 if argv else 2
    module, args = parse_command(key, rest)
    setup_cli_logging()
    return run_command(args.prog, module.main, args)


def parse_command(key: tuple[str | None, str], rest: list[str]) -> tuple[Any, argparse.Namespace]:
    """Import the command's module and parse its flags (a bad flag: one line and SystemExit(2)).

    Args:
        key: (group, name) of :data:`COMMANDS`, e.g. (None, 'generate') or ('eval', 'pipeline').
        rest: the arguments after the command's name.
    Returns:
        (module, args) with ``args.command`` (the name) and ``args.prog`` (e.g. 'holst eval pipeline') set.
    """
    module_name, text = COMMANDS[key]
    group, name = key
    module = importlib.import_module(module_name)
    prog = f"holst {(group + ' ') if group else ''}{name}"
    parser = HolstArgumentParser(prog=prog, description=text)
    if getattr(module, "add_arguments_for", None) is not None:
        module.add_arguments_for(name, parser)
    else:
        module.add_arguments(parser)
    args = parser.parse_args(rest)
    args.command, args.prog = name, prog
    return module, args


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types that are the user's to fix (one line, exit 2), not bugs (traceback)."""
    from holst.config import ConfigError
    from holst.errors import HolstError
    from holst.utils.persist import CheckpointError

    return (HolstError, ConfigError, CheckpointError, OSError)


def run_command(prog: str, fn: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Run a command's ``main(args)``; a user error becomes one stderr line and 2, Ctrl-C 130.

    Args:
        prog: e.g. 'holst generate', the start of the error line.
        fn: the command's ``main``.
        args: its parsed flags.
    Returns:
        The command's exit status.
    """
    try:
        return int(fn(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:
        if isinstance(e.code, str):  # SystemExit("message") ends a command with 1 and the message: make it ours
            message = one_line(e.code).removeprefix(f"{prog}: ").removeprefix("error: ")
            print(f"{prog}: error: {message}", file=sys.stderr)
            return 2
        raise
    except user_errors() as e:
        print(f"{prog}: error: {one_line(describe(e))}", file=sys.stderr)
        return 2


def describe(error: BaseException) -> str:
    """The message of a user error; an OSError names its file (``[Errno 2] ...: 'x'`` -> ``x: No such ...``)."""
    if isinstance(error, OSError) and error.strerror:
        where = f"{error.filename}: " if error.filename is not None else ""
        return f"{where}{error.strerror}"
    return str(error) or type(error).__name__


def one_line(message: str) -> str:
    """``message`` with its line breaks (e.g. torch's multi-line pickle refusals) folded into one line."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
