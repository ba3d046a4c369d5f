"""Small third-party-style ONNX graphs built with onnx.helper (no downloads), for `hwkd bench` tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save(graph, path):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def detector(path, channels: int = 8, seed: int = 0):
    """Detection-style: ``images [batch, 3, height, width]`` (dynamic H/W) and ``scale [batch, 2]``.

    Conv -> ReLU -> global pool -> box head, times the per-image scale: two float inputs, one with
    dynamic non-batch dimensions.
    """
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array(rng.standard_normal((channels, 3, 3, 3)).astype(np.float32), "w")
    head = numpy_helper.from_array(rng.standard_normal((channels, 2)).astype(np.float32), "head")
    nodes = [
        helper.make_node("Conv", ["images", "w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("MatMul", ["f", "head"], ["b"]),
        helper.make_node("Mul", ["b", "scale"], ["boxes"]),
    ]
    graph = helper.make_graph(
        nodes,
        "detector",
        [
            helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, "height", "width"]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, ["batch", 2]),
        ],
        [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", 2])],
        [w, head],
    )
    return _save(graph, path)


def text_classifier(path, vocab: int = 50, dim: int = 8, seed: int = 0):
    """Text-style: ``input_ids [batch, seq]`` int64 through an embedding Gather, ``attention_mask
    [batch, seq]`` int64 weighting a mean pool. Ids outside [0, vocab) make onnxruntime fail."""
    rng = np.random.default_rng(seed)
    emb = numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "emb")
    fc = numpy_helper.from_array(rng.standard_normal((dim, 3)).astype(np.float32), "fc")
    axes = numpy_helper.from_array(np.array([2], dtype=np.int64), "axes")
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axes"], ["m3"]),
        helper.make_node("Mul", ["e", "m3"], ["em"]),
        helper.make_node("ReduceSum", ["em", "one"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "fc"], ["logits"]),
    ]
    one = numpy_helper.from_array(np.array([1], dtype=np.int64), "one")
    graph = helper.make_graph(
        nodes,
        "text",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [emb, fc, axes, one],
    )
    return _save(graph, path)


def fixed_cnn(path, batch: int = 1):
    """A model with every dimension fixed (batch included)."""
    w = numpy_helper.from_array(np.ones((2, 1, 3, 3), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 2, 6, 6])],
        [w],
    )
    return _save(graph, path)
