"""Every trainer on one skeleton: the same dirty folder, seeds, schedules, resume, stopping and errors.

One dirty image folder (truncated, zero-byte, decompression bomb, text named .png, CMYK, 16-bit,
1x1, 5000x20, an empty and a 10,000-character caption) feeds tiny runs of all four stages
(dalle encodes it on the fly with a tiny VQGAN). Subprocess runs use the ``holst`` CLI with one
thread, so their losses are bit-identical to the in-process runs made under ``one_thread``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from holst.cli import main as cli_main
from holst.config import ClipTrainConfig, ConfigError, DalleTrainConfig, SuperResTrainConfig, VQGANTrainConfig
from holst.train.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("dalle", "vqgan", "clip", "superres")
EXPECTED_SKIPS = {"empty": 1, "not_image": 1, "too_large": 1, "truncated": 1}
GOOD = 10  # images the trainers must keep


def _png(image: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def make_dirty_folder(root: Path) -> Path:
    """14 images (10 readable, 4 broken), each with a caption file."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    captions = {}
    for i in range(6):
        arr = np.full((40, 48, 3), 255, np.uint8)
        arr[8 + i: 30, 10: 30 + i] = rng.integers(0, 255, 3)
        Image.fromarray(arr).save(root / f"good{i}.png")
        captions[f"good{i}"] = f"фигура номер {i % 3}"
    captions["good4"] = "очень длинная подпись " * 455  # ~10,000 characters
    captions["good5"] = ""                               # an empty caption file: a caption, kept as ''
    Image.new("CMYK", (36, 36), (0, 128, 255, 0)).save(root / "cmyk.jpg")
    Image.fromarray(np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 60).save(root / "gray16.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "one.png")
    Image.new("RGB", (5000, 20), (10, 200, 10)).save(root / "wide.png")
    (root / "truncated.png").write_bytes(_png(Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)))[:900])
    (root / "zero.png").write_bytes(b"")
    Image.new("1", (10_000, 10_000)).save(root / "bomb.png")  # 10^8 pixels in a few kB
    (root / "text.png").write_text("this is not an image\n", encoding="utf-8")
    for name in ("cmyk", "gray16", "one", "wide", "truncated", "zero", "bomb", "text"):
        captions[name] = f"картинка {name}"
    for name, text in captions.items():
        (root / f"{name}.txt").write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    """The dirty folder, a BPE tokenizer, a tiny VQGAN (32 px -> 4x4 codes of 64) and a code shard."""
    from holst.data.codes import write_code_shard
    from holst.text import BPETokenizer
    from holst.vqgan import VQGAN, get_vqgan_preset

    base = tmp_path_factory.mktemp("stages")
    dirty = make_dirty_folder(base / "dirty")
    captions = [f"фигура номер {i}" for i in range(3)] + ["картинка", "очень длинная подпись"]
    BPETokenizer.train(captions * 8, vocab_size=60, lowercase=True).save_pretrained(base / "tok")
    torch.manual_seed(0)
    VQGAN(get_vqgan_preset("tiny")).save_pretrained(base / "vqgan")
    codes = torch.stack([(torch.arange(16) * (1 + i % 2)) % 64 for i in range(8)]).reshape(8, 4, 4)
    write_code_shard(base / "codes" / "shard-000.safetensors", codes, {"ru": [captions[i % 3] for i in range(8)]})
    return {"dirty": dirty, "tok": base / "tok", "vqgan": base / "vqgan", "codes": base / "codes", "base": base}


def stage_options(stage: str, assets: dict[str, Path], out_dir: Path) -> dict:
    """Tiny options of one stage on the dirty folder: 4 steps of 2 micro-batches, checkpoints every 2."""
    common = dict(out_dir=str(out_dir), batch_size=4, grad_accum=2, max_steps=4, warmup_steps=1, lr=2e-3,
                  min_lr_ratio=0.1, log_every=1, save_every=2, tensorboard=False, seed=5, precision="fp32",
                  device="cpu")
    data = str(assets["dirty"])
    return {**common, **{
        "dalle": dict(model="tiny", images=data, vqgan=str(assets["vqgan"]), tokenizer=str(assets["tok"]),
                      langs=["ru"], bpe_dropout=0.1, empty_caption_prob=0.2,
                      model_overrides={"embedding_dropout_prob": 0.1, "output_dropout_prob": 0.1}),
        "vqgan": dict(model="tiny", data=data, image_size=32, num_val=0, eval_every=0),
        "clip": dict(model="tiny", data=data, eval_splits=[], caption_lang="ru", tokenizer_vocab_size=64,
                     eval_every=0, eval_max_images=16),
        "superres": dict(data=data, scale=2, num_feat=8, num_block=0, num_grow_ch=4, hr_size=16,
                         degradation="classic"),
    }[stage]}


