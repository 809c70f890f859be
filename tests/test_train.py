"""Training engine and the dalle trainer: skipping, accumulation, schedules, LoRA, resume, DDP parity.

Everything runs on CPU with the 'tiny' preset. Subprocess tests (SIGKILL, torchrun) share one
worker script written into tmp_path; data and tokenizer are tiny in-memory stand-ins that
implement what holst/train/dalle.py calls on them, so these tests depend on no data files.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from holst.config import ConfigError, DalleTrainConfig, TrainConfig
from holst.dalle import DalleModel
from holst.presets import get_preset
from holst.train.args import load_train_config, parse_overrides
from holst.train.dalle import DalleBatches, train_dalle
from holst.train.engine import Engine
from holst.train.lora import apply_lora, freeze_parameters, load_lora, lora_state_dict, save_lora
from holst.train.optim import EMA, build_optimizer, build_scheduler, lr_factor, param_groups

ROOT = Path(__file__).resolve().parents[1]


class CharTokenizer:
    """encode_batch as holst.text.BPETokenizer: [2] + ids + [3], 0-padded; 'dropout' drops characters."""

    vocab_size = 200

    def encode_batch(self, texts, T, *, dropout=0.0, generator=None, keep_eos=False):
        out = torch.zeros(len(texts), T, dtype=torch.long)
        for i, text in enumerate(texts):
            chars = list(text.lower().strip())
            if dropout > 0 and chars:
                keep = torch.rand(len(chars), generator=generator) >= dropout
                chars = [c for c, k in zip(chars, keep.tolist()) if k]
            ids = ([2] + [4 + ord(c) % 190 for c in chars] + [3])[:T]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def make_dataset(n=32, N=16, V=64):
    """4 captions, each with its own deterministic code pattern (learnable)."""
    data = []
    for i in range(n):
        k = i % 4
        data.append({"codes": (torch.arange(N) * (k + 1) + 3 * k) % V, "caption": f"shape number {k}"})
    return data


# The subprocess worker imports CharTokenizer / make_dataset from this file.
WORKER = textwrap.dedent('''
    import importlib.util, json, os, signal, sys
    import torch
    spec = importlib.util.spec_from_file_location("train_test_helpers", %r)
    helpers = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(helpers)
    CharTokenizer, make_dataset = helpers.CharTokenizer, helpers.make_dataset
    from holst.config import DalleTrainConfig
    from holst.train.dalle import train_dalle

    class KillingDataset(list):
        """SIGKILLs its own process when item number `kill_at` is fetched (a hard crash mid-run)."""
        kill_at = -1
        fetched = 0

        def __getitem__(self, i):
            KillingDataset.fetched += 1
            if KillingDataset.fetched == self.kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return list.__getitem__(self, i)

    opts = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    dataset = KillingDataset(make_dataset())
    KillingDataset.kill_at = opts.pop("kill_at", -1)
    resume = opts.pop("resume", None)
    cfg = DalleTrainConfig.from_dict(opts)
    train_dalle(cfg, dataset=dataset, tokenizer=CharTokenizer(), resume=resume)
''') % str(Path(__file__).resolve())


def tiny_cfg(tmp_path: Path, name: str, **kw) -> dict:
    opts = dict(model="tiny", out_dir=str(tmp_path / name), batch_size=8, max_steps=8, lr=3e-3, warmup_steps=2,
                log_every=1, save_every=3, tensorboard=False, bpe_dropout=0.1, empty_caption_prob=0.2, seed=3,
                precision="fp32")
    opts.update(kw)
    return opts


def read_metrics(out_dir: str | Path) -> dict[int, dict]:
    """step -> the last record logged for it (a resumed run re-logs the steps after its checkpoint)."""
    records = {}
    for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "event" not in r:  # the data report at the end of a run
            records[r["step"]] = r
    return records


def run_worker(tmp_path: Path, opts: dict) -> subprocess.CompletedProcess:
    script = tmp_path / "worker.py"
    if not script.exists():  # rewriting it while earlier workers start would let one read an empty file
        script.write_text(WORKER)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), json.dumps(opts)], env=env, capture_output=True, text=True,
                          timeout=120)


def run_workers(tmp_path: Path, opts: dict, world_size: int) -> list[subprocess.Popen]:
    """Start world_size workers with the environment torchrun gives each process (env:// rendezvous)."""
    script = tmp_path / "worker.py"
    if not script.exists():  # rewriting it while earlier workers start would let one read an empty file
        script.write_text(WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(world_size)}
        procs.append(subprocess.Popen([sys.executable, str(script), json.dumps(opts)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


@contextlib.contextmanager
def one_thread():
    """Match the workers' single intra-op thread so in-process and subprocess runs are bit-identical."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def final_state(out_dir: str | Path) -> dict[str, torch.Tensor]:
    return DalleModel.from_pretrained(Path(out_dir) / "final").state_dict()


# ------------------------------------------------------------------------------------------- engine


def _tiny_model(seed: int = 0) -> DalleModel:
    torch.manual_seed(seed)
    return DalleModel(get_preset("tiny"))


def _ids(batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, 256, (batch, 16), generator=g)
    return torch.cat([text, torch.randint(0, 64, (batch, 16), generator=g)], 1)


def test_nonfinite_gradient_is_skipped_and_counted(tmp_path):
    cfg = TrainConfig(out_dir=str(tmp_path), tensorboard=False, warmup_steps=2, max_steps=10)
    with Engine(cfg) as engine:
        model, opt = engine.prepare(_tiny_model(), None)
        opt = build_optimizer(model, cfg)
        sched = build_scheduler(opt, cfg)
        loss, _ = model.compute_loss(_ids(4, 0))
        assert engine.step(loss, opt, sched, model=model)  # a normal step creates optimizer state
        before = {k: v.clone() for k, v in model.state_dict().items()}
        opt_before = {k: v["exp_avg"].clone() for k, v in opt.state.items()}
        lr_before = sched.get_last_lr()
        loss, _ = model.compute_loss(_ids(4, 1))
        applied = engine.step(loss * float("inf"), opt, sched, model=model)
        assert not applied and engine.skipped_steps == 1 and engine.applied_steps == 1
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert all(torch.equal(opt_before[k], v["exp_avg"]) for k, v in opt.state.items())
        assert sched.get_last_lr() == lr_before
        assert all(p.grad is None for p in model.parameters())  # the bad gradients are gone
        loss, _ = model.compute_loss(_ids(4, 2))
        assert engine.step(loss, opt, sched, model=model) and engine.skipped_steps == 1


def test_gradient_accumulation_matches_a_big_batch(tmp_path):
    """2 micro-batches of 4 with grad_accum=2 == one batch of 8 (mean losses)."""
    results = []
    for accum, chunks in ((1, 1), (2, 2)):
        cfg = TrainConfig(out_dir=str(tmp_path / str(accum)), tensorboard=False, grad_accum=accum, grad_clip=0.5)
        with Engine(cfg) as engine:
            model, _ = engine.prepare(_tiny_model(), None)
            opt = build_optimizer(model, cfg)
            ids = _ids(8, 5)
            applied = [engine.step(model.compute_loss(part)[0], opt, None, model=model) for part in ids.chunk(chunks)]
            assert applied[-1] and not any(applied[:-1])
            results.append({k: v.clone() for k, v in model.state_dict().items()})
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], rtol=1e-5, atol=1e-6)


def test_param_groups_schedule_and_ema():
    model = _tiny_model()
    groups = param_groups(model, 0.1)
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert "transformer.layers.0.attention.query_key_value.weight" in decay
    assert {"text_embeddings.weight", "image_row_embeddings.weight", "transformer.layers.0.input_layernorm.weight",
            "transformer.layers.0.attention.dense.bias", "to_logits.0.weight"} <= no_decay
    assert not any("norm" in n or n.endswith("bias") or "embeddings" in n for n in decay)
    assert lr_factor(0, 10, 110, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 110, 0.1) == pytest.approx(1.0)
    assert lr_factor(60, 10, 110, 0.1) == pytest.approx(0.55)
    assert lr_factor(110, 10, 110, 0.1) == pytest.approx(0.1)
    ema = EMA(model, 0.5)
    w0 = model.text_embeddings.weight.detach().clone()
    with torch.no_grad():
        model.text_embeddings.weight.add_(1.0)
    ema.update(model)  # decay_t = min(0.5, 2/11)
    d = 2 / 11
    torch.testing.assert_close(ema.state_dict()["shadow"]["text_embeddings.weight"], d * w0 + (1 - d) * (w0 + 1))


# ------------------------------------------------------------------------------------------- LoRA


def test_lora_save_and_merge_round_trip(tmp_path):
    base = _tiny_model(1)
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    ids = _ids(2, 3)
    adapted = apply_lora(base, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(0))
    assert len(adapted) == 4 * 3
    assert {n for n, p in base.named_parameters() if p.requires_grad} == set(lora_state_dict(base))
    with torch.no_grad():  # a trained adapter: non-zero B
        for name, t in base.named_parameters():
            if name.endswith("lora_B"):
                t.normal_(std=0.05)
    expected = base(ids)
    save_lora(base, tmp_path / "lora")
    assert (tmp_path / "lora" / "lora.safetensors").stat().st_size < 64 * 1024  # adapters only
    fresh = DalleModel(base.config)
    fresh.load_state_dict(base_state)
    load_lora(fresh, tmp_path / "lora", merge=True)
    assert set(fresh.state_dict()) == set(base_state)  # merged: exactly the base names again
    torch.testing.assert_close(fresh(ids), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(fresh.state_dict()["transformer.layers.0.mlp.dense_h_to_4h.weight"],
                              base_state["transformer.layers.0.mlp.dense_h_to_4h.weight"])


# ------------------------------------------------------------------------------------------- config


def test_config_yaml_and_overrides(tmp_path):
    assert parse_overrides(["lr=1e-4", "model_overrides.num_layers=2", "codes=[a.pt, b.pt]"]) == {
        "lr": "1e-4", "model_overrides": {"num_layers": 2}, "codes": ["a.pt", "b.pt"]}
    path = tmp_path / "c.yaml"
    path.write_text("model: tiny\nlr: 3e-4\nbatch_size: 4\n")
    cfg = load_train_config(DalleTrainConfig, path, ["lr=1e-4", "freeze=['*.mlp.*']"])
    assert cfg.lr == 1e-4 and cfg.batch_size == 4 and cfg.freeze == ["*.mlp.*"] and cfg.model == "tiny"
    with pytest.raises(ConfigError, match="precison"):
        load_train_config(DalleTrainConfig, path, ["precison=bf16"])
    with pytest.raises(ConfigError, match="precision"):
        load_train_config(DalleTrainConfig, path, ["precision=fp8"])
    for yaml_file in sorted((ROOT / "configs" / "train").glob("dalle_*.yaml")):
        load_train_config(DalleTrainConfig, yaml_file)


# ------------------------------------------------------------------------------------------- trainer


def test_batches_do_not_depend_on_process_count():
    ds, tok = make_dataset(), CharTokenizer()
    kw = dict(text_seq_length=16, image_seq_length=16, seed=1, bpe_dropout=0.3, empty_caption_prob=0.3)
    one = DalleBatches(ds, tok, batch_size=8, **kw)
    two = [DalleBatches(ds, tok, batch_size=4, rank=r, world_size=2, **kw) for r in range(2)]
    texts, codes = [], []
    for _ in range(6):  # crosses an epoch boundary (4 global batches per epoch)
        t1, c1 = one.next()
        parts = [b.next() for b in two]
        assert torch.equal(t1, torch.cat([p[0] for p in parts])) and torch.equal(c1, torch.cat([p[1] for p in parts]))
        texts.append(t1)
        codes.append(c1)
    texts, codes = torch.cat(texts), torch.cat(codes)  # 48 samples
    # both random draws were exercised (so the equality above covers them): ~30 % empty captions ([2, 3, 0...]) ...
    empty = texts[:, 1] == 3
    assert 4 <= int(empty.sum()) <= 26, int(empty.sum())
    # ... and BPE-dropout changed some of the others (sample k's caption is "shape number k", codes[0] = 3k)
    plain = torch.cat([tok.encode_batch([f"shape number {int(c[0]) // 3}"], 16) for c in codes])
    assert (texts[~empty] != plain[~empty]).any(dim=1).float().mean() > 0.5


def test_trainer_learns_with_emojich_freeze_and_saves_a_loadable_model(tmp_path):
    opts = tiny_cfg(tmp_path, "run", max_steps=30, save_every=0, log_every=5, lr=5e-3, bpe_dropout=0.0,
                    empty_caption_prob=0.0, loss_img_weight=1000.0,
                    freeze=["transformer.layers.*.attention.*", "transformer.layers.*.mlp.*"])
    cfg = DalleTrainConfig.from_dict(opts)
    result = train_dalle(cfg, dataset=make_dataset(), tokenizer=CharTokenizer())
    metrics = read_metrics(cfg.out_dir)
    assert metrics[30]["loss"] < 0.7 * metrics[5]["loss"]
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        initial = DalleModel(get_preset("tiny"))
    trained = DalleModel.from_pretrained(result.final_dir)
    assert trained.config.loss_img_weight == 1000.0
    s0, s1 = initial.state_dict(), trained.state_dict()
    frozen = freeze_parameters(initial, cfg.freeze)
    assert frozen and all(torch.equal(s0[k], s1[k]) for k in frozen)
    assert not torch.equal(s0["text_embeddings.weight"], s1["text_embeddings.weight"])
    # the saved model predicts the training images better than the initial one
    ids = torch.cat([CharTokenizer().encode_batch([d["caption"] for d in make_dataset(4)], 16),
                     torch.stack([d["codes"] for d in make_dataset(4)])], 1)
    with torch.no_grad():
        assert trained.compute_loss(ids)[1]["image"] < 0.7 * initial.compute_loss(ids)[1]["image"]


def test_sigterm_saves_and_resume_continues_exactly(tmp_path):
    """In-process: SIGTERM mid-run -> checkpoint + clean stop; --resume reproduces the rest exactly."""
    class TermDataset(list):
        fetched = 0

        def __getitem__(self, i):
            TermDataset.fetched += 1
            if TermDataset.fetched == 8 * 3 + 3:  # while building the batch of step 4
                os.kill(os.getpid(), signal.SIGTERM)
            return list.__getitem__(self, i)

    ref = DalleTrainConfig.from_dict(tiny_cfg(tmp_path, "ref", save_every=0, max_steps=6))
    train_dalle(ref, dataset=make_dataset(), tokenizer=CharTokenizer())
    cfg = DalleTrainConfig.from_dict(tiny_cfg(tmp_path, "term", save_every=0, max_steps=6))
    first = train_dalle(cfg, dataset=TermDataset(make_dataset()), tokenizer=CharTokenizer())
    assert first.interrupted and first.step == 4 and first.final_dir is None
    assert signal.getsignal(signal.SIGTERM) is not None  # handler handed back
    second = train_dalle(cfg, dataset=make_dataset(), tokenizer=CharTokenizer(), resume=True)
    assert second.step == 6 and not second.interrupted
    a, b = read_metrics(ref.out_dir), read_metrics(cfg.out_dir)
    assert sorted(a) == sorted(b)
    for step in a:
        assert a[step]["loss"] == b[step]["loss"], step
    sa, sb = final_state(ref.out_dir), final_state(cfg.out_dir)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    """A hard kill (no chance to save) after the step-4 checkpoint; resume redoes 5..6 identically."""
    dropout = {"model_overrides": {"embedding_dropout_prob": 0.1, "attention_dropout_prob": 0.1,
                                   "output_dropout_prob": 0.1}, "max_steps": 6, "save_every": 2}
    with one_thread():
        train_dalle(DalleTrainConfig.from_dict(tiny_cfg(tmp_path, "ref", **dropout)), dataset=make_dataset(),
                    tokenizer=CharTokenizer())
    killed = run_worker(tmp_path, {**tiny_cfg(tmp_path, "crash", **dropout), "kill_at": 8 * 5 + 2})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (tmp_path / "crash" / "final").exists()
    crashed_log = read_metrics(tmp_path / "crash")
    assert max(crashed_log) == 5  # killed while building step 6's batch; last checkpoint at step 4
    resumed = run_worker(tmp_path, {**tiny_cfg(tmp_path, "crash", **dropout), "resume": "auto"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = read_metrics(tmp_path / "ref"), read_metrics(tmp_path / "crash")
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for step in a:
        assert a[step]["loss"] == b[step]["loss"], (step, a[step], b[step])
    sa, sb = final_state(tmp_path / "ref"), final_state(tmp_path / "crash")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _has_deepspeed() -> bool:
    import importlib.util

    return importlib.util.find_spec("deepspeed") is not None


@pytest.mark.slow
def test_ddp_fsdp_and_deepspeed_two_processes_match_one_process(tmp_path):
    """2 x gloo (torchrun's env), batch 4 each == 1 process, batch 8 (same global batch, same samples).

    DDP all-reduces gradients; FSDP (fully_shard) shards parameters, gradients, optimizer state and
    the EMA, and gathers the full weights for final/; DeepSpeed ZeRO-2 (its CPU accelerator over
    gloo, when installed: ./setup.sh --dev) partitions the optimizer state."""
    common = dict(max_steps=3, save_every=0, ema_decay=0.9)
    backends = ("ddp", "fsdp") + (("deepspeed",) if _has_deepspeed() else ())
    procs = {backend: run_workers(tmp_path, tiny_cfg(tmp_path, backend, batch_size=4, backend=backend, **common), 2)
             for backend in backends}
    single = DalleTrainConfig.from_dict(tiny_cfg(tmp_path, "single", **common))
    with one_thread():
        train_dalle(single, dataset=make_dataset(), tokenizer=CharTokenizer())
    a, sa = read_metrics(single.out_dir), final_state(single.out_dir)
    for backend, pair in procs.items():
        for p in pair:
            _, err = p.communicate(timeout=180)
            assert p.returncode == 0, (backend, err[-3000:])
        b = read_metrics(tmp_path / backend)
        assert sorted(a) == sorted(b) == [1, 2, 3]
        for step in a:
            assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-5, abs=1e-6), (backend, step)
        sb = final_state(tmp_path / backend)
        for k in sa:
            # Adam turns float-rounding differences of near-zero gradients into differences of up to ~lr/100.
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-4, atol=1e-4,
                                       msg=lambda m, k=k, backend=backend: f"{backend} {k}: {m}")


def test_on_the_fly_vqgan_encoding_and_sample_grid(tmp_path):
    """An image dataset encoded by a (random) VQGAN each step, and a sample grid written at step 2."""
    import holst.vqgan as vqgan_mod
    from holst.vqgan.presets import get_vqgan_preset

    torch.manual_seed(0)
    vq = vqgan_mod.VQGAN(get_vqgan_preset("tiny")).eval()  # 32 px -> 4x4 codes of 64, as the tiny DALL-E
    g = torch.Generator().manual_seed(0)
    images = [{"image": torch.rand(3, 32, 32, generator=g), "caption": f"picture {i % 3}"} for i in range(8)]
    cfg = DalleTrainConfig.from_dict(tiny_cfg(tmp_path, "fly", max_steps=2, batch_size=4, save_every=0,
                                              sample_every=2, sample_prompts=["picture 1", "picture 2"]))
    result = train_dalle(cfg, dataset=images, tokenizer=CharTokenizer(), vqgan=vq)
    assert result.step == 2 and (tmp_path / "fly" / "final" / "model.safetensors").is_file()
    grid = tmp_path / "fly" / "samples" / "step_0000002.png"
    assert grid.is_file()
    from PIL import Image

    assert Image.open(grid).size[1] == 32 + 2 * 2  # one row of 32 px images with 2 px padding


def test_cli_with_real_tokenizer_and_code_shards(tmp_path, capsys, caplog):
    """`holst train dalle --config x.yaml --set ...` end to end: BPE tokenizer dir + a code shard folder."""
    import holst.data.codes as codes_mod
    import holst.text as text_mod
    from holst.cli import main

    captions = [f"красный круг {i}" if i % 2 else f"синий квадрат {i}" for i in range(16)]
    tok = text_mod.BPETokenizer.train(captions * 4, vocab_size=60, lowercase=True)
    tok.save_pretrained(tmp_path / "tok")
    codes = torch.stack([(torch.arange(16) * (1 + i % 2)) % 64 for i in range(16)]).reshape(16, 4, 4)
    codes_mod.write_code_shard(tmp_path / "codes" / "shard-000.safetensors", codes, {"ru": captions})
    config = tmp_path / "run.yaml"
    config.write_text(f"model: tiny\ntokenizer: {tmp_path / 'tok'}\ncodes: [{tmp_path / 'codes'}]\n"
                      f"out_dir: {tmp_path / 'run'}\nbatch_size: 4\nmax_steps: 6\nlog_every: 2\ntensorboard: false\n")
    caplog.set_level("INFO", logger="holst")
    assert main(["train", "dalle", "--config", str(config), "--set", "max_steps=3", "--set", "lr=1e-3"]) == 0
    assert "done: 3 steps" in capsys.readouterr().out
    assert "sparse attention" in caplog.text  # the log names the kernel (the trainer's default)
    assert sorted(read_metrics(tmp_path / "run")) == [2, 3]
    assert main(["train", "dalle", "--config", str(config), "--resume"]) == 0  # continues 3 -> 6
    assert sorted(read_metrics(tmp_path / "run")) == [2, 3, 4, 6]
    model = DalleModel.from_pretrained(tmp_path / "run" / "final")
    assert model.config.text_seq_length == 16


def test_fp16_loss_scaling_skips_overflow_and_checkpoints_the_scale(tmp_path):
    """The GPU fp16 path, run on CPU: an overflowing step is skipped and halves the scale; the scaler resumes."""
    cfg = TrainConfig(out_dir=str(tmp_path), tensorboard=False, precision="fp16", loss_scale_init=1024.0)
    with Engine(cfg) as engine:
        model, _ = engine.prepare(_tiny_model(), None)
        opt = build_optimizer(model, cfg)

        def loss_of(seed: int) -> torch.Tensor:
            with engine.autocast():
                logits = model(_ids(4, seed))
            assert logits.dtype == torch.float16
            return model.compute_loss(_ids(4, seed), logits=logits)[0]

        assert engine.step(loss_of(0), opt, model=model) and engine.loss_scale == 1024.0
        before = {k: v.clone() for k, v in model.state_dict().items()}
        assert not engine.step(loss_of(1) * 1e6, opt, model=model)  # fp16 gradients overflow
        assert engine.skipped_steps == 1 and engine.loss_scale == 512.0
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        engine.save_checkpoint(tmp_path / "ck.pt", model=model, optimizer=opt)
    with Engine(cfg) as engine:
        engine.load_checkpoint(tmp_path / "ck.pt")
        assert engine.loss_scale == 512.0 and engine.skipped_steps == 1
