"""ONNX side of the cost model: trace any ONNX graph into hardware-free ``LayerWork`` records.

Shape inference gives every tensor's size; MACs come from Conv / MatMul / Gemm nodes; the ops ONNX Runtime
folds away (BN and activations after a conv, Q/DQ pairs around QLinear kernels, views) are marked fused or
skipped, so the records price like the graph the runtime really executes.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any

from hwkd.errors import ModelError
from hwkd.hardware.cost import LayerWork

_MAC_OPS = {
    "Conv",
    "ConvInteger",
    "QLinearConv",
    "ConvTranspose",
    "MatMul",
    "MatMulInteger",
    "QLinearMatMul",
    "Gemm",
}
# Weight input slots per op, counted as parameters when they resolve to a constant.
_WEIGHT_SLOTS = {
    "Conv": (1, 2), "ConvTranspose": (1, 2), "ConvInteger": (1,), "QLinearConv": (3, 8),
    "MatMul": (0, 1), "MatMulInteger": (0, 1), "QLinearMatMul": (0, 3), "Gemm": (0, 1, 2),
    "BatchNormalization": (1, 2), "LayerNormalization": (1, 2), "InstanceNormalization": (1, 2),
    "GroupNormalization": (1, 2), "PRelu": (1,), "Add": (0, 1), "Mul": (0, 1), "Sub": (0, 1), "Div": (0, 1),
    "Expand": (0,),  # a class token expanded to the batch
}  # fmt: skip
# Ops that cost nothing at run time: views.
_FREE_OPS = {
    "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Constant", "Shape", "Size", "Dropout",
}  # fmt: skip
# Views ONNX Runtime's QDQ propagation moves a QuantizeLinear before (and a DequantizeLinear after).
_VIEW_OPS = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice"}
# Ops ONNX Runtime's QDQ transformer can turn into QLinear kernels (or run on int8 directly) when they form a
# QDQ node unit: inputs from DequantizeLinear, output to QuantizeLinear (trace_onnx's integer_unit). A Q/DQ
# node next to anything else (a graph input or output, a ReduceMean, a float bias Add) really runs.
_QDQ_FOLDING = {
    "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Mul", "MaxPool", "AveragePool", "GlobalAveragePool",
    "Concat", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Resize", "Sigmoid", "LeakyRelu",
    "Relu", "Clip", "Identity", "QuantizeLinear", "DequantizeLinear", "Softmax",
}  # fmt: skip
_CONV_WEIGHT_SLOT = {"Conv": 1, "ConvInteger": 1, "ConvTranspose": 1, "QLinearConv": 3}
# Ops ONNX Runtime folds into a preceding Conv/Gemm (ConvBNFusion, ConvActivationFusion, MatMulAddFusion).
_FUSABLE_OPS = {"BatchNormalization", "Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish"}
# What folds into the op before it when that is a conv / gemm (or already folded): the above, and a bias-like Add.
EPILOGUE_OPS = _FUSABLE_OPS | {"Add"}
_FUSE_PRODUCERS = {"Conv", "QLinearConv", "Gemm", "MatMul"}
# Ops that pass a constant through unchanged (for finding a weight behind DequantizeLinear etc.).
_CONST_PASS = {"DequantizeLinear", "Cast", "Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze"}
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger", "MatMulInteger"}


def trace_onnx(path_or_model: Any) -> tuple[list[LayerWork], int, str]:
    """(layers, parameter count, detected precision) of an ONNX graph at batch 1."""
    import onnx

    model = _fixed_batch(_load_onnx(path_or_model))
    try:
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:  # onnx raises several internal error types
        raise ModelError(
            f"ONNX shape inference failed: {exc}", "Export the model with static shapes."
        ) from None
    graph = model.graph
    shapes = _onnx_shapes(graph)
    consts = {init.name: tuple(init.dims) for init in graph.initializer}
    const_types = {init.name: init.data_type for init in graph.initializer}
    producer, consumers, consumer_nodes = {}, defaultdict(int), defaultdict(list)
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    consts[node.output[0]] = tuple(attr.t.dims)
                    const_types[node.output[0]] = attr.t.data_type
        for name in node.output:
            producer[name] = node
        for name in node.input:
            consumers[name] += 1
            consumer_nodes[name].append(node)
    graph_outputs = {o.name for o in graph.output}

    def upstream(name: str) -> Any:
        """The node behind ``name`` through views: ORT's QDQ propagation moves a Q before a Reshape / Transpose."""
        node = producer.get(name)
        while node is not None and node.op_type in _VIEW_OPS and consumers[node.output[0]] == 1:
            node = producer.get(node.input[0])
        return node

    def from_dq(node: Any) -> bool:
        """Every activation input of ``node`` comes from a DequantizeLinear: ORT can run it on the int8 values."""
        inputs = [n for n in node.input if n and const_source(n) is None]
        return bool(inputs) and all((src := upstream(n)) is not None and src.op_type == "DequantizeLinear"
                                    for n in inputs)  # fmt: skip

    def to_q(node: Any) -> bool:
        """``node``'s output is quantized next (through views, and a Relu / Clip, which ORT drops before a Q)."""
        out = node.output[0]
        nxt = consumer_nodes[out] if out not in graph_outputs else []
        if len(nxt) == 1 and nxt[0].op_type in ("Relu", "Clip", *_VIEW_OPS):
            return to_q(nxt[0])
        return bool(nxt) and all(c.op_type == "QuantizeLinear" for c in nxt)

    def integer_unit(node: Any) -> bool:
        """ORT runs ``node`` as an integer kernel (a QDQ node unit): its inputs dequantized, and its output
        quantized, or a MatMul / Gemm / Conv reading int8 with a float output (MatMulIntegerToFloat)."""
        if node.op_type not in _QDQ_FOLDING or not from_dq(node):
            return False
        if node.op_type == "QuantizeLinear":  # DQ -> views -> Q runs the views on int8; a bare DQ -> Q pair
            direct = producer.get(node.input[0])
            return (direct is not None and direct.op_type in _VIEW_OPS) or pair_removed(upstream(node.input[0]))
        return node.op_type in ("MatMul", "Gemm", "Conv") or to_q(node)

    def pair_removed(dq: Any) -> bool:
        """A Q -> DQ -> Q chain whose DQ feeds only that Q: DoubleQDQPairsRemover drops the middle DQ -> Q (the
        first Q takes the second's scale); a DQ with other consumers keeps it, and the pair requantizes."""
        src = producer.get(dq.input[0])
        return src is not None and src.op_type == "QuantizeLinear" and consumers[dq.output[0]] == 1

    def dq_copies(node: Any, via: str) -> list[int]:
        """The sizes of the DequantizeLinear copies ORT runs for ``node``, a consumer reading ``via``: none where
        ``node`` runs as an integer kernel; a view passes the DQ on to its own consumers (DQ propagation), so the
        copy converts the view's output."""
        out = node.output[0]
        if node.op_type in _VIEW_OPS and out not in graph_outputs:
            return [size for c in consumer_nodes[out] for size in dq_copies(c, out)]
        return [] if integer_unit(node) else [_numel(shapes.get(via))]

    def qdq_runs(node: Any, data_input: str) -> list[int]:
        """The sizes of the copies of this QuantizeLinear / DequantizeLinear ONNX Runtime runs (none: folded into
        its neighbours): a Q folds into an integer producer; a DQ is copied per consumer
        (EnsureUniqueDQForNodeUnit) and folds into each consumer that runs as an integer kernel."""
        size = _numel(shapes.get(data_input))
        if node.op_type == "QuantizeLinear":
            src, views = producer.get(data_input), 0
            while src is not None and src.op_type in ("Relu", "Clip", *_VIEW_OPS) and consumers[src.output[0]] == 1:
                views += src.op_type in _VIEW_OPS  # ClipQuantFusion drops a Relu / Clip; a Q moves before views
                src = producer.get(src.input[0])
            if src is not None and src.op_type == "DequantizeLinear":  # DQ -> views -> Q: the views run on int8
                return [] if views or pair_removed(src) else [size]
            return [] if src is not None and integer_unit(src) else [size]
        out = node.output[0]
        return [s for c in consumer_nodes[out] for s in dq_copies(c, out)] + ([size] * (out in graph_outputs))

    def const_source(name: str) -> str | None:
        """The initializer/Constant behind ``name`` through pass-through ops, or None for activations."""
        seen = 0
        while name not in consts and seen < 16:
            node = producer.get(name)
            if node is None or node.op_type not in _CONST_PASS or not node.input:
                return None
            name, seen = node.input[0], seen + 1
        return name if name in consts else None

    works, counted, fused_outputs = [], set(), set()
    for index, node in enumerate(graph.node):
        data_inputs = [n for n in node.input if n and const_source(n) is None]
        if node.op_type == "DequantizeLinear" and not data_inputs:
            # a quantized constant (a LayerNorm's weight in ORT's static QDQ): ORT does not fold a DQ, and runs it
            # wherever its consumer runs in float
            copies = [size for c in consumer_nodes[node.output[0]] for size in dq_copies(c, node.output[0])]
        elif node.op_type in _FREE_OPS or not data_inputs:
            continue  # views, and nodes the runtime constant-folds at load time
        else:
            copies = qdq_runs(node, data_inputs[0]) if node.op_type in ("QuantizeLinear", "DequantizeLinear") else None
        if copies == []:
            continue
        params = 0
        for slot in _WEIGHT_SLOTS.get(node.op_type, ()):
            source = const_source(node.input[slot]) if slot < len(node.input) and node.input[slot] else None
            numel = math.prod(consts[source]) if source is not None else 0
            elementwise = node.op_type in ("Add", "Mul", "Sub", "Div")
            if source is not None and source not in counted and not (elementwise and numel <= 1):
                counted.add(source)
                params += numel
        macs, channels = _onnx_macs(node, shapes, consts, const_source)
        kernel, groups, in_channels = _conv_geometry(node, shapes, consts, const_source)
        src = producer.get(data_inputs[0]) if data_inputs else None
        fused = (
            node.op_type in EPILOGUE_OPS
            and src is not None
            and (src.op_type in _FUSE_PRODUCERS or src.output[0] in fused_outputs)
            and not _batched_matmul(src, shapes)
            and consumers[data_inputs[0]] == 1
            and data_inputs[0] not in graph_outputs
            and len(data_inputs) == 1
        )
        # x * Sigmoid(x) (SiLU / Swish): ORT runs the pair as one QuickGelu kernel, the Mul its epilogue
        fused = fused or (node.op_type == "Mul" and len(data_inputs) == 2 and any(
            (s := producer.get(a)) is not None and s.op_type == "Sigmoid" and s.input[0] == b
            for a, b in (data_inputs, data_inputs[::-1])
        ))  # fmt: skip
        if fused:
            fused_outputs.update(node.output)
        name = node.name or f"{node.op_type}_{index}"
        act_in = sum(_numel(shapes.get(n)) for n in data_inputs)
        act_out = sum(_numel(shapes.get(n)) for n in node.output if n)
        works += [
            LayerWork(
                name=name if copy == 0 else f"{name}#{copy + 1}",  # a DQ's copies, one per consumer
                op=node.op_type,
                macs=macs,
                params=params,
                act_in=act_in if size is None else size,
                act_out=act_out if size is None else size,
                channels=channels,
                fused=fused,
                kernel=kernel,
                groups=groups,
                in_channels=in_channels,
            )
            for copy, size in enumerate(copies or [None])
        ]
    total_params = sum(w.params for w in works)
    return works, total_params, _detect_precision(graph, const_types, const_source)


