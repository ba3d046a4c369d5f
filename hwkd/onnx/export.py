"""ONNX export of FP32 modules and torchao INT8 GraphModules, model metadata, and FP16 conversion.

Every exported model has a dynamic batch dimension named ``batch``, one input ``input``, one output
``logits``, and carries ``metadata_props`` a deployer needs (hwkd version, profile, preprocessing,
labels, input shape). Files are written atomically and pass ``onnx.checker`` before they appear.
Running the models for correctness lives in ``hwkd.onnx.check``, timing in ``hwkd.onnx.bench``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hwkd.artifacts import save_with
from hwkd.errors import StageError
from hwkd.onnx import rewrite

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


DEFAULT_OPSET = 18


def export_onnx(
    model: Any,
    example_input: Any,
    path: str | Path,
    metadata: dict[str, str],
    opset: int = DEFAULT_OPSET,
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
    rewrite.global_average_pool(proto)
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


def export_key(model: Any, opset: int = DEFAULT_OPSET) -> str:
    """What identifies an FP32 export: the weights (``weights_fingerprint``) and the opset."""
    return f"{weights_fingerprint(model)}/opset{opset}"


def weights_fingerprint(model: Any) -> str:
    """A digest of a module's parameters and buffers (names, shapes, dtypes, values).

    Two modules with the same fingerprint export to the same ONNX graph, so a model already exported
    by an earlier stage (the pruned student, which QAT leaves unchanged) is copied, not re-exported:
    the dynamo exporter is the slowest step of an export (tens of seconds on a torchvision model).
    """
    import hashlib

    import torch

    digest = hashlib.blake2b(digest_size=16)
    digest.update(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if t.dtype == torch.bfloat16:
            t = t.float()
        digest.update(t.numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def copy_with_metadata(src: str | Path, path: str | Path, metadata: dict[str, str]) -> Path:
    """Write the ONNX model at ``src`` to ``path`` (atomically) with hwkd's metadata replaced by ``metadata``."""
    import onnx

    proto = onnx.load(str(src))
    kept = {p.key: p.value for p in proto.metadata_props if not p.key.startswith("hwkd.")}
    set_metadata(proto, {**kept, **metadata})
    return save_with(Path(path), lambda tmp: onnx.save_model(proto, str(tmp)))


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
        from hwkd.onnx.check import _session

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
