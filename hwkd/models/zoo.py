"""Built-in model zoo: ResNet teachers (a small one and CIFAR ResNet-20), a MobileNetV2 student and a tiny CNN for tests.

Every builder is ``fn(num_classes, in_channels, width=1.0) -> nn.Module``. The models are written so
that the rest of the pipeline can work on them without special cases:

- activations are ``nn.ReLU`` / ``nn.ReLU6`` modules and every conv is followed by a BatchNorm, so
  torch-pruning's DepGraph and torchao's PT2E quantizer (conv-bn-relu fusion) see plain patterns;
- the head is one ``nn.Linear`` after ``torch.flatten(x, 1)``, found by ``loaders.find_head``;
- there is no data-dependent control flow, so ``torch.export.export`` traces them.

Example::

    from hwkd.models.zoo import ZOO
    model = ZOO.get("mobilenetv2")(num_classes=10, in_channels=1, width=0.5)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from hwkd.registry import Registry

ZOO: Registry[Callable[..., nn.Module]] = Registry("model")

DEFAULT_TEACHER = "resnet"
DEFAULT_STUDENT = "mobilenetv2"


def make_divisible(value: float, divisor: int = 8, minimum: int | None = None) -> int:
    """Round a channel count to the nearest multiple of ``divisor`` (never down by more than 10%).

    Hardware (and ONNX Runtime's kernels) prefer channel counts in multiples of 8; this is the rule
    MobileNet uses.
    """
    minimum = minimum or divisor
    out = max(minimum, int(value + divisor / 2) // divisor * divisor)
    if out < 0.9 * value:
        out += divisor
    return out


def conv_bn_act(
    cin: int,
    cout: int,
    kernel: int = 3,
    stride: int = 1,
    groups: int = 1,
    act: type[nn.Module] | None = nn.ReLU,
) -> nn.Sequential:
    """Conv (no bias) -> BatchNorm -> optional activation module."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 conv-bn, residual add (1x1 projection when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = conv_bn_act(cin, cout, 3, stride)
        self.conv2 = conv_bn_act(cout, cout, 3, 1, act=None)
        self.shortcut = (
            conv_bn_act(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()
        )
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet(nn.Module):
    """Small CIFAR-style ResNet: 3x3 stem, three stages (strides 1, 2, 2), global pool, linear head."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        widths: tuple[int, ...] = (32, 64, 128),
        blocks: tuple[int, ...] = (1, 1, 1),
        strides: tuple[int, ...] = (1, 2, 2),
    ):
        super().__init__()
        self.stem = conv_bn_act(in_channels, widths[0], 3, 1)
        stages: list[nn.Module] = []
        cin = widths[0]
        for cout, n, stride in zip(widths, blocks, strides, strict=True):
            layers = []
            for i in range(n):
                layers.append(BasicBlock(cin, cout, stride if i == 0 else 1))
                cin = cout
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.head(torch.flatten(x, 1))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise -> 1x1 linear projection; residual if shapes match."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int):
        super().__init__()
        hidden = make_divisible(cin * expansion)
        self.use_residual = stride == 1 and cin == cout
        self.expand = conv_bn_act(cin, hidden, 1, act=nn.ReLU6)
        self.depthwise = conv_bn_act(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6)
        self.project = conv_bn_act(hidden, cout, 1, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.use_residual else out


class MobileNetV2(nn.Module):
    """Small MobileNetV2 for 32x32 inputs: stride-1 stem, inverted residual stages, 1x1 conv, pool, head."""

    # (expansion, channels, blocks, stride) per stage, before the width multiplier
    SETTINGS = ((4, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2), (4, 64, 1, 2))

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        width: float = 1.0,
        last_channels: int = 128,
        stem_stride: int = 2,
    ):
        super().__init__()
        cin = make_divisible(16 * width)
        self.stem = conv_bn_act(in_channels, cin, 3, stem_stride, act=nn.ReLU6)
        blocks: list[nn.Module] = []
        for expansion, channels, n, stride in self.SETTINGS:
            cout = make_divisible(channels * width)
            for i in range(n):
                blocks.append(InvertedResidual(cin, cout, stride if i == 0 else 1, expansion))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        last = make_divisible(last_channels * max(width, 1.0))
        self.last = conv_bn_act(cin, last, 1, act=nn.ReLU6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.last(self.blocks(self.stem(x))))
        return self.head(torch.flatten(x, 1))


class TinyCNN(nn.Module):
    """Three conv-bn-relu layers (strides 1, 2, 2), pool, head: a few thousand parameters, for tests."""

    def __init__(self, num_classes: int, in_channels: int, width: float = 1.0):
        super().__init__()
        c1, c2, c3 = (make_divisible(c * width) for c in (16, 32, 32))
        self.features = nn.Sequential(
            conv_bn_act(in_channels, c1, 3, 1),
            conv_bn_act(c1, c2, 3, 2),
            conv_bn_act(c2, c3, 3, 2),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c3, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.head(torch.flatten(x, 1))


def _widths(base: tuple[int, ...], width: float) -> tuple[int, ...]:
    return tuple(make_divisible(c * width) for c in base)


@ZOO.register("resnet")
def resnet(num_classes: int, in_channels: int, width: float = 1.0) -> nn.Module:
    """Teacher: ResNet with one BasicBlock per stage, widths (32, 64, 128) x width."""
    return ResNet(num_classes, in_channels, widths=_widths((32, 64, 128), width), blocks=(1, 1, 1))


@ZOO.register("resnet20")
def resnet20(num_classes: int, in_channels: int, width: float = 1.0) -> nn.Module:
    """CIFAR ResNet-20 (He et al. 2016): 3x3 stem, three BasicBlocks per stage, widths (16, 32, 64) x width.

    ~0.27M parameters, ~41M MACs at 32x32. Shortcuts that change shape are 1x1 conv-bn projections
    (option B), which DepGraph prunes together with the block.
    """
    return ResNet(num_classes, in_channels, widths=_widths((16, 32, 64), width), blocks=(3, 3, 3))


@ZOO.register("mobilenetv2")
def mobilenetv2(num_classes: int, in_channels: int, width: float = 1.0) -> nn.Module:
    """Student: MobileNetV2 with channels (16, 24, 32, 64) x width, expansion 4."""
    return MobileNetV2(num_classes, in_channels, width=width)


@ZOO.register("cnn")
def cnn(num_classes: int, in_channels: int, width: float = 1.0) -> nn.Module:
    """Tiny plain conv net, handy for tests."""
    return TinyCNN(num_classes, in_channels, width=width)
