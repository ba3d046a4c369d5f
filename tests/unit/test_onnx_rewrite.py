"""hwkd.onnx.rewrite: ReduceMean over H, W becomes GlobalAveragePool only where that is the same math."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from hwkd.onnx import rewrite


def _reduce_mean_model(axes, keepdims=1, rank=4):
    shape = [2, 3, 5, 7, 4][:rank]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    kept = [1 if (i in [a % rank for a in axes]) else d for i, d in enumerate(shape)]
    out = kept if keepdims else [d for i, d in enumerate(shape) if i not in [a % rank for a in axes]]
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, out)
    axes_init = numpy_helper.from_array(np.array(axes, dtype=np.int64), "axes")
    node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=keepdims)
    graph = helper.make_graph([node], "g", [x], [y], [axes_init])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), shape


def _run(model, x):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


@pytest.mark.parametrize("axes", [[2, 3], [-2, -1], [3, 2]])
def test_spatial_mean_becomes_global_average_pool_with_equal_output(axes):
    model, shape = _reduce_mean_model(axes)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    before = _run(model, x)
    assert rewrite.global_average_pool(model) == 1
    assert [n.op_type for n in model.graph.node] == ["GlobalAveragePool"]
    assert not model.graph.initializer, "the unused axes tensor is dropped"
    onnx.checker.check_model(model)
    np.testing.assert_allclose(_run(model, x), before, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("axes", "keepdims", "rank"),
    [([2, 3], 0, 4), ([1], 1, 4), ([1, 2, 3], 1, 4), ([2, 3], 1, 5)],
    ids=["keepdims0", "channel-axis", "three-axes", "rank5"],
)
def test_other_reductions_are_left_alone(axes, keepdims, rank):
    model, _ = _reduce_mean_model(axes, keepdims, rank)
    assert rewrite.global_average_pool(model) == 0
    assert [n.op_type for n in model.graph.node] == ["ReduceMean"]
