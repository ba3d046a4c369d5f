"""ONNX Runtime for correctness: predictions, parity with PyTorch, accuracy, and what ORT executes.

Functions over a dataset split take an iterable of batches (``x`` or ``(x, y)``), so a streaming
loader works as well as an in-memory tensor (which is cut into batches of 256).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from hwkd.errors import StageError
from hwkd.onnx.export import _first_line, _set_eval


def _session(path: str | Path, threads: int = 0, optimized_path: str | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # errors only: the optimizer warns about hardware-specific NCHWc graphs
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    if optimized_path is not None:
        opts.optimized_model_filepath = optimized_path
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise StageError(f"ONNX Runtime could not load {str(path)!r}: {_first_line(exc)}") from exc


# A prediction is a near tie when the reference model's top-1/top-2 logit margin is below this share
# of the typical logit range (the median over the judged images of max - min logit). INT8 rounding
# may flip those without anything being wrong; parity is judged strictly on the rest.
NEAR_TIE = 0.05


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def batches(data: Any, batch_size: int = 256):
    """Yield batches from ``data``: a tensor/array (or an ``(x, y)`` pair of them) is cut into
    ``batch_size`` pieces; anything else is taken as an iterable of batches already (a DataLoader)."""
    if isinstance(data, tuple) and len(data) == 2 and all(hasattr(d, "shape") for d in data):
        x, y = data
        for i in range(0, len(x), batch_size):
            yield x[i : i + batch_size], y[i : i + batch_size]
    elif hasattr(data, "shape"):
        for i in range(0, len(data), batch_size):
            yield data[i : i + batch_size]
    else:
        yield from data


def _x(batch: Any) -> Any:
    return batch[0] if isinstance(batch, tuple | list) else batch


def onnx_predict(path: str | Path, x: Any, batch_size: int = 256) -> np.ndarray:
    """Logits of the ONNX model at ``path`` on ``x`` (a tensor/array, NCHW, or an iterable of batches
    ``x`` / ``(x, y)``), with ORT on the CPU."""
    session = _session(path)
    in_name = session.get_inputs()[0].name
    outs = [session.run(None, {in_name: _numpy(_x(b))})[0] for b in batches(x, batch_size)]
    if not outs or sum(len(o) for o in outs) == 0:
        raise StageError("onnx_predict got an empty input.")
    return np.concatenate(outs, axis=0)


def _torch_predict(model: Any, x: Any, batch_size: int = 256) -> np.ndarray:
    import torch

    _set_eval(model)
    with torch.no_grad():
        outs = [model(torch.as_tensor(_x(b), dtype=torch.float32)).detach().cpu() for b in batches(x, batch_size)]
    return torch.cat(outs).numpy().astype(np.float32)


def near_ties(ref: np.ndarray, tie: float = NEAR_TIE) -> tuple[np.ndarray, float]:
    """(mask of near-tie rows of the reference logits ``ref``, the logit scale they are relative to)."""
    if ref.shape[1] < 2:
        return np.zeros(len(ref), dtype=bool), 0.0
    top2 = np.sort(ref, axis=1)[:, -2:]
    scale = float(np.median(ref.max(axis=1) - ref.min(axis=1)))
    return (top2[:, 1] - top2[:, 0]) < tie * scale, scale


def parity(torch_model: Any, onnx_path: str | Path, x: Any) -> dict[str, float]:
    """Compare PyTorch (the reference) and ONNX Runtime on ``x`` (tensor or iterable of batches).

    ``top1_agreement`` is over all images; ``clear_top1_agreement`` over the images where the
    reference has a clear answer (not a near tie, see ``NEAR_TIE``): the figure export judges.
    """
    ref = _torch_predict(torch_model, x)
    got = onnx_predict(onnx_path, x)
    if ref.shape != got.shape:
        raise StageError(
            f"ONNX output shape {got.shape} differs from PyTorch's {ref.shape} for {str(onnx_path)!r}."
        )
    diff = np.abs(ref - got)
    disagree = ref.argmax(1) != got.argmax(1)
    tie, scale = near_ties(ref)
    clear = ~tie
    return {
        "top1_agreement": float(1.0 - disagree.mean()),
        "clear_top1_agreement": float(1.0 - disagree[clear].mean()) if clear.any() else float(1.0 - disagree.mean()),
        "clear_samples": int(clear.sum()),
        "near_tie_rule": f"top-1/top-2 margin < {NEAR_TIE:g} x median logit range ({NEAR_TIE * scale:.4g})",
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "samples": int(len(ref)),
        "disagreements": int(disagree.sum()),
        "near_tie_disagreements": int((disagree & tie).sum()),
    }


def accuracy(onnx_path: str | Path, x: Any, y: Any = None) -> float:
    """Top-1 accuracy of the ONNX model on ``(x, y)`` tensors, or on an iterable of ``(x, y)`` batches
    passed as ``x`` alone."""
    data = (x, y) if y is not None else x
    session = _session(onnx_path)
    in_name = session.get_inputs()[0].name
    right = total = 0
    for xb, yb in batches(data):
        logits = session.run(None, {in_name: _numpy(xb)})[0]
        yb = yb.detach().cpu().numpy() if hasattr(yb, "detach") else np.asarray(yb)
        right += int((logits.argmax(1) == yb.reshape(-1)).sum())
        total += len(yb)
    return right / total if total else float("nan")


def _is_integer_op(op_type: str) -> bool:
    return op_type.startswith("QLinear") or op_type.endswith("Integer") or op_type.startswith("QGemm")


def count_quant_nodes(path: str | Path) -> dict[str, int]:
    """Q/DQ and integer-kernel node counts in the graph as exported (before ORT optimizes it)."""
    import onnx

    ops = Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)
    return {
        "QuantizeLinear": ops.get("QuantizeLinear", 0),
        "DequantizeLinear": ops.get("DequantizeLinear", 0),
        "integer_ops": sum(c for op, c in ops.items() if _is_integer_op(op)),
        "total_nodes": sum(ops.values()),
    }


def ort_executed_ops(path: str | Path) -> Counter:
    """Op types of the graph ORT really runs (after its optimizer), e.g. QLinearConv for INT8 models.

    The exported graph holds QuantizeLinear/Conv/DequantizeLinear; ORT fuses those into integer
    kernels only where it can, so reports should show this, not the exported graph.
    """
    import onnx

    with tempfile.TemporaryDirectory(prefix="hwkd-ort-") as tmp:
        optimized = Path(tmp) / "optimized.onnx"
        _session(path, optimized_path=str(optimized))
        graph = onnx.load(str(optimized), load_external_data=False).graph
        return Counter(n.op_type for n in graph.node)



# Ops that compute in float when they appear in ORT's optimized graph (an INT8 model should have none
# of the heavy ones: they are the "FP32 islands" a Q/DQ placement regression leaves behind).
FLOAT_COMPUTE = ("Conv", "FusedConv", "NchwcConv", "Add", "Mul", "Gemm", "FusedGemm", "MatMul", "FusedMatMul", "Sigmoid")


def executed_summary(path: str | Path) -> dict[str, Any]:
    """What ORT runs for ``path``: every op type's count, integer kernels vs FP32 compute, Transposes.

    Goes into report.json / report.md for every INT8 model, so a placement regression shows.
    """
    ops = ort_executed_ops(path)
    return {
        "ops": dict(ops.most_common()),
        "integer_kernels": sum(c for op, c in ops.items() if _is_integer_op(op)),
        "float_compute": {op: ops[op] for op in FLOAT_COMPUTE if ops.get(op)},
        "transpose": ops.get("Transpose", 0),
    }
