"""A user's mistake ends every command with one line on stderr and exit 2; no traceback (issue 19).

The cases run in one Python subprocess (``DRIVER`` calls ``holst.cli.main`` once per case, as the
console script would, and reports what reached stderr and whether an exception escaped), plus one
real ``python -m holst`` run whose caption is bytes that are not UTF-8, as a shell passes them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from holst.errors import ConfigError, InputError
from holst.pipeline import Text2ImagePipeline

DRIVER = r'''
import contextlib, io, json, logging, sys, traceback
from holst.cli import main

results = []
for argv in json.loads(sys.argv[1]):
    logging.root.handlers.clear()  # each case's log lines go to its own stderr buffer
    err = io.StringIO()
    escaped = None
    with contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as e:
            rc = e.code
        except BaseException:
            rc, escaped = None, traceback.format_exc()
    results.append({"argv": argv, "rc": rc, "stderr": err.getvalue(), "escaped": escaped})
print(json.dumps(results))
'''


def run_cases(cases: list[list[str]], cwd) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "HOLST_TOKEN"}  # `serve --host 0.0.0.0` must be refused
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(cases)], capture_output=True, text=True,
                          timeout=240, cwd=cwd, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_user_mistakes_are_one_line_and_exit_2(tmp_path):
    a_file = tmp_path / "taken"
    a_file.write_text("not a folder")
    pickle_payload = tmp_path / "evil.bin"
    torch.save({"x": PrintOnLoad()}, pickle_payload)  # a pickle that would call print() when unpickled
    device = "cuda" if not torch.cuda.is_available() else "cuda:99"  # a device this machine lacks
    gen = ["generate", "кот", "--model", "random:tiny", "--no-progress"]
    cases = {
        "caption not UTF-8": ["generate", "кот\udcff", "--model", "random:tiny", "--out", str(tmp_path / "u")],
        "--out is a file": [*gen, "--out", str(a_file)],
        "missing device": [*gen, "--out", str(tmp_path / "d"), "--device", device],
        "pickle payload": ["convert", "rudalle", str(pickle_payload), str(tmp_path / "converted")],
        "setting out of range": [*gen, "--out", str(tmp_path / "p"), "--top-p", "0"],
        "rerank above the model's num_images": [*gen, "--out", str(tmp_path / "r"), "--rerank", "5"],
        "flag of the wrong type": [*gen, "--out", str(tmp_path / "k"), "--top-k", "many"],
        "negative threads": [*gen, "--out", str(tmp_path / "t"), "--threads", "-1"],
        "unknown random preset": ["eval", "shapes", "--model", "random:huge", "--out", str(tmp_path / "e")],
        "missing model": ["generate", "кот", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "m")],
        "public host, no token": ["serve", "--host", "0.0.0.0", "--model", "random:tiny"],
        "unknown benchmark": ["bench", "no-such-benchmark"],
        "SystemExit(message) of a command": ["convert", "realesrgan", str(tmp_path / "sr")],
        "missing positional": ["convert", "realesrgan"],
    }
    results = run_cases(list(cases.values()), tmp_path)
    for (case, _), result in zip(cases.items(), results):
        lines = result["stderr"].strip().splitlines()
        assert result["escaped"] is None, f"{case}: traceback\n{result['escaped']}"
        assert result["rc"] == 2, f"{case}: exit {result['rc']}, stderr {result['stderr'][-1000:]}"
        assert len(lines) == 1 and "Traceback" not in result["stderr"], f"{case}: stderr {result['stderr'][-1000:]}"
        assert lines[0].startswith("holst ") and ": error: " in lines[0], f"{case}: {lines[0]}"
    said = {case: r["stderr"] for case, r in zip(cases, results)}
    assert "not Unicode" in said["caption not UTF-8"] and "0xFF" in said["caption not UTF-8"]
    assert "is a file" in said["--out is a file"] and a_file.read_text() == "not a folder"
    assert "not available" in said["missing device"]
    assert "loaded safely" in said["pickle payload"] and "GLOBAL" in said["pickle payload"]
    assert "top_p" in said["setting out of range"] and "rerank" in said["rerank above the model's num_images"]
    assert not any((tmp_path / d).exists() for d in ("u", "d", "p", "r", "k", "t", "m", "converted"))


class PrintOnLoad:
    """Unpickling this calls print(): what a weights_only loader must refuse."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_caption_bytes_that_are_not_utf8_from_a_real_shell(tmp_path):
    """The issue's repro: ``holst generate "$(printf 'кот\\xff')" --out o`` sampled, then died in save_png."""
    proc = subprocess.run([sys.executable, "-m", "holst", "generate", "кот".encode() + b"\xff", "--out", "o",
                           "--model", "random:tiny", "--no-progress"], capture_output=True, timeout=120, cwd=tmp_path)
    err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "not Unicode" in err[0], err
    assert not (tmp_path / "o").exists()  # refused before anything was sampled or written


def test_python_callers_get_the_same_errors():
    pipe = Text2ImagePipeline.from_random("tiny", seed=0)
    with pytest.raises(InputError, match="must be a str"):
        pipe(123)
    with pytest.raises(InputError, match="not Unicode"):
        pipe("кот\udcff", 1, seed=0)
    with pytest.raises(ConfigError, match="top_p"):
        pipe("кот", 1, top_p=0)
    assert issubclass(InputError, ValueError) and issubclass(ConfigError, ValueError)  # old `except ValueError` works
