"""ONNX export (FP32 modules and torchao INT8 GraphModules), metadata, and ONNX Runtime checks.

Every exported model has a dynamic batch dimension named ``batch``, one input ``input``, one output
``logits``, and carries ``metadata_props`` a deployer needs (hwkd version, profile, preprocessing,
labels, input shape). Files are written atomically and pass ``onnx.checker`` before they appear.

Timing lives in ``hwkd.ortbench``; this module only runs ONNX Runtime for correctness (parity,
accuracy) and to inspect which kernels the optimized graph really executes.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from hwkd.artifacts import save_with
from hwkd.errors import StageError

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
BATCH_DIM = "batch"

# Loggers that chatter during export (torchvision op registration, symbolic shapes, dynamo).
_NOISY_LOGGERS = (
    "torch.onnx",
    "torch.export",
    "torch._export",
    "torch._dynamo",
    "torch.fx.experimental.symbolic_shapes",
    "onnxscript",
)


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Silence the exporter's prints, warnings and log lines; yield what was printed (for errors)."""
    buf = io.StringIO()
    saved = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    try:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(buf),
            contextlib.redirect_stderr(buf),
        ):
            warnings.simplefilter("ignore")
            yield buf
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost ``__cause__`` (the exporter wraps the real problem in a long report)."""
    seen = set()
    while exc.__cause__ is not None and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__
    return exc


def _first_line(exc: BaseException) -> str:
    for line in str(exc).splitlines():
        line = line.strip()
        if line:
            return line[:300]
    return type(exc).__name__


def _set_eval(model: Any) -> None:
    """eval() an nn.Module; torch.export GraphModules refuse eval() and are already in eval form."""
    with contextlib.suppress(NotImplementedError):
        model.eval()


def _model_name(model: Any) -> str:
    import torch

    if isinstance(model, torch.fx.GraphModule):
        return "quantized GraphModule"
    return type(model).__name__


def set_metadata(proto, props: dict[str, str]) -> None:
    """Replace an ONNX model's ``metadata_props`` with ``props`` (all values strings)."""
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value


def export_onnx(
    model: Any,
    example_input: Any,
    path: str | Path,
    metadata: dict[str, str],
    opset: int = 18,
    *,
    name: str | None = None,
) -> Path:
    """Export ``model`` (nn.Module or torchao-converted GraphModule) to ``path`` with the dynamo exporter.

    The batch dimension is dynamic; ``metadata`` goes into ``metadata_props``. The file is checked
    with ``onnx.checker`` before it is renamed into place, so a failed export leaves nothing new at
    ``path``. Any failure is a ``StageError`` naming the model and the first line of the cause.

    Example::

        export_onnx(student, x[:1], run_dir / "model_fp32.onnx", onnx_metadata(...))
    """
    import onnx
    import torch

    path = Path(path)
    label = name or _model_name(model)
    bad = {k: v for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise StageError(
            f"ONNX metadata values must be strings; got non-strings for {sorted(map(str, bad))}."
        )
    _set_eval(model)
    x = example_input.detach().to("cpu", torch.float32)
    if x.shape[0] < 2:
        # torch.export specializes size-1 dims, which would contradict the dynamic batch dim.
        x = x.repeat(2, *([1] * (x.dim() - 1)))

    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                model,
                (x,),
                dynamo=True,
                opset_version=opset,
                dynamic_shapes=({0: torch.export.Dim(BATCH_DIM)},),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                verbose=False,
                report=False,
            )
            proto = program.model_proto
    except Exception as exc:
        cause = _root_cause(exc)
        raise StageError(
            f"ONNX export of the {label} failed: {type(cause).__name__}: {_first_line(cause)}",
            "The model must be traceable by torch.export with a dynamic batch dimension (no data-dependent "
            "Python control flow, no hard-coded batch size in reshape/view).",
        ) from exc

    _strip_debug_metadata(proto.graph)
    set_metadata(proto, {**{p.key: p.value for p in proto.metadata_props}, **metadata})

    def write(tmp: Path) -> None:
        onnx.save_model(proto, str(tmp))
        try:
            onnx.checker.check_model(str(tmp))
        except Exception as exc:  # onnx.checker.ValidationError and friends
            raise StageError(
                f"The ONNX model exported from the {label} is invalid: {_first_line(exc)}",
                "This is an exporter bug or an unsupported operator; try another opset (export.opset).",
            ) from exc

    return save_with(path, write)


def _strip_debug_metadata(graph: Any) -> None:
    """Drop the exporter's per-node/value debug props (FX node text, stack traces with local paths).

    They can be larger than a small model's weights and leak the build machine's file paths into a
    deployed artifact; the model-level ``metadata_props`` are kept.
    """
    for items in (graph.node, graph.input, graph.output, graph.value_info, graph.initializer):
        for item in items:
            if hasattr(item, "metadata_props"):
                del item.metadata_props[:]
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                _strip_debug_metadata(attr.g)
            for sub in attr.graphs:
                _strip_debug_metadata(sub)


