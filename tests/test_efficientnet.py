"""EfficientNet-Lite0 from the PyPI wheel: every key loads strictly, TF "SAME" padding
is what TensorFlow computes, and the network names pictures the test draws."""
import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from acf_fast.data.efficientnet import STRIDE, SameConv, load_efficientnet_lite0, preprocess, weights_path
from acf_fast.data.images import grid_features

# ImageNet-1k class indices (the standard order of the 1000 synsets).
BANANA, GRANNY_SMITH, TENNIS_BALL = 954, 948, 852
S = 256


@pytest.fixture(scope="module")
def net():
    return load_efficientnet_lite0()


def _canvas():
    return np.full((S, S, 3), 255.0, np.float32)


def draw_sphere(colour, bumps):
    """A lit sphere on white (the light from the upper left), faint surface noise."""
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    r, c = 90.0, S / 2
    d2 = ((xx - c) ** 2 + (yy - c) ** 2) / r**2
    z = np.sqrt(np.clip(1 - d2, 0, 1))
    light = np.clip(0.35 + 0.75 * (0.8 * z - 0.3 * (xx - c) / r - 0.4 * (yy - c) / r), 0, 1.2)
    light = light + bumps * np.random.default_rng(0).normal(size=(S, S)).astype(np.float32)
    img = _canvas()
    inside = d2 < 1
    img[inside] = np.clip(np.asarray(colour, np.float32) * light[..., None], 0, 255)[inside]
    return Image.fromarray(img.astype(np.uint8))


def draw_banana():
    """A thick yellow arc, shaded across its width, with brown tips."""
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32)
    cx, cy, R = 128.0, -40.0, 190.0
    d = np.hypot(xx - cx, yy - cy)
    t = (np.arctan2(yy - cy, xx - cx) - np.pi / 2) / 0.75  # -1 .. 1 along the fruit
    half = 28 * np.sqrt(np.clip(1 - t**2, 0, 1))
    inside = (np.abs(d - R) < half) & (np.abs(t) < 1)
    shade = 0.75 + 0.35 * (1 - np.abs(d - R) / np.maximum(half, 1e-3))
    img = _canvas()
    img[inside] = np.clip(np.array([240, 205, 50], np.float32) * shade[..., None], 0, 255)[inside]
    img[inside & (np.abs(t) > 0.93)] = [80, 60, 30]
    return Image.fromarray(img.astype(np.uint8))


def test_wheel_state_dict_loads_strictly(net):
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    assert len(state) == 296
    assert set(state) == set(net.state_dict())  # strict=True succeeded: nothing missing, nothing extra
    n = sum(p.numel() for p in net.parameters())
    assert 4.6e6 < n < 4.7e6
    assert not net.training


@pytest.mark.parametrize("size,k,s", [(32, 3, 2), (33, 3, 2), (96, 5, 2), (13, 5, 1), (6, 3, 1), (7, 1, 1)])
def test_same_padding_matches_tensorflow(size, k, s):
    """TF "SAME": output ceil(n / s); total pad max((out - 1) s + k - n, 0), the odd pixel at the end."""
    torch.manual_seed(size)
    conv = SameConv(2, 3, k, s, bias=False)
    x = torch.randn(1, 2, size, size + 1)
    out = conv(x)
    pads = []
    for n in (size + 1, size):  # F.pad order: last dim first
        o = -(-n // s)
        total = max((o - 1) * s + k - n, 0)
        pads += [total // 2, total - total // 2]
    ref = F.conv2d(F.pad(x, pads), conv.weight, stride=s)
    assert out.shape == (1, 3, -(-size // s), -(-(size + 1) // s))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_preprocess_is_tf_style():
    white = Image.new("RGB", (10, 10), "white")
    black = Image.new("RGB", (10, 10), "black")
    x = preprocess([white, black], 32)
    assert x.shape == (2, 3, 32, 32) and x.dtype == torch.float32
    assert torch.all(x[0] == 1.0) and torch.all(x[1] == -1.0)  # (x - 0.5) / 0.5, no ImageNet mean/std


def test_names_drawn_pictures(net):
    """Top-1 ImageNet class of pictures drawn here: a banana, a green apple, a tennis ball."""
    pics = [draw_banana(), draw_sphere((215, 235, 60), 0.02), draw_sphere((250, 240, 60), 0.05)]
    with torch.no_grad():
        top = net(preprocess(pics, 192)).softmax(-1).max(-1)
    assert top.indices.tolist() == [BANANA, GRANNY_SMITH, TENNIS_BALL]
    assert float(top.values.min()) > 0.5


def test_grid_features_cells_in_row_major_order(net):
    """Cell (y, x) of the 6 x 6 conv_head map is region 6 y + x; values are ReLU6 outputs."""
    pics = [draw_banana(), draw_sphere((200, 20, 20), 0.0)]
    regions = grid_features(net, pics, 6)
    with torch.no_grad():
        fmap = net.features(preprocess(pics, 6 * STRIDE))
    assert regions.shape == (2, 36, 1280) and fmap.shape == (2, 1280, 6, 6)
    for y, x in ((0, 0), (0, 5), (3, 1), (5, 5)):
        torch.testing.assert_close(regions[:, 6 * y + x], fmap[:, :, y, x], rtol=0, atol=0)
    assert float(regions.min()) >= 0 and float(regions.max()) <= 6
    # A 4 x 4 grid reads a 128 px input.
    assert grid_features(net, pics[:1], 4).shape == (1, 16, 1280)