CONFIGS = {"dalle": DalleTrainConfig, "vqgan": VQGANTrainConfig, "clip": ClipTrainConfig,
           "superres": SuperResTrainConfig}


def train(stage: str, cfg, **kw):
    module = __import__(f"holst.train.{stage}", fromlist=["x"])
    return getattr(module, f"train_{stage}")(cfg, **kw)


def losses(out_dir: Path) -> dict[int, float]:
    """step -> the last loss logged for it (a resumed run re-logs the steps after its checkpoint)."""
    out = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "event" not in r:
            out[r["step"]] = r.get("loss", r.get("l1"))
    return out


def run_inprocess(stage: str, assets, out_dir: Path, **overrides):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(stage, CONFIGS[stage].from_dict({**stage_options(stage, assets, out_dir), **overrides}))
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("stage", STAGES)
def test_dirty_folder_same_skips_same_losses_schedule_ends(stage, assets, tmp_path):
    """Each trainer finishes on the dirty folder with the same skip counts, trains on the 10 good images,
    gives identical losses for the same seed, and ends its cosine schedule at max_steps with grad_accum=2."""
    a = run_inprocess(stage, assets, tmp_path / "a")
    run_inprocess(stage, assets, tmp_path / "b")
    assert not a.interrupted and a.step == 4 and a.final_dir == tmp_path / "a" / "final"
    assert a.data["skipped"] == EXPECTED_SKIPS and a.data["kept"] == GOOD and a.data["read"] == GOOD + 4
    assert {"cmyk", "16bit"} <= set(a.data["converted"])
    records = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "data" and records[-1]["data_skipped"] == EXPECTED_SKIPS
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(la) == [1, 2, 3, 4] and la == lb, (la, lb)
    ck = read_checkpoint(a.checkpoint, stage=stage)
    assert ck["__engine__"]["applied_steps"] == 4 and ck["scheduler"]["last_epoch"] == 4
    last_lr = [r for r in records if r.get("step") == 4 and "lr" in r][-1]["lr"]
    assert last_lr == pytest.approx(2e-3 * 0.1)  # the cosine's end: min_lr_ratio * lr
    assert a.model is not None and not a.model.training


KILLER = textwrap.dedent('''
    import os, signal, sys
    import torch
    from holst.train.engine import Engine
    kill_at = int(os.environ.get("KILL_AT_STEP_CALL", "-1"))
    calls = [0]
    original = Engine.step

    def step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)   # a hard crash: no handler, no save
        return original(self, *args, **kwargs)

    Engine.step = step
    torch.set_num_threads(1)
    from holst.cli import main
    sys.exit(main(sys.argv[1:]))
''')


def run_cli(tmp_path: Path, args: list[str], kill_at: int = -1) -> subprocess.CompletedProcess:
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "KILL_AT_STEP_CALL": str(kill_at)}
    return subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=180)