def onnx_metadata(version: str, profile_name: str, dataset: Any) -> dict[str, str]:
    """The ``metadata_props`` every hwkd model carries; all values are strings (JSON where structured)."""
    prep = dataset.preprocessing.to_json()
    if not isinstance(prep, str):
        prep = json.dumps(prep)
    return {
        "hwkd.version": str(version),
        "hwkd.profile": str(profile_name),
        "hwkd.preprocessing": prep,
        "hwkd.labels": json.dumps([str(label) for label in dataset.labels]),
        "hwkd.input_shape": json.dumps([int(d) for d in dataset.input_shape]),
    }


def read_metadata(path: str | Path) -> dict[str, str]:
    """``metadata_props`` of an ONNX file as a plain dict (exporter keys included)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


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


def _chunks(x: Any, batch_size: int):
    """An array / tensor -> float32 NumPy chunks; an iterable of x or (x, y) batches -> its x batches."""
    if hasattr(x, "shape"):
        x = _numpy(x)
        yield from (x[i : i + batch_size] for i in range(0, len(x), batch_size))
        return
    for batch in x:
        yield _numpy(batch[0] if isinstance(batch, tuple | list) else batch)


def onnx_predict(path: str | Path, x: Any, batch_size: int = 256) -> np.ndarray:
    """Logits of the ONNX model at ``path`` on ``x`` (array or tensor, NCHW, or an iterable of
    batches such as ``dataset.eval_batches("test")``), with ORT on the CPU."""
    session = _session(path)
    in_name = session.get_inputs()[0].name
    outs = [session.run(None, {in_name: xb})[0] for xb in _chunks(x, batch_size) if len(xb)]
    if not outs:
        raise StageError("onnx_predict got an empty input.")
    return np.concatenate(outs, axis=0)


def _torch_predict(model: Any, x: Any, batch_size: int = 256) -> np.ndarray:
    import torch

    _set_eval(model)
    with torch.no_grad():
        outs = [model(torch.from_numpy(xb)).detach().cpu() for xb in _chunks(x, batch_size)]
    return torch.cat(outs).numpy().astype(np.float32)


def parity(torch_model: Any, onnx_path: str | Path, x: Any) -> dict[str, float]:
    """Compare PyTorch and ONNX Runtime on ``x`` (inputs or an iterable of batches): top-1 agreement
    (fraction) and logit differences."""
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


def accuracy(onnx_path: str | Path, x: Any, y: Any = None) -> float:
    """Top-1 accuracy of the ONNX model on (x, y), or on an iterable of (x, y) batches if ``y`` is None."""
    if y is None:  # one pass over the batches: each is decoded once
        ys: list = []

        def inputs():
            for xb, yb in x:
                ys.append(np.asarray(yb))
                yield xb

        logits = onnx_predict(onnx_path, inputs())
        y = np.concatenate(ys)
    else:
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


def model_size_mb(path: str | Path) -> float:
    """Size on disk in MiB (2**20 bytes), including an external-data file beside it if there is one."""
    path = Path(path)
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    if data.is_file():
        size += data.stat().st_size
    return size / 2**20


def convert_fp16(fp32_path: str | Path, out_path: str | Path) -> Path:
    """FP16 copy of an FP32 ONNX model for GPU execution providers (CUDA, TensorRT).

    Weights and compute are FP16; the input and output stay float32 (``keep_io_types``), so a deployer
    feeds the same tensors as to the FP32 model. The file passes ``onnx.checker`` and loads in ORT
    before it is renamed into place; metadata is kept and ``hwkd.precision`` says ``fp16``.
    """
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(str(fp32_path))
    try:
        with _quiet():
            half = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=False)
    except Exception as exc:
        raise StageError(
            f"FP16 conversion of {str(fp32_path)!r} failed: {type(exc).__name__}: {_first_line(exc)}",
            "Use --precision int8 or fp32 for this model.",
        ) from exc
    _topological_sort(half.graph)  # the converter appends its input casts after their consumers
    set_metadata(half, {**{p.key: p.value for p in model.metadata_props}, "hwkd.precision": "fp16"})

    def write(tmp: Path) -> None:
        onnx.save_model(half, str(tmp))
        try:
            onnx.checker.check_model(str(tmp))
        except Exception as exc:
            raise StageError(f"The FP16 model converted from {str(fp32_path)!r} is invalid: {_first_line(exc)}") from exc
        _session(tmp)  # it must load in ONNX Runtime (CPU EP here) before it counts as exported

    return save_with(out_path, write)


def _topological_sort(graph: Any) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (stable otherwise)."""
    available = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise StageError("The FP16 graph has a cycle or an input no node produces.")
        for node in ready:
            ordered.append(node)
            available.update(node.output)
        pending = [n for n in pending if all(n is not r for r in ready)]
    copies = [type(n)() for n in ordered]
    for copy, node in zip(copies, ordered, strict=True):
        copy.CopyFrom(node)
    del graph.node[:]
    graph.node.extend(copies)
