"""Config layout: each stage owns its config and presets; holst.config re-exports them; old names still load."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

import holst.config as hc
from holst.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]

HOMES = {
    "DalleConfig": "holst.dalle.config", "VQGANConfig": "holst.vqgan.config", "ClipConfig": "holst.rerank.config",
    "SuperResConfig": "holst.superres.config", "TokenizerConfig": "holst.text.config",
    "DataConfig": "holst.data.config", "EvalConfig": "holst.eval.config", "TrainConfig": "holst.train.config",
    "DalleTrainConfig": "holst.train.config", "VQGANTrainConfig": "holst.train.config",
    "ClipTrainConfig": "holst.train.config", "SuperResTrainConfig": "holst.train.config",
}


@pytest.mark.parametrize("name", sorted(HOMES))
def test_each_config_lives_in_its_stage_and_is_reexported(name):
    cls = getattr(hc, name)
    assert cls.__module__ == HOMES[name]
    assert issubclass(cls, hc.ConfigBase) and name in dir(hc)


def test_presets_live_beside_their_configs():
    import holst.presets
    import holst.rerank.clip
    import holst.vqgan.presets
    from holst.dalle import config as dalle_config
    from holst.rerank import config as clip_config
    from holst.vqgan import config as vqgan_config

    assert holst.presets.get_preset is dalle_config.get_preset
    assert holst.presets.DALLE_PRESETS is dalle_config.DALLE_PRESETS
    assert holst.vqgan.presets.get_vqgan_preset is vqgan_config.get_vqgan_preset
    assert holst.rerank.clip.clip_preset is clip_config.clip_preset
    assert dalle_config.get_preset("tiny").num_layers == 3 and vqgan_config.get_vqgan_preset("tiny").n_embed == 64
    with pytest.raises(AttributeError):
        hc.NoSuchConfig  # noqa: B018


def test_importing_holst_config_stays_light():
    """``import holst.config`` (and the inference API) does not pull in the training package: re-exports are lazy."""
    code = ("import sys, holst.config, holst.pipeline; from holst.config import DalleConfig, ClipConfig; "
            "print(sorted(m for m in sys.modules if m.startswith('holst.train')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_train_config_is_built_from_typed_parts():
    from holst.train.config import EngineOptions, LogOptions, ModelOptions, OptimOptions, ScheduleOptions

    parts = (EngineOptions, OptimOptions, ScheduleOptions, LogOptions)
    names = [f.name for part in parts for f in dataclasses.fields(part)]
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(hc.TrainConfig))  # a partition
    for stage in ("DalleTrainConfig", "VQGANTrainConfig", "ClipTrainConfig", "SuperResTrainConfig"):
        cls = getattr(hc, stage)
        assert cls.__bases__[-1] is hc.TrainConfig  # one level below TrainConfig
        assert (ModelOptions in cls.__bases__) == (stage != "SuperResTrainConfig")
    with pytest.raises(ConfigError, match="lr=0"):
        hc.DalleTrainConfig(lr=0)


@pytest.mark.parametrize("cls_name, old, new, value", [
    ("SuperResTrainConfig", "init", "init_from", "models/x"), ("ClipTrainConfig", "preset", "model", "tiny")])
def test_old_option_names_still_load_with_a_warning(cls_name, old, new, value):
    cls = getattr(hc, cls_name)
    with pytest.warns(FutureWarning, match=f"'{old}' is now called '{new}'"):
        cfg = cls.from_dict({old: value})
    assert getattr(cfg, new) == value and old not in cfg.to_dict()
    with pytest.raises(ConfigError, match="not both"):
        cls.from_dict({old: value, new: value})


def test_removed_clip_options_are_ignored_with_a_warning():
    with pytest.warns(FutureWarning, match="'preload' is no longer used"):
        cfg = hc.ClipTrainConfig.from_dict({"preload": True, "num_workers": 4})
    assert "preload" not in cfg.to_dict() and "num_workers" not in cfg.to_dict()


def test_minus_one_sentinels_read_as_none(tmp_path):
    from holst.train.args import load_train_config

    path = tmp_path / "old.yaml"
    path.write_text("kl_weight: -1\n")
    assert load_train_config(hc.VQGANTrainConfig, path).kl_weight is None
    assert load_train_config(hc.VQGANTrainConfig, None, ["kl_weight=1e-6"]).kl_weight == 1e-6  # a float, not '1e-6'
    assert hc.DalleTrainConfig(loss_img_weight=-1.0).loss_img_weight is None
    assert hc.DalleTrainConfig().loss_img_weight is None and hc.VQGANTrainConfig().kl_weight is None
    with pytest.raises(ConfigError, match="loss_img_weight='x'"):
        hc.DalleTrainConfig(loss_img_weight="x")
    with pytest.raises(ConfigError, match="kl_weight=-2"):
        hc.VQGANTrainConfig(kl_weight=-2)


@pytest.mark.parametrize("cls_name, model_config", [
    ("DalleTrainConfig", "DalleConfig"), ("VQGANTrainConfig", "VQGANConfig"), ("ClipTrainConfig", "ClipConfig")])
def test_model_overrides_must_name_model_config_fields(cls_name, model_config):
    cls = getattr(hc, cls_name)
    field = dataclasses.fields(getattr(hc, model_config))[0].name
    assert cls(model_overrides={field: 1}).model_overrides == {field: 1}
    with pytest.raises(ConfigError, match=rf"\['num_layerz'\] are not {model_config} fields"):
        cls(model_overrides={"num_layerz": 4})


@pytest.mark.parametrize("component", ["dalle", "vqgan", "clip", "superres", "tokenizer", "clip/tokenizer"])
def test_shipped_component_configs_round_trip_byte_for_byte(component, tmp_path):
    """models/default/*/config.json load into the moved classes and are written back unchanged."""
    path = ROOT / "models" / "default" / component / "config.json"
    if not path.is_file():
        pytest.skip(f"{path} is not there")
    cls = {"dalle": hc.DalleConfig, "vqgan": hc.VQGANConfig, "clip": hc.ClipConfig,
           "superres": hc.SuperResConfig}.get(component, hc.TokenizerConfig)
    cls.load_json(path).save_json(tmp_path / "config.json")
    assert (tmp_path / "config.json").read_bytes() == path.read_bytes()
    assert json.loads(path.read_text()) == cls.load_json(path).to_dict()