def _batched_matmul(node: Any, shapes: dict) -> bool:
    """A MatMul with a rank > 2 output (a linear layer on tokens): ORT fuses MatMul + Add into a Gemm only in 2-D,
    so its bias Add and activation run as nodes of their own (a ViT's optimised graph keeps them, FP32 and INT8)."""
    return node.op_type == "MatMul" and len(shapes.get(node.output[0]) or ()) > 2


def _load_onnx(path_or_model: Any) -> Any:
    import onnx

    if isinstance(path_or_model, onnx.ModelProto):
        copy = onnx.ModelProto()
        copy.CopyFrom(path_or_model)
        return copy
    path = os.fspath(path_or_model)
    try:
        return onnx.load(path)
    except FileNotFoundError:
        raise ModelError(f"ONNX file {path} does not exist.") from None
    except Exception as exc:
        raise ModelError(f"Cannot read ONNX file {path}: {exc}", "Is it an ONNX model?") from None


def _fixed_batch(model: Any) -> Any:
    """Pin a dynamic leading (batch) dimension of every graph input to 1; other dynamic dims are errors.

    The exporter's own value_info and outputs name the batch too (``batch``); shape inference keeps a
    symbolic dimension it finds there, so every dimension with the inputs' batch symbol is pinned as well
    (a timm ConvNeXt's classifier Gemm otherwise kept ``[batch, 1000]`` and could not be priced)."""
    initializers = {init.name for init in model.graph.initializer}
    symbols = set()
    for value in model.graph.input:
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and dim.dim_value > 0:
                continue
            if axis == 0:
                if dim.dim_param:
                    symbols.add(dim.dim_param)
                dim.Clear()
                dim.dim_value = 1
            else:
                raise ModelError(
                    f"ONNX input {value.name!r} has a dynamic dimension {dim.dim_param or '?'!r} at axis {axis}.",
                    "The cost model needs fixed shapes beyond the batch axis; export with a fixed input size.",
                )
    for value in (*model.graph.value_info, *model.graph.output):
        for dim in value.type.tensor_type.shape.dim if value.type.HasField("tensor_type") else ():
            if dim.HasField("dim_param") and dim.dim_param in symbols:
                dim.Clear()
                dim.dim_value = 1
    return model