@pytest.mark.slow
@pytest.mark.parametrize("stage", STAGES)
def test_resume_after_sigkill_equals_uninterrupted(stage, assets, tmp_path):
    """SIGKILL in step 4 (last checkpoint: step 2) then --resume: the same losses and weights as one run."""
    ref = run_inprocess(stage, assets, tmp_path / "ref")
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(stage_options(stage, assets, tmp_path / "run"), allow_unicode=True))
    killed = run_cli(tmp_path, ["train", stage, "--config", str(config)], kill_at=7)  # 2 engine steps per step
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "run" / "final").exists()
    assert read_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 2
    resumed = run_cli(tmp_path, ["train", stage, "--config", str(config), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "done: 4 steps" in resumed.stdout
    assert losses(tmp_path / "run") == losses(tmp_path / "ref")
    state = read_checkpoint(tmp_path / "run" / "checkpoint.pt")["model"]
    assert all(torch.equal(v, state[k]) for k, v in ref.model.state_dict().items())


@pytest.mark.parametrize("stage", STAGES)
def test_sigterm_saves_stops_without_final_and_resumes(stage, assets, tmp_path):
    """SIGTERM: a checkpoint at the current step, no final/, interrupted=True; --resume finishes the run."""
    from holst.train.engine import Engine

    original, calls = Engine.step, [0]

    def step(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *args, **kwargs)

    Engine.step = step
    try:
        first = run_inprocess(stage, assets, tmp_path / "t")
    finally:
        Engine.step = original
    assert first.interrupted and first.step == 2 and first.final_dir is None and first.model is None
    assert not (tmp_path / "t" / "final").exists() and read_checkpoint(first.checkpoint)["step"] == 2
    cfg = CONFIGS[stage].from_dict(stage_options(stage, assets, tmp_path / "t"))
    done = train(stage, cfg, resume=True)
    assert done.step == 4 and done.final_dir is not None and done.final_dir.is_dir()


def _error_line(capsys, argv: list[str]) -> str:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def test_resume_refuses_missing_foreign_corrupt_and_pickled_checkpoints(assets, tmp_path, capsys):
    opts = stage_options("superres", assets, tmp_path / "sr")
    config = tmp_path / "sr.yaml"
    config.write_text(yaml.safe_dump({**opts, "max_steps": 2, "grad_accum": 1}))
    argv = ["train", "superres", "--config", str(config)]
    line = _error_line(capsys, argv + ["--resume"])
    assert line.startswith("holst train superres: error:") and "no checkpoint" in line
    assert cli_main(argv + ["--resume", "if-present"]) == 0 and (tmp_path / "sr" / "final").is_dir()  # fresh
    ckpt = tmp_path / "sr" / "checkpoint.pt"
    good = ckpt.read_bytes()
    # another architecture: the weights do not fit
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({**opts, "max_steps": 3, "grad_accum": 1, "num_feat": 12}))
    assert "does not fit" in _error_line(capsys, ["train", "superres", "--config", str(other), "--resume", str(ckpt)])
    # another stage's checkpoint
    vq = stage_options("vqgan", assets, tmp_path / "vq")
    vq_config = tmp_path / "vq.yaml"
    vq_config.write_text(yaml.safe_dump({**vq, "max_steps": 1, "grad_accum": 1}))
    assert cli_main(["train", "vqgan", "--config", str(vq_config)]) == 0
    assert "holst train vqgan" in _error_line(capsys, argv + ["--resume", str(tmp_path / "vq")])
    # truncated, random bytes, a pickled object (weights_only refuses it: nothing runs)
    ckpt.write_bytes(good[: len(good) // 2])
    assert "cannot be read safely" in _error_line(capsys, argv + ["--resume"])
    ckpt.write_bytes(os.urandom(4096))
    assert "cannot be read safely" in _error_line(capsys, argv + ["--resume"])
    torch.save({"__format__": "holst-train-checkpoint-v1", "x": _Evil()}, ckpt)
    assert "cannot be read safely" in _error_line(capsys, argv + ["--resume"])
    assert not (tmp_path / "pwned").exists()
    torch.save({"model": {}}, ckpt)
    assert "not a holst training checkpoint" in _error_line(capsys, argv + ["--resume"])


class _Evil:
    def __reduce__(self):
        return (os.system, (f"touch {Path(__file__).parent / 'pwned'}",))


@pytest.mark.parametrize(("stage", "option", "value"), [
    ("vqgan", "ema_decay", 0.9), ("vqgan", "sample_every", 5), ("vqgan", "gradient_checkpointing", True),
    ("clip", "ema_decay", 0.9), ("clip", "sample_every", 5),
    ("superres", "ema_decay", 0.9), ("superres", "sample_every", 5), ("superres", "gradient_checkpointing", True)])
def test_unimplemented_options_are_refused(stage, option, value, assets, tmp_path):
    cfg = CONFIGS[stage].from_dict({**stage_options(stage, assets, tmp_path / "x"), option: value})
    with pytest.raises(ConfigError, match=option):
        train(stage, cfg)
    assert not (tmp_path / "x" / "checkpoint.pt").exists()


# ------------------------------------------------------------------------------------ configs/train/*.yaml

TINY = {
    "dalle": lambda a: dict(init_from="", model="tiny", model_overrides={}, tokenizer=str(a["tok"]),
                            codes=[str(a["codes"])], images="", vqgan="", langs=[], backend="single",
                            sample_every=0),
    "vqgan": lambda a: dict(model="tiny", model_overrides={}, init_from="", data=str(a["dirty"]), image_size=32,
                            num_val=4, eval_every=2, disc_start=1, disc_ndf=8, disc_layers=1, num_workers=1),
    "clip": lambda a: dict(model="tiny", model_overrides={}, init_from="", data=str(a["dirty"]), eval_splits=[],
                           tokenizer=None, tokenizer_vocab_size=64, eval_every=0),
    "superres": lambda a: dict(init_from="", data=str(a["dirty"]), num_feat=8, num_block=0, num_grow_ch=4, hr_size=16,
                               image_size=0, scale=2, vqgan="", degradation="classic"),
}


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "train").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_train_yaml_loads_and_runs_two_steps(path, assets, tmp_path):
    """Each shipped YAML, with only paths and sizes made tiny, runs 2 steps: its other options all work."""
    from holst.train.args import load_train_config

    stage = path.stem.split("_")[0]
    cfg = load_train_config(CONFIGS[stage], path)
    tiny = {**TINY[stage](assets), "out_dir": str(tmp_path / "run"), "max_steps": 2, "batch_size": 2,
            "save_every": 1, "log_every": 1, "tensorboard": False, "num_threads": 0}
    result = train(stage, cfg.replace(**tiny))
    assert result.step == 2 and (tmp_path / "run" / "final").is_dir()
    assert result.data["skipped"] == EXPECTED_SKIPS or stage == "dalle"
