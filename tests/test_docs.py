"""The examples of README.md and docs/*.md run, so that they cannot rot.

- Every ```python block is compiled. The blocks of one page then run top to bottom in one namespace,
  in a scratch directory where ``models/default`` is the shipped model and ``data/emoji``,
  ``data/default`` and ``my_pictures/`` are small made-up data sets. A block whose first line is
  ``# not run by the tests: needs ...`` (a GPU, or a download such as the official checkpoints) is
  only compiled; the reason must name one of those.
- A few numbers are made smaller here so that the whole file runs in seconds (:data:`SHRINK`); the
  text they replace must still be in the page, so an edited example cannot silently lose its test.
- Every ``holst ...`` line of a ```bash block: ``holst <command> --help`` runs, and each ``--flag``
  the line uses must be one that command's help lists.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NOT_RUN = "# not run by the tests: needs "
NOT_RUN_REASONS = ("GPU", "download", "network")

# page -> [(text in the page, what the test runs instead)]: only to make examples quick.
PIPE_CALL = "num_images=8, seed=0, top_k=256, top_p=0.99, rerank=4, upscale=4"
SHRINK: dict[str, list[tuple[str, str]]] = {
    "README.md": [(PIPE_CALL, PIPE_CALL.replace("num_images=8", "num_images=2").replace("rerank=4", "rerank=1"))],
    "docs/generate.md": [  # the README runs the same call with the upscaler
        (PIPE_CALL, PIPE_CALL.replace("num_images=8", "num_images=2").replace("rerank=4", "rerank=1")[:-1] + "1"),
        ("sample_image_codes(model, ids, progress=", "sample_image_codes(model, ids[:1], progress=")],
    "docs/finetune.md": [('steps=160)', 'steps=2, prior_images=0, variants=1, sample_every=0, batch_size=2)')],
    "docs/eval.md": [("EvalConfig(num_captions=16, num_images=4)",
                      "EvalConfig(num_captions=2, num_images=1, fd=False)")],
}

FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", re.S | re.M)


def _blocks(page: Path, lang: str) -> list[str]:
    return [body for kind, body in FENCE.findall(page.read_text(encoding="utf-8")) if kind == lang]


def _name(page: Path) -> str:
    return page.relative_to(ROOT).as_posix()


# ----------------------------------------------------------------------------------------- python
def _write_dataset(root: Path, n: int = 8) -> None:
    """A folder in the layout ``holst data`` builds: images/ + captions.jsonl with a split column."""
    (root / "images").mkdir(parents=True)
    colours = {"красный": (220, 30, 30), "зелёный": (30, 200, 60), "синий": (30, 60, 220), "жёлтый": (240, 220, 30)}
    rows = []
    for i in range(n):
        name, rgb = list(colours.items())[i % len(colours)]
        im = Image.new("RGB", (64, 64), "white")
        im.paste(rgb, (8 + i, 8, 48, 56))
        im.save(root / "images" / f"{i}.png")
        split = "train" if i < n // 2 else ("test_concept" if i % 2 else "test_style")
        rows.append({"file": f"images/{i}.png", "ru": f"{name} квадрат", "en": "a square", "split": split,
                     "concept": name, "style": "flat"})
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                                         encoding="utf-8")


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A working directory with the shipped model and small data sets under the names the pages use."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "default").symlink_to(ROOT / "models" / "default", target_is_directory=True)
    _write_dataset(tmp_path / "data" / "emoji")
    _write_dataset(tmp_path / "data" / "default")
    (tmp_path / "shards").mkdir()
    for i in range(100):  # the img2dataset layout the data page names: shards/00000.tar ... 00099.tar
        tarfile.open(tmp_path / "shards" / f"{i:05d}.tar", "w").close()
    pics = tmp_path / "my_pictures"
    pics.mkdir()
    for i in range(3):
        im = Image.new("RGB", (64, 64), "white")
        im.paste((30, 160, 60), (10 + 4 * i, 10, 50, 50))
        im.save(pics / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_python_examples_run(page, scratch):
    name = _name(page)
    blocks = _blocks(page, "python")
    if not blocks:
        return  # a page of prose and command lines (not a skip: under setup.sh --dev skips fail)
    for find, _ in SHRINK.get(name, []):
        assert find in page.read_text(encoding="utf-8"), f"{name}: the shrunk example text {find!r} is gone"
    if not (ROOT / "models" / "default" / "pipeline.json").is_file():
        pytest.fail("models/default/pipeline.json is missing: the examples run against the shipped model")
    namespace: dict = {"__name__": "__docs__"}
    for i, code in enumerate(blocks):
        where = f"{name}, python block {i + 1}"
        compile(code, where, "exec")  # every block at least compiles
        if code.startswith(NOT_RUN):
            reason = code.splitlines()[0][len(NOT_RUN):]
            assert any(r in reason for r in NOT_RUN_REASONS), (
                f"{where}: not-run reason {reason!r} names no GPU/download")
            continue
        for find, repl in SHRINK.get(name, []):
            code = code.replace(find, repl)
        torch.manual_seed(0)
        with contextlib.redirect_stdout(io.StringIO()):
            exec(compile(code, where, "exec"), namespace)


# ----------------------------------------------------------------------------------------- command line
def _holst_commands(page: Path) -> list[list[str]]:
    """The argument lists after ``holst`` of every holst command line in the page's bash blocks."""
    out = []
    for body in _blocks(page, "bash"):
        for line in body.replace("\\\n", " ").splitlines():
            try:
                words = shlex.split(line, comments=True)
            except ValueError as e:  # unbalanced quotes: a broken example
                raise AssertionError(f"{_name(page)}: cannot split {line!r}: {e}") from e
            for sep in ("&&", "||", ";", "|"):
                words = [w for w in words if w != sep]
            for j, w in enumerate(words):
                prev = words[j - 1] if j else ""
                if w == "holst" and prev == "-m" or w in ("holst", ".venv/bin/holst") and prev != "-m":
                    out.append(words[j + 1:])
                    break
    return out


