"""``holst generate``: files written, byte-identical reproduction from the recorded seed, errors, fallback;
every listed command's ``--help``, every shipped config, ``holst bench``."""

from __future__ import annotations

import json
import shlex

import pytest
import torch
from PIL import Image

from holst import cli_common
from holst.cli import main
from holst.pipeline import Text2ImagePipeline


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model") / "tiny"
    Text2ImagePipeline.from_random("tiny", seed=2).save_pretrained(d)
    return d


def test_generate_writes_pngs_grid_and_json(model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["generate", "красный круг", "--model", str(model_dir), "--out", str(out), "-n", "3", "--seed", "40",
               "--no-progress", "--device", "cpu"])
    assert rc == 0
    report = json.loads((out / "generate.json").read_text(encoding="utf-8"))
    assert report["prompt"] == "красный круг" and report["seed"] == 40 and report["device"] == "cpu"
    assert report["settings"]["num_images"] == 3 and report["settings"]["top_k"] > 0
    assert sorted(r["seed"] for r in report["images"]) == [40, 41, 42]
    scores = [r["clip_score"] for r in report["images"]]
    assert scores == sorted(scores, reverse=True)
    for r in report["images"]:
        image = Image.open(out / r["file"])
        assert image.format == "PNG" and image.size == (32, 32)
        assert image.text["prompt"] == "красный круг" and image.text["seed"] == str(r["seed"])
    grid = Image.open(out / "grid.png")
    assert grid.width > 32 and grid.height >= 32
    assert "3 image(s)" in capsys.readouterr().out


