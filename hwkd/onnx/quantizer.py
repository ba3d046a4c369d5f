"""The PT2E quantizer hwkd uses: Q/DQ placed where ONNX Runtime's CPU EP fuses them into integer kernels.

torchao's inductor quantizers (X86InductorQuantizer, ArmInductorQuantizer) annotate for
torch.compile, which fuses a conv with a following residual add in FP32; they leave such convs'
outputs unquantized, and their pattern matcher raises on graphs that reuse one activation module
(torchvision's resnet18: ``ValueError: Input partition has more than one output node``). ONNX Runtime
wants something simpler: ``DQ -> op -> Q`` around every conv, linear, add, mul and sigmoid, as its own
``quantize_static`` writes them. This quantizer walks the ATen graph itself and annotates exactly that:

- activations: uint8, per-tensor affine, [0, 255] (U8S8 is what ORT's x86 AVX2/AVX-512 kernels are
  built for, and what every CPU EP kernel supports: depthwise QLinearConv has no int8-activation
  kernel on x86, so int8 activations left those convs in FP32 with Transposes around them);
- weights: int8 per-channel symmetric (7-bit with ``reduce_range``, against VPMADDUBSW saturation on
  x86 without VNNI);
- conv/linear (-> BatchNorm) (-> ReLU/ReLU6): inputs quantized, output quantized after the
  activation (ORT drops a ReLU/Clip that the Q's range makes redundant);
- add, mul, sigmoid: inputs and output quantized (QLinearAdd, QLinearMul, QLinearSigmoid); SiLU is
  split into ``x * sigmoid(x)`` first, so EfficientNet's activations are integer too;
- max/avg pooling: output shares the input's scale (ORT runs MaxPool on uint8 directly).

Ops it does not know stay FP32 between a DQ and a Q: correct, only slower; the export stage reports
the FP32 compute ops ORT still runs, so such a fallback is visible.
"""

from __future__ import annotations

import operator

import torch

from hwkd.errors import StageError

_CONV = ("conv1d", "conv2d", "linear")
_BATCHNORM = ("batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_no_training")
_ACTIVATIONS = ("relu", "relu_", "hardtanh", "hardtanh_", "relu6")
_BINARY = ("add", "add_", "mul", "mul_")
_UNARY = ("sigmoid", "sigmoid_")
_SHARED = ("max_pool2d", "avg_pool2d")
KEY = "quantization_annotation"


def _op_name(node) -> str:
    if node.op != "call_function":
        return ""
    target = node.target
    name = getattr(target, "__name__", str(target))  # aten.conv2d.default -> "conv2d.default"
    return name.split(".")[0]


def activation_spec():
    """uint8 per-tensor affine fake-quant (moving-average min/max), the ORT CPU activation type."""
    from torchao.quantization.pt2e import FusedMovingAvgObsFakeQuantize, MovingAverageMinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    return QuantizationSpec(
        dtype=torch.uint8,
        quant_min=0,
        quant_max=255,
        qscheme=torch.per_tensor_affine,
        is_dynamic=False,
        observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(
            observer=MovingAverageMinMaxObserver, eps=2**-12
        ),
    )


def weight_spec(reduce_range: bool = False):
    """int8 per-channel symmetric weights on the output-channel axis (7-bit with ``reduce_range``)."""
    from torchao.quantization.pt2e import FusedMovingAvgObsFakeQuantize, MovingAveragePerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    return QuantizationSpec(
        dtype=torch.int8,
        quant_min=-64 if reduce_range else -128,
        quant_max=63 if reduce_range else 127,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,  # output channels of conv (oc, ic, kh, kw) and linear (out, in) weights
        is_dynamic=False,
        observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver, eps=2**-12
        ),
    )


