"""The networks calibration times, built directly as ONNX graphs with random (fixed-seed) weights.

Four *families*, so the held-out check can leave a whole family out of the fit (a model that only
reproduces its own kind of network would fail it):

- ``random``: a stem and 2-10 blocks of a random kind (plain, 1x1, separable, inverted, residual);
- ``resnet``: a max-pooled stem and stages of basic or bottleneck residual blocks, with projection
  shortcuts where the stride or width changes (ResNet-18/50 style);
- ``mobile``: inverted residuals with squeeze-and-excitation, hardswish / SiLU / ReLU6, a
  MobileNetV3-style head (pool, 1x1 conv, hardswish, linear);
- ``grouped``: grouped 3x3 convs in bottlenecks (ResNeXt style) and Inception-style branches joined
  by Concat.

All end in a global pooling head (GlobalAveragePool or ReduceMean, then Flatten and Gemm).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

OPSET = 17
FAMILIES = ("random", "resnet", "mobile", "grouped")
WIDTHS = (8, 12, 16, 24, 32, 40, 48, 64, 96, 128, 192, 256)




class _Graph:
    """A small builder of FP32 ONNX graphs with random (fixed-seed) weights."""

    def __init__(self, shape: tuple[int, ...], rng: np.random.Generator):
        from onnx import TensorProto, helper

        self.helper, self.tp = helper, TensorProto
        self.rng = rng
        self.nodes, self.inits = [], []
        self.shape = shape  # current activation shape (N, C, H, W)
        self.inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))]
        self.cur = "x"
        self.n = 0
        self.macs = 0
        self.activation = "Relu"

    def _name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def _const(self, array: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self._name("w")
        self.inits.append(numpy_helper.from_array(array.astype(np.float32), name))
        return name

    def conv(
        self, cout: int, k: int = 3, stride: int = 1, depthwise: bool = False, relu: bool = True, groups: int = 1
    ) -> str:
        n, c, h, w = self.shape
        groups = c if depthwise else groups
        cout = c if depthwise else cout
        fan_in = (c // groups) * k * k
        weight = self.rng.standard_normal((cout, c // groups, k, k)) * math.sqrt(2.0 / fan_in)
        bias = self.rng.standard_normal(cout) * 0.1
        out = self._name("conv")
        self.nodes.append(
            self.helper.make_node(
                "Conv", [self.cur, self._const(weight), self._const(bias)], [out],
                kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, group=groups,
            )
        )  # fmt: skip
        self.cur = out
        self.shape = (n, cout, (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1)
        self.macs += self.shape[1] * self.shape[2] * self.shape[3] * fan_in
        if relu:
            self.activate()
        return self.cur

    def activate(self) -> str:
        """The graph's activation: Relu, Clip(0, 6) (ReLU6), HardSwish, or SiLU (x * Sigmoid(x))."""
        if self.activation in ("Relu", "HardSwish"):
            return self.unary(self.activation)
        if self.activation == "SiLU":
            x = self.cur
            self.unary("Sigmoid")
            return self.mul(x)
        out = self._name("clip")
        lo, hi = self._const(np.array(0.0)), self._const(np.array(6.0))
        self.nodes.append(self.helper.make_node("Clip", [self.cur, lo, hi], [out]))
        self.cur = out
        return out

    def unary(self, op: str) -> str:
        out = self._name(op.lower())
        self.nodes.append(self.helper.make_node(op, [self.cur], [out]))
        self.cur = out
        return out

    def mul(self, other: str) -> str:
        out = self._name("mul")
        self.nodes.append(self.helper.make_node("Mul", [other, self.cur], [out]))
        self.cur = out
        return out

    def maxpool(self, k: int = 3, stride: int = 2) -> str:
        n, c, h, w = self.shape
        out = self._name("maxpool")
        self.nodes.append(
            self.helper.make_node("MaxPool", [self.cur], [out], kernel_shape=[k, k], strides=[stride, stride],
                                  pads=[k // 2] * 4)
        )  # fmt: skip
        self.cur = out
        self.shape = (n, c, (h + 2 * (k // 2) - k) // stride + 1, (w + 2 * (k // 2) - k) // stride + 1)
        return out

    def squeeze_excite(self, reduced: int, gate: str = "HardSigmoid") -> str:
        """x * gate(conv(relu(conv(GlobalAveragePool(x))))): the SE block of MobileNetV3 / EfficientNet."""
        x, shape = self.cur, self.shape
        self.unary("GlobalAveragePool")
        self.shape = (shape[0], shape[1], 1, 1)
        act, self.activation = self.activation, "Relu"
        self.conv(reduced, 1, 1)
        self.conv(shape[1], 1, 1, relu=False)
        self.activation = act
        self.unary(gate)
        self.shape = shape
        return self.mul(x)

    def concat(self, branches: list[tuple[str, tuple[int, ...]]]) -> str:
        out = self._name("concat")
        self.nodes.append(self.helper.make_node("Concat", [b for b, _ in branches], [out], axis=1))
        n, _, h, w = branches[0][1]
        self.cur, self.shape = out, (n, sum(s[1] for _, s in branches), h, w)
        return out

    def add(self, other: str, relu: bool = False) -> str:
        out = self._name("add")
        self.nodes.append(self.helper.make_node("Add", [self.cur, other], [out]))
        self.cur = out
        if relu:
            self.activate()
        return out

    def head(self, classes: int = 10, reduce_mean: bool = False, hidden: int = 0) -> None:
        """Global pooling (GlobalAveragePool, or ReduceMean as torch exports it), an optional 1x1 conv +
        activation (MobileNetV3's head), Flatten, Gemm."""
        if reduce_mean:
            out = self._name("mean")
            self.nodes.append(self.helper.make_node("ReduceMean", [self.cur], [out], axes=[2, 3], keepdims=1))
            self.cur = out
        else:
            self.unary("GlobalAveragePool")
        self.shape = (self.shape[0], self.shape[1], 1, 1)
        if hidden:
            self.conv(hidden, 1, 1)
        flat = self._name("flat")
        self.nodes.append(self.helper.make_node("Flatten", [self.cur], [flat]))
        c = self.shape[1]
        weight = self.rng.standard_normal((c, classes)) * 0.1
        out = self._name("logits")
        self.nodes.append(
            self.helper.make_node("Gemm", [flat, self._const(weight), self._const(np.zeros(classes))], [out])
        )
        self.cur = out
        self.shape = (self.shape[0], classes)

    def model(self) -> Any:
        h = self.helper
        graph = h.make_graph(
            self.nodes, "calib", self.inputs, [h.make_tensor_value_info(self.cur, self.tp.FLOAT, list(self.shape))],
            initializer=self.inits,
        )  # fmt: skip
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", OPSET)])
        model.ir_version = 8
        return model


def random_network(rng: np.random.Generator, max_macs: float = 300e6, family: str = "random") -> Any:
    """A random CNN: a stem, 2-10 blocks of a random kind and width, a pooled linear head.

    Spans what the cost model is asked about (8-256 channels, some off the usual multiples; 16-128
    pixels; RGB and grey inputs; plain, 1x1, separable, inverted-residual and residual blocks; ReLU or
    ReLU6), and is
    redrawn until it has at most ``max_macs`` multiply-accumulates, so calibration stays quick.
    ``family`` other than "random" draws one of the architecture families instead (see the module).
    """
    if family != "random":
        return _FAMILY_BUILDERS[family](rng, max_macs)
    widths = WIDTHS
    while True:
        res = int(rng.choice((16, 24, 32, 48, 64, 96, 128)))
        cin = int(rng.choice((1, 3, 3, 4, 8)))
        g = _Graph((1, cin, res, res), rng)
        g.activation = str(rng.choice(("Relu", "Clip")))
        g.conv(int(rng.choice(widths[:7])), 3, int(rng.choice((1, 2))))
        for _ in range(int(rng.integers(2, 11))):
            kind = rng.choice(("plain", "pointwise", "separable", "inverted", "residual"))
            stride = 2 if g.shape[2] >= 8 and rng.random() < 0.35 else 1
            cout = int(rng.choice(widths))
            if kind == "plain":
                g.conv(cout, 3, stride)
            elif kind == "pointwise":
                g.conv(cout, 1, 1)
            elif kind == "separable":
                g.conv(0, 3, stride, depthwise=True)
                g.conv(cout, 1, 1)
            elif kind == "inverted":
                skip, c = g.cur, g.shape[1]
                g.conv(c * int(rng.choice((2, 4, 6))), 1, 1)
                g.conv(0, 3, 1, depthwise=True)
                g.conv(c, 1, 1, relu=False)
                g.add(skip)
            else:
                skip, c = g.cur, g.shape[1]
                g.conv(c, 3, 1)
                g.conv(c, 3, 1, relu=False)
                g.add(skip, relu=True)
        g.head()
        if g.macs <= max_macs:
            return g.model()


def reference_network() -> Any:
    """The network calibration's stability probe times at its start, middle and end (a fixed draw of
    ``random_network``, <= 30M MACs), and what the host-speed probes in benchmarks/ time to compare with it."""
    return random_network(np.random.default_rng(1234), max_macs=30e6)


def throughput_network(precision_hint: str, rng: np.random.Generator) -> tuple[Any, int]:
    """One long-reduction 3x3 conv (reduction 576): close to the best a CPU GEMM reaches. (model, MACs)"""
    g = _Graph((1, 64, 56, 56), rng)
    g.conv(64, 3, 1, relu=False)
    return g.model(), 64 * 56 * 56 * 64 * 9


def bandwidth_network(rng: np.random.Generator, elements: int = 4 * 2**20) -> tuple[Any, int]:
    """x + x on a 16 MB tensor: two reads and a write per element, far beyond the caches. (model, bytes)"""
    g = _Graph((1, elements // 1024, 32, 32), rng)
    g.add("x")
    return g.model(), 3 * elements * 4


def overhead_network(rng: np.random.Generator, ops: int) -> Any:
    """``ops`` Relu/Neg kernels on an 8-element tensor: what they cost is dispatch alone."""
    g = _Graph((1, 8, 1, 1), rng)
    for i in range(ops):
        g.unary("Neg" if i % 2 else "Relu")
    return g.model()


def _stem(rng: np.random.Generator, activations: tuple[str, ...]) -> _Graph:
    res = int(rng.choice((32, 48, 64, 96, 128)))
    g = _Graph((1, int(rng.choice((1, 3, 3, 3))), res, res), rng)
    g.activation = str(rng.choice(activations))
    g.conv(int(rng.choice((16, 24, 32, 48, 64))), 3, int(rng.choice((1, 2))))
    return g


def resnet_network(rng: np.random.Generator, max_macs: float = 300e6) -> Any:
    """Basic (3x3, 3x3) or bottleneck (1x1, 3x3, 1x1 x4) residual stages, projection shortcuts."""
    while True:
        g = _stem(rng, ("Relu",))
        if rng.random() < 0.5 and g.shape[2] >= 32:
            g.maxpool()
        bottleneck = rng.random() < 0.4
        width = g.shape[1]
        for stage in range(int(rng.integers(2, 5))):
            for block in range(int(rng.integers(1, 3))):
                stride = 2 if block == 0 and stage > 0 and g.shape[2] >= 8 else 1
                skip, in_shape = g.cur, g.shape
                cout = width * 4 if bottleneck else width
                if bottleneck:
                    g.conv(width, 1, 1)
                    g.conv(width, 3, stride)
                    g.conv(cout, 1, 1, relu=False)
                else:
                    g.conv(width, 3, stride)
                    g.conv(width, 3, 1, relu=False)
                if stride != 1 or in_shape[1] != cout:  # projection shortcut: 1x1 conv at the block's stride
                    main, main_shape = g.cur, g.shape
                    g.cur, g.shape = skip, in_shape
                    g.conv(cout, 1, stride, relu=False)
                    skip, g.cur, g.shape = g.cur, main, main_shape
                g.add(skip, relu=True)
            width = int(min(256, width * 2))
        g.head(reduce_mean=bool(rng.random() < 0.5))
        if g.macs <= max_macs:
            return g.model()


def mobile_network(rng: np.random.Generator, max_macs: float = 300e6) -> Any:
    """Inverted residuals (expand 1x1, depthwise 3x3 or 5x5, SE, project 1x1) with hardswish / SiLU / ReLU6."""
    while True:
        g = _stem(rng, ("HardSwish", "SiLU", "Clip", "Relu"))
        for _ in range(int(rng.integers(2, 9))):
            skip, c = g.cur, g.shape[1]
            stride = 2 if g.shape[2] >= 8 and rng.random() < 0.35 else 1
            cout = int(rng.choice((16, 24, 32, 40, 48, 64, 80, 96, 112)))
            expand = c * int(rng.choice((1, 3, 4, 6)))
            if expand != c:
                g.conv(expand, 1, 1)
            g.conv(0, int(rng.choice((3, 3, 5))), stride, depthwise=True)
            if rng.random() < 0.6:
                g.squeeze_excite(max(8, expand // 4), gate=str(rng.choice(("HardSigmoid", "Sigmoid"))))
            g.conv(cout, 1, 1, relu=False)
            if stride == 1 and cout == c:
                g.add(skip)
        g.conv(int(rng.choice((64, 128, 192))), 1, 1)
        g.head(reduce_mean=bool(rng.random() < 0.5), hidden=int(rng.choice((0, 128, 256))))
        if g.macs <= max_macs:
            return g.model()


def grouped_network(rng: np.random.Generator, max_macs: float = 300e6) -> Any:
    """ResNeXt bottlenecks (grouped 3x3) and Inception-style branches (1x1 | 3x3 | pool-1x1) joined by Concat."""
    while True:
        g = _stem(rng, ("Relu", "Relu", "SiLU"))
        for _ in range(int(rng.integers(2, 7))):
            c = g.shape[1]
            if rng.random() < 0.5:  # grouped bottleneck, identity shortcut
                skip = g.cur
                groups = int(rng.choice((2, 4, 8)))
                mid = max(groups, (c // 2) // groups * groups)
                g.conv(mid, 1, 1)
                g.conv(mid, 3, 1, groups=groups)
                g.conv(c, 1, 1, relu=False)
                g.add(skip, relu=True)
            else:  # inception-style branches, then optional downsampling
                x, shape = g.cur, g.shape
                branches = []
                for kind in ("1x1", "3x3", "pool"):
                    g.cur, g.shape = x, shape
                    width = int(rng.choice((8, 16, 24, 32, 48)))
                    if kind == "3x3":
                        g.conv(width, 1, 1)
                        g.conv(width, 3, 1)
                    elif kind == "pool":
                        g.maxpool(3, 1)
                        g.conv(width, 1, 1)
                    else:
                        g.conv(width, 1, 1)
                    branches.append((g.cur, g.shape))
                g.concat(branches)
                if g.shape[2] >= 16 and rng.random() < 0.5:
                    g.maxpool()
        g.head(reduce_mean=bool(rng.random() < 0.5))
        if g.macs <= max_macs:
            return g.model()


_FAMILY_BUILDERS = {"resnet": resnet_network, "mobile": mobile_network, "grouped": grouped_network}
