"""``holst train dalle`` features the README promises, through the public command line only
(``holst train dalle --config x.yaml --set ...``; config keys, ``<out_dir>/final``, ``lora/``, ``metrics.jsonl``):
LoRA (adapters alone in lora/, final/ = base + merged adapters), ``init_from``, dynamic loss-scale growth after
``loss_scale_window`` clean steps, and an FSDP run (2 processes, gloo) that checkpoints and resumes exactly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import holst.data.codes as codes_mod
import holst.text as text_mod
from holst.cli import main
from holst.dalle import DalleModel
from holst.presets import get_preset

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = [f"красный круг {i % 4}" if i % 2 else f"синий квадрат {i % 4}" for i in range(16)]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A BPE tokenizer, one code shard of 16 learnable samples and a random 'tiny' base model."""
    d = tmp_path_factory.mktemp("train_features")
    text_mod.BPETokenizer.train(CAPTIONS * 4, vocab_size=46, lowercase=True).save_pretrained(d / "tok")
    codes = torch.stack([(torch.arange(16) * (1 + i % 2) + i % 4) % 64 for i in range(16)]).reshape(16, 4, 4)
    codes_mod.write_code_shard(d / "codes" / "shard-000.safetensors", codes, {"ru": CAPTIONS})
    torch.manual_seed(11)
    DalleModel(get_preset("tiny")).save_pretrained(d / "base")
    return {"tok": d / "tok", "codes": d / "codes", "base": d / "base"}


def write_config(path: Path, data: dict[str, Path], **opts) -> Path:
    cfg = {"model": "tiny", "tokenizer": str(data["tok"]), "codes": [str(data["codes"])], "batch_size": 4,
           "max_steps": 4, "log_every": 1, "save_every": 0, "tensorboard": False, "warmup_steps": 0,
           "precision": "fp32", "seed": 5, "bpe_dropout": 0.0, "empty_caption_prob": 0.0, "num_threads": 1, **opts}
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path


def train(tmp_path: Path, data: dict[str, Path], name: str, *extra: str, **opts) -> Path:
    out = tmp_path / name
    config = write_config(tmp_path / f"{name}.yaml", data, out_dir=str(out), **opts)
    assert main(["train", "dalle", "--config", str(config), *extra]) == 0
    return out


def metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "event" not in r and "step" in r}


def state(directory: Path) -> dict[str, torch.Tensor]:
    return DalleModel.from_pretrained(directory).state_dict()


def test_lora_saves_only_adapters_and_final_is_base_plus_merged_adapters(tmp_path, data):
    rank, alpha = 4, 8.0
    out = train(tmp_path, data, "lora", init_from=str(data["base"]), lora_rank=rank, lora_alpha=alpha, lr=2e-2)
    adapters = load_file(out / "lora" / "lora.safetensors")
    assert json.loads((out / "lora" / "lora.json").read_text())["rank"] == rank
    assert adapters and all(k.endswith((".lora_A", ".lora_B")) for k in adapters)
    layers = get_preset("tiny").num_layers
    targets = {k.rsplit(".", 1)[0] for k in adapters}
    assert len(targets) == 4 * layers  # qkv, dense, h_to_4h, 4h_to_h of every layer
    size = (out / "lora" / "lora.safetensors").stat().st_size
    assert size < 0.2 * (data["base"] / "model.safetensors").stat().st_size
    base, final = state(data["base"]), state(out / "final")
    assert set(final) == set(base)
    for key in base:
        module = key.rsplit(".", 1)[0]
        if key.endswith(".weight") and module in targets:
            delta = adapters[module + ".lora_B"].float() @ adapters[module + ".lora_A"].float() * (alpha / rank)
            assert delta.abs().max() > 1e-4, key  # the adapters trained
            torch.testing.assert_close(final[key], base[key] + delta, atol=1e-6, rtol=1e-5)
        else:
            assert torch.equal(final[key], base[key]), key  # the base stayed frozen


def test_init_from_starts_from_the_given_weights(tmp_path, data):
    """With a vanishing learning rate final/ is the init_from model; without init_from it is another model."""
    base = state(data["base"])
    out = train(tmp_path, data, "init", init_from=str(data["base"]), lr=1e-12, max_steps=1)
    final = state(out / "final")
    assert all(torch.allclose(final[k], base[k], atol=1e-9, rtol=0) for k in base)
    scratch = state(train(tmp_path, data, "scratch", lr=1e-12, max_steps=1) / "final")
    assert not torch.allclose(scratch["text_embeddings.weight"], base["text_embeddings.weight"])
    # from the same start, training lowers the loss it logs
    trained = train(tmp_path, data, "init_trained", init_from=str(data["base"]), lr=5e-3, max_steps=12)
    assert metrics(trained)[12]["loss"] < 0.8 * metrics(out)[1]["loss"]


def test_loss_scale_grows_after_loss_scale_window_clean_steps(tmp_path, data):
    """fp16 dynamic loss scaling (run on the CPU): x2 after every loss_scale_window steps without overflow."""
    out = train(tmp_path, data, "fp16", precision="fp16", loss_scale_init=256.0, loss_scale_window=2, max_steps=5,
                lr=1e-3)
    got = {step: r.get("loss_scale") for step, r in metrics(out).items()}
    assert got == {1: 256.0, 2: 512.0, 3: 512.0, 4: 1024.0, 5: 1024.0}, got


def _fsdp(tmp_path: Path, config: Path, *extra: str) -> None:
    """``python -m holst train dalle`` on 2 processes with the environment torchrun gives (gloo on the CPU)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, "-m", "holst", "train", "dalle", "--config", str(config),
                                       *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]


def test_fsdp_checkpoint_and_resume_match_an_uninterrupted_run(tmp_path, data):
    """FSDP, batch 2 per process: stop at step 2 (checkpoint), resume to 4; the same losses and final weights as
    one process doing 4 steps of batch 4 (the same global batch). A constant learning rate (min_lr_ratio 1), since
    the cosine schedule follows max_steps, which the first part sets to 2."""
    common = dict(ema_decay=0.9, lr=3e-3, min_lr_ratio=1.0)
    whole = train(tmp_path, data, "whole", **common)
    config = write_config(tmp_path / "fsdp.yaml", data, out_dir=str(tmp_path / "fsdp"), backend="fsdp", batch_size=2,
                          save_every=2, **common)
    _fsdp(tmp_path, config, "--set", "max_steps=2")
    assert (tmp_path / "fsdp" / "checkpoint.pt").exists() or any((tmp_path / "fsdp").glob("checkpoint*"))
    assert sorted(metrics(tmp_path / "fsdp")) == [1, 2]
    _fsdp(tmp_path, config, "--resume")
    a, b = metrics(whole), metrics(tmp_path / "fsdp")
    assert sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5, abs=1e-6), step
    sa, sb = state(whole / "final"), state(tmp_path / "fsdp" / "final")
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
