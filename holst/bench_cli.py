"""``holst bench``: list the benchmark scripts in ``bench/`` or run one by name.

The scripts live in the source checkout (``bench/`` beside the ``holst`` package), print one JSON object
and compare holst with a reference-style baseline in the same run. ``holst bench`` lists them with the
first line of each docstring (read with :mod:`ast`, nothing is imported); ``holst bench NAME ARGS...`` runs
``python bench/NAME.py ARGS...`` with this interpreter and returns its exit status.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "bench"


def list_benchmarks(folder: Path = DEFAULT_DIR) -> dict[str, str]:
    """Benchmark scripts of ``folder`` by name, each with the first line of its docstring.

    Args:
        folder: the benchmark folder (default: ``bench/`` of the source checkout).

    Returns:
        ``{name: summary}`` sorted by name; helper modules without a ``main`` (e.g. ``timing``) are left out.
    """
    found = {}
    for path in sorted(folder.glob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        if not any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            continue
        doc = ast.get_docstring(tree) or ""
        found[path.stem] = doc.strip().splitlines()[0] if doc.strip() else ""
    return found


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``holst bench``."""
    parser.add_argument("name", nargs="?", help="benchmark to run (omit to list them)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the script (e.g. --help)")
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="benchmark folder (default %(default)s)")
    if DEFAULT_DIR.is_dir():
        names = list_benchmarks(DEFAULT_DIR)
        parser.epilog = "benchmarks: " + ", ".join(names)


def main(args: argparse.Namespace) -> int:
    """List the benchmarks, or run one and return its exit status (InputError, exit 2, for an unknown name)."""
    from holst.errors import InputError

    folder = Path(args.dir)
    if not folder.is_dir():
        raise InputError(f"no benchmark folder {folder} (the scripts ship with the source checkout)")
    names = list_benchmarks(folder)
    if args.name is None:
        width = max(map(len, names), default=0)
        for name, summary in names.items():
            print(f"{name:<{width}}  {summary}")
        return 0
    if args.name not in names:
        raise InputError(f"unknown benchmark {args.name!r}; choose from {', '.join(names)}")
    return subprocess.run([sys.executable, str(folder / f"{args.name}.py"), *args.args], check=False).returncode
