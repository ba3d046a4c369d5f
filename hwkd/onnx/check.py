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


def _numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.ascontiguousarray(x, dtype=np.float32)


def onnx_predict(path: str | Path, x: Any, batch_size: int = 256) -> np.ndarray:
    """Logits of the ONNX model at ``path`` on ``x`` (array or tensor, NCHW), with ORT on the CPU."""
    session = _session(path)
    in_name = session.get_inputs()[0].name
    x = _numpy(x)
    if len(x) == 0:
        raise StageError("onnx_predict got an empty input.")
    outs = [session.run(None, {in_name: x[i : i + batch_size]})[0] for i in range(0, len(x), batch_size)]
    return np.concatenate(outs, axis=0)


def _torch_predict(model: Any, x: Any, batch_size: int = 256) -> np.ndarray:
    import torch

    _set_eval(model)
    x = torch.as_tensor(x, dtype=torch.float32)
    with torch.no_grad():
        outs = [model(x[i : i + batch_size]).detach().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(outs).numpy().astype(np.float32)


def parity(torch_model: Any, onnx_path: str | Path, x: Any) -> dict[str, float]:
    """Compare PyTorch and ONNX Runtime on ``x``: top-1 agreement (fraction) and logit differences."""
    ref = _torch_predict(torch_model, x)
    got = onnx_predict(onnx_path, x)
    if ref.shape != got.shape:
        raise StageError(
            f"ONNX output shape {got.shape} differs from PyTorch's {ref.shape} for {str(onnx_path)!r}."
        )
    diff = np.abs(ref - got)
    max_diff = float(diff.max())
    disagree = ref.argmax(1) != got.argmax(1)
    # A disagreement where PyTorch's top-1/top-2 margin is within the logit error is numerical
    # (INT8 rounding on a near tie), not a broken graph; reports show how many there were.
    top2 = np.sort(ref, axis=1)[:, -2:] if ref.shape[1] > 1 else np.concatenate([ref, ref], axis=1)
    near_tie = (top2[:, 1] - top2[:, 0]) <= 2 * max_diff
    return {
        "top1_agreement": float(1.0 - disagree.mean()),
        "max_abs_diff": max_diff,
        "mean_abs_diff": float(diff.mean()),
        "samples": int(len(ref)),
        "disagreements": int(disagree.sum()),
        "near_tie_disagreements": int((disagree & near_tie).sum()),
    }


def accuracy(onnx_path: str | Path, x: Any, y: Any) -> float:
    """Top-1 accuracy of the ONNX model on (x, y)."""
    logits = onnx_predict(onnx_path, x)
    y = y.detach().cpu().numpy() if hasattr(y, "detach") else np.asarray(y)
    return float(np.mean(logits.argmax(1) == y.reshape(-1)))


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