def _onnx_shapes(graph: Any) -> dict[str, tuple[int, ...] | None]:
    shapes = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            shapes[value.name] = None
            continue
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        shapes[value.name] = None if any(d < 0 for d in dims) else dims
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def _numel(shape: tuple[int, ...] | None) -> int:
    return math.prod(shape) if shape is not None else 0


def _onnx_macs(node: Any, shapes: dict, consts: dict, const_source) -> tuple[int, int]:
    """(MACs, output channels) of a Conv / MatMul / Gemm family node; (0, 0) for everything else."""
    op = node.op_type
    if op not in _MAC_OPS:
        return 0, 0

    def shape(slot: int) -> tuple[int, ...]:
        name = node.input[slot]
        found = shapes.get(name) or consts.get(const_source(name) or "")
        if not found:
            raise ModelError(
                f"Cannot infer the shape of {name!r} feeding {op} node {node.name!r}.",
                "Export the model with static shapes (the cost model needs them).",
            )
        return found

    out = shapes.get(node.output[0])
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        weight = shape(3 if op == "QLinearConv" else 1)
        if out is None:
            raise ModelError(f"Cannot infer the output shape of {op} node {node.name!r}.")
        return _numel(out) * math.prod(weight[1:]), weight[0]
    if op == "ConvTranspose":
        weight = shape(1)
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        return _numel(shape(0)) * math.prod(weight[1:]), weight[1] * group
    if out is None:
        raise ModelError(f"Cannot infer the output shape of {op} node {node.name!r}.")
    a = shape(0)
    if op == "Gemm":
        trans_a = next((a_.i for a_ in node.attribute if a_.name == "transA"), 0)
        k = a[0] if trans_a else a[-1]
    else:
        k = a[-1]
    return _numel(out) * k, out[-1] if out else 0