def split_silu(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``silu(x)`` as ``x * sigmoid(x)`` so a Q can sit between the two (ORT has no QLinearSiLU)."""
    count = 0
    graph = gm.graph
    for node in list(graph.nodes):
        if _op_name(node) not in ("silu", "silu_"):
            continue
        x = node.args[0]
        with graph.inserting_before(node):
            sig = graph.call_function(torch.ops.aten.sigmoid.default, (x,))
            mul = graph.call_function(torch.ops.aten.mul.Tensor, (x, sig))
        for new in (sig, mul):
            if "val" in node.meta:
                new.meta["val"] = node.meta["val"]
            for k in ("nn_module_stack", "source_fn_stack", "stack_trace"):
                if k in node.meta:
                    new.meta[k] = node.meta[k]
        node.replace_all_uses_with(mul)
        graph.erase_node(node)
        count += 1
    if count:
        graph.lint()
        gm.recompile()
    return count


class OrtQuantizer:
    """PT2E quantizer placing Q/DQ the way ONNX Runtime's QDQ fusions accept (see the module docstring).

    A torchao ``Quantizer`` in all but base class (its base class is abstract over exactly these
    methods); ``family`` is the profile's CPU family, kept for the report.
    """

    def __init__(self, family: str = "x86", reduce_range: bool = False):
        self.family = family
        self.reduce_range = reduce_range
        self.act = activation_spec()
        self.weight = weight_spec(reduce_range)

    def transform_for_annotation(self, model):
        split_silu(model)
        return model

    def validate(self, model) -> None:
        return None

    def prepare_obs_or_fq_callback(self, model, edge_or_node_to_obs_or_fq) -> None:
        return None

    def annotate(self, model):
        try:
            self._annotate(model.graph)
        except Exception as exc:  # a graph shape this walker does not expect: hwkd's bug, said clearly
            raise StageError(
                f"qat: hwkd's INT8 quantizer could not annotate the student's graph ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:200] if str(exc) else ''}).",
                "Use --quant ptq (onnxruntime static PTQ of the FP32 model), or --precision fp32.",
            ) from exc
        return model

    # -- annotation --------------------------------------------------------------------------------

    def _annotation(self, node):
        from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

        ann = node.meta.get(KEY)
        if ann is None:
            ann = node.meta[KEY] = QuantizationAnnotation(_annotated=True)
        ann._annotated = True
        return ann

    def _quantize_output(self, node, spec=None) -> None:
        ann = self._annotation(node)
        if ann.output_qspec is None:
            ann.output_qspec = spec or self.act

    def _quantize_input(self, node, arg, spec=None) -> None:
        if isinstance(arg, torch.fx.Node):
            ann = self._annotation(node)
            ann.input_qspec_map.setdefault(arg, spec or self.act)

    @staticmethod
    def _pattern_end(node, through: tuple[str, ...]):
        """Follow single-user chains through ``through`` ops (BN, then an activation)."""
        end = node
        for group in through:
            users = list(end.users)
            if len(users) == 1 and _op_name(users[0]) in group:
                end = users[0]
                if _op_name(end) in _BATCHNORM and end.target is not torch.ops.aten.batch_norm.default:
                    # the functional BN variants return a tuple; its output is getitem(0)
                    items = [u for u in end.users if u.target is operator.getitem]
                    if len(items) != 1:
                        return node
                    end = items[0]
        return end

    def _annotate(self, graph) -> None:
        from torchao.quantization.pt2e.quantizer import SharedQuantizationSpec

        for node in list(graph.nodes):
            name = _op_name(node)
            if name in _CONV:
                self._quantize_input(node, node.args[0])
                self._quantize_input(node, node.args[1], self.weight)
                self._quantize_output(self._pattern_end(node, (_BATCHNORM, _ACTIVATIONS)))
            elif name in _BINARY:
                tensors = [a for a in node.args[:2] if isinstance(a, torch.fx.Node)]
                if len(tensors) != 2 or not all(_is_float_tensor(a) for a in tensors):
                    continue  # x + 1.0, shape arithmetic: nothing ORT would run in integers
                for arg in tensors:
                    self._quantize_input(node, arg)
                self._quantize_output(self._pattern_end(node, (_ACTIVATIONS,)))
            elif name in _UNARY:
                self._quantize_input(node, node.args[0])
                self._quantize_output(node)
            elif name in _SHARED and isinstance(node.args[0], torch.fx.Node):
                self._quantize_input(node, node.args[0])
                self._quantize_output(node, SharedQuantizationSpec((node.args[0], node)))


def _is_float_tensor(node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point and val.dim() > 0