def test_same_seed_same_bytes_and_remake_command(model_dir, tmp_path):
    args = ["generate", "синий квадрат", "--model", str(model_dir), "-n", "2", "--seed", "7", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--batch-size", "1"]) == 0
    report = json.loads((tmp_path / "a" / "generate.json").read_text(encoding="utf-8"))
    for r in report["images"]:
        assert (tmp_path / "a" / r["file"]).read_bytes() == (tmp_path / "b" / r["file"]).read_bytes()
    # The recorded remake command of the second-best image makes exactly its bytes again.
    second = report["images"][1]
    argv = shlex.split(second["remake"])[1:]
    argv[argv.index("--out") + 1] = str(tmp_path / "remade")
    assert main([*argv, "--no-progress"]) == 0
    remade = json.loads((tmp_path / "remade" / "generate.json").read_text(encoding="utf-8"))["images"][0]
    assert remade["seed"] == second["seed"]
    assert (tmp_path / "remade" / remade["file"]).read_bytes() == (tmp_path / "a" / second["file"]).read_bytes()


def test_generate_errors(model_dir, tmp_path, capsys):
    assert main(["generate", "   ", "--model", str(model_dir), "--out", str(tmp_path / "e"), "--no-progress"]) == 2
    assert "prompt is empty" in capsys.readouterr().err
    assert main(["generate", "кот", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "e")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "кот", "--model", str(model_dir), "--out", str(tmp_path / "e"), "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_fallback_to_tiny_random_pipeline_only_when_default_is_missing(tmp_path, monkeypatch, capsys, model_dir):
    monkeypatch.setattr(cli_common, "default_model_dir", lambda: tmp_path / "models" / "default")
    assert main(["generate", "кот", "--out", str(tmp_path / "f"), "-n", "1", "--no-progress"]) == 0
    assert "UNTRAINED tiny random" in capsys.readouterr().err
    report = json.loads((tmp_path / "f" / "generate.json").read_text(encoding="utf-8"))
    assert report["model"].startswith("random:")
    # When the default exists it is used, with no warning.
    monkeypatch.setattr(cli_common, "default_model_dir", lambda: model_dir)
    assert main(["generate", "кот", "--out", str(tmp_path / "g"), "-n", "1", "--no-progress"]) == 0
    assert "UNTRAINED" not in capsys.readouterr().err
    assert json.loads((tmp_path / "g" / "generate.json").read_text(encoding="utf-8"))["model"] == str(model_dir)


def test_prepare_pipeline_assembles_component_dirs(tmp_path):
    src = Text2ImagePipeline.from_random("tiny", seed=5)
    src.tokenizer.save_pretrained(tmp_path / "tok")
    src.vqgan.save_pretrained(tmp_path / "vq" / "final")
    src.dalle.save_pretrained(tmp_path / "dalle" / "final")
    src.clip.save_pretrained(tmp_path / "clip" / "final")
    src.tokenizer.save_pretrained(tmp_path / "clip" / "final" / "tokenizer")
    out = tmp_path / "models" / "default"
    rc = main(["prepare", "pipeline", "--out", str(out), "--tokenizer", str(tmp_path / "tok"),
               "--vqgan", str(tmp_path / "vq" / "final"), "--dalle", str(tmp_path / "dalle" / "final"),
               "--clip", str(tmp_path / "clip" / "final"), "--top-k", "32", "--name", "test model"])
    assert rc == 0
    meta = json.loads((out / "pipeline.json").read_text(encoding="utf-8"))
    assert meta["components"] == ["tokenizer", "vqgan", "dalle", "clip"] and meta["top_k"] == 32
    assert "test model" in (out / "README.md").read_text(encoding="utf-8")
    loaded = Text2ImagePipeline.from_pretrained(out)
    assert torch.equal(loaded("кот", 2, seed=1).codes, src("кот", 2, seed=1, top_k=32).codes)
    # A transformer trained on another VQGAN's codebook is refused with the sizes named.
    other = Text2ImagePipeline.from_random("emoji", seed=0, clip=False, superres=False)
    other.vqgan.save_pretrained(tmp_path / "vq2")
    assert main(["prepare", "pipeline", "--out", str(tmp_path / "bad"), "--tokenizer", str(tmp_path / "tok"),
                 "--vqgan", str(tmp_path / "vq2"), "--dalle", str(tmp_path / "dalle" / "final")]) == 2
    assert not (tmp_path / "bad" / "pipeline.json").exists()


def test_cuda_graph_needs_cuda(model_dir, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this checks the refusal where CUDA is missing")
    assert main(["generate", "кот", "--model", str(model_dir), "--out", str(tmp_path / "c"), "--cuda-graph",
                 "--device", "cpu"]) == 2
    assert "CUDA" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# every command's --help, every shipped config, holst bench
# ---------------------------------------------------------------------------------------------


def _listed_commands(capsys) -> list[list[str]]:
    """The commands ``holst --help`` prints, as argv prefixes (['generate'], ['train', 'dalle'], ...)."""
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    block = text.split("commands:\n", 1)[1]
    listed = []
    for line in block.splitlines():
        if not line.startswith("  ") or not line.strip():
            break
        words = line.split()
        listed.append(words[:2] if words[0] in {"train", "convert", "prepare", "data", "eval"} else words[:1])
    return listed


def test_every_listed_command_has_working_help(capsys):
    """``holst <command> --help`` for every command ``holst --help`` lists: the module imports and its parser builds."""
    listed = _listed_commands(capsys)
    assert ["generate"] in listed and ["train", "dalle"] in listed and ["bench"] in listed and len(listed) >= 20
    for argv in listed:
        with pytest.raises(SystemExit) as e:
            main([*argv, "--help"])
        out = capsys.readouterr().out
        assert e.value.code == 0 and out.startswith(f"usage: holst {' '.join(argv)}"), (argv, out[:200])


TRAIN_CONFIG_CLASS = {"dalle": "DalleTrainConfig", "vqgan": "VQGANTrainConfig", "clip": "ClipTrainConfig",
                      "superres": "SuperResTrainConfig"}


def _yaml_files():
    from pathlib import Path

    return sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: p.name)
def test_every_shipped_config_loads_into_its_config_class(path):
    """configs/train/<stage>_*.yaml through the loader of ``holst train <stage> --config`` (nothing dropped)."""
    import importlib

    import yaml

    from holst.cli import COMMANDS
    from holst.train.args import load_train_config

    stage = path.stem.split("_", 1)[0]
    assert stage in TRAIN_CONFIG_CLASS, f"{path.name}: name it <stage>_<what>.yaml ({list(TRAIN_CONFIG_CLASS)})"
    cls = getattr(importlib.import_module(COMMANDS[("train", stage)][0]), TRAIN_CONFIG_CLASS[stage])
    cfg = load_train_config(cls, path)
    assert isinstance(cfg, cls)
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    loaded = cfg.to_dict()
    names = {cls.deprecated_names.get(k, k) for k in raw}  # an old option name counts as its new name
    assert names <= set(loaded), f"{path.name}: keys the class does not know: {names - set(loaded)}"
    assert type(cfg).from_dict(loaded) == cfg  # round trip


def test_bench_lists_and_runs_scripts(tmp_path, capsys):
    from holst.bench_cli import DEFAULT_DIR, list_benchmarks

    names = list_benchmarks(DEFAULT_DIR)
    assert {"generate", "train", "tokenizer"} <= set(names) and "timing" not in names
    assert main(["bench"]) == 0
    listing = capsys.readouterr().out
    assert all(line.split()[0] in names for line in listing.splitlines()) and len(listing.splitlines()) == len(names)
    assert len({line.index(names[line.split()[0]]) for line in listing.splitlines()}) == 1  # one column of summaries
    (tmp_path / "echo.py").write_text('"""Echo."""\nimport sys\n\n\ndef main():\n    sys.exit(int(sys.argv[1]))\n\n\n'
                                      'if __name__ == "__main__":\n    main()\n')
    (tmp_path / "helper.py").write_text("X = 1\n")
    assert main(["bench", "--dir", str(tmp_path)]) == 0 and capsys.readouterr().out.split() == ["echo", "Echo."]
    assert main(["bench", "--dir", str(tmp_path), "echo", "7"]) == 7  # the script ran with its arguments
    assert main(["bench", "--dir", str(tmp_path), "helper"]) == 2
    assert "unknown benchmark" in capsys.readouterr().err