def _conv_geometry(node: Any, shapes: dict, consts: dict, const_source) -> tuple[int, int, int]:
    """(spatial kernel elements, groups, input channels per group) of a conv node; (0, 1, 0) otherwise."""
    slot = _CONV_WEIGHT_SLOT.get(node.op_type)
    if slot is None or slot >= len(node.input):
        return 0, 1, 0
    weight = shapes.get(node.input[slot]) or consts.get(const_source(node.input[slot]) or "")
    groups = next((a.i for a in node.attribute if a.name == "group"), 1)
    if not weight or len(weight) < 3:
        return 1, max(1, groups), 0
    in_per_group = weight[0] // max(1, groups) if node.op_type == "ConvTranspose" else weight[1]
    return math.prod(weight[2:]), max(1, groups), in_per_group


def _detect_precision(graph: Any, const_types: dict, const_source) -> str:
    """int8 when the graph holds quantized ops, fp16 when MAC weights are half, else fp32."""
    from onnx import TensorProto

    ops = {node.op_type for node in graph.node}
    if ops & _QUANT_OPS or any(op.startswith("QLinear") for op in ops):
        return "int8"
    for node in graph.node:
        if node.op_type in _MAC_OPS and len(node.input) > 1:
            source = const_source(node.input[1])
            if source is not None and const_types.get(source) == TensorProto.FLOAT16:
                return "fp16"
    return "fp32"
