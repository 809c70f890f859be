"""Model and train configs are checked before anything is allocated: bounded sizes, bools are not ints,
and loaded weights must have a dtype of the right kind."""

from __future__ import annotations

import time

import pytest
import torch

from holst.config import (
    ClipConfig,
    ConfigError,
    DalleConfig,
    DalleTrainConfig,
    SuperResConfig,
    SuperResTrainConfig,
    VQGANConfig,
    VQGANTrainConfig,
)
from holst.utils.persist import CheckpointError


@pytest.mark.parametrize(("cls", "field", "value"), [
    (DalleConfig, "hidden_size", 2**30), (DalleConfig, "num_layers", 10**6), (DalleConfig, "num_layers", True),
    (DalleConfig, "image_tokens_per_dim", 4.0), (DalleConfig, "cogview_pb_relax", 1),
    (ClipConfig, "vision_width", 2**30), (ClipConfig, "transformer_layers", 10**6), (ClipConfig, "vision_heads", True),
    (VQGANConfig, "ch", 2**30), (VQGANConfig, "ch_mult", (1, 2, 10**6)), (VQGANConfig, "n_embed", True),
    (VQGANConfig, "double_z", 0), (SuperResConfig, "num_block", 10**6), (SuperResConfig, "num_feat", False),
    (SuperResConfig, "scale", True),
    (DalleTrainConfig, "batch_size", True), (DalleTrainConfig, "max_steps", 2.5),
    (DalleTrainConfig, "gradient_checkpointing", "yes"), (VQGANTrainConfig, "tensorboard", 1),
    (SuperResTrainConfig, "grad_accum", False),
])
def test_out_of_range_sizes_and_bools_as_ints_are_refused_at_once(cls, field, value):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=field):
        cls(**{field: value})
    assert time.perf_counter() - t0 < 1.0  # refused by the check, not by the allocator


def test_a_config_with_far_too_many_parameters_is_refused():
    with pytest.raises(ConfigError, match="parameters"):
        DalleConfig(num_layers=512, hidden_size=32768, num_attention_heads=64)
    DalleConfig(num_layers=64, hidden_size=4096, num_attention_heads=32)  # Kandinsky-sized: fine


def test_weights_of_the_wrong_dtype_kind_are_refused_with_a_message(tmp_path):
    from holst.superres.rrdbnet import RRDBNet
    from holst.utils.persist import save_safetensors

    model = RRDBNet(SuperResConfig(num_feat=8, num_block=0, num_grow_ch=4, scale=2))
    model.save_pretrained(tmp_path / "ok", dtype=torch.float16)
    RRDBNet.from_pretrained(tmp_path / "ok")  # fp16 weights are fine
    model.save_pretrained(tmp_path / "bad")
    state = {k: (v * 100).to(torch.int8) if k == "conv_first.weight" else v for k, v in model.state_dict().items()}
    save_safetensors(state, tmp_path / "bad" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"conv_first.weight: file torch.int8 vs model torch.float32"):
        RRDBNet.from_pretrained(tmp_path / "bad")