def _help(args: list[str]) -> tuple[list[str], str]:
    from holst.cli import COMMANDS, GROUP_HELP, main

    if args and args[0] in GROUP_HELP:
        cmd = args[:2]
    else:
        cmd = args[:1]
    key = (cmd[0], cmd[1]) if len(cmd) == 2 else (None, cmd[0]) if cmd else None
    assert key in COMMANDS, f"holst {' '.join(cmd)}: no such command"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as e:
        main([*cmd, "--help"])
    assert e.value.code == 0, f"holst {' '.join(cmd)} --help exited {e.value.code}"
    return cmd, buf.getvalue()


def _flags(words: list[str]) -> list[str]:
    flags = []
    for w in words:
        for part in w.strip("[]").split("|"):
            if re.fullmatch(r"--?[A-Za-z][\w-]*(=.*)?", part):
                flags.append(part.split("=", 1)[0])
    return flags


def _concrete(words: list[str]) -> list[str] | None:
    """The words without optional ``[--flag ...]`` groups; None when the line has placeholders (``...``, ``a|b``)."""
    out, in_group = [], False
    for w in words:
        if in_group or w.startswith("[-"):
            in_group = not w.endswith("]")
            continue
        if w in ("...", "…") or w.endswith("…") or "|" in w:
            return None
        out.append(w)
    return out


@pytest.mark.parametrize("page", PAGES, ids=_name)
def test_cli_examples_match_help(page, monkeypatch):
    from holst.cli import parse_command

    commands = _holst_commands(page)
    monkeypatch.setenv("COLUMNS", "200")
    for args in commands:
        cmd, text = _help(args)
        if cmd == ["bench"]:
            continue  # holst bench passes everything after the script's name to the script
        shown = f"{_name(page)}: `holst {' '.join(args)}`"
        for flag in _flags(args[len(cmd):]):
            assert re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text), (
                f"{shown} uses {flag}, which `holst {' '.join(cmd)} --help` does not list")
        words = _concrete(args)
        if words is None:
            continue
        # The whole line parses (required options and positionals included); the command itself does not run.
        key = (cmd[0], cmd[1]) if len(cmd) == 2 else (None, cmd[0])
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                parse_command(key, words[len(cmd):])
        except SystemExit as e:
            raise AssertionError(f"{shown} does not parse: {err.getvalue().strip()}") from e


def test_every_page_has_tested_examples_and_few_are_not_run():
    """The pages hold examples, and only a handful are marked not-run."""
    not_run = [b for p in PAGES for b in _blocks(p, "python") if b.startswith(NOT_RUN)]
    runnable = [b for p in PAGES for b in _blocks(p, "python") if not b.startswith(NOT_RUN)]
    assert len(runnable) >= 10 and len(not_run) <= 5, (len(runnable), len(not_run))
    assert sum(len(_holst_commands(p)) for p in PAGES) >= 40
    assert os.path.getsize(ROOT / "README.md") < 12_000, "the README stays short: references go to docs/"
