"""The post-training quantization peer: onnxruntime's own static PTQ of the FP32 ONNX model.

This is what a user would reach for instead of hwkd's QAT, so every INT8 run produces it side by side
from the same ``model_fp32.onnx`` and the same calibration images: ``quantize_static`` in QDQ format,
per-channel symmetric INT8 weights, INT8 activations (MinMax calibration), after ORT's own
``quant_pre_process`` (shape inference + graph optimization, which folds what the exporter left).

Example::

    quantize_ptq("run/model_fp32.onnx", "run/model_ptq.onnx", dataset.sample("train", 256)[0])
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from hwkd.artifacts import save_with
from hwkd.errors import StageError
from hwkd.onnx_export import set_metadata

CALIBRATION_BATCH = 32


def calibration_images(x_train: Any, count: int, seed: int = 0) -> np.ndarray:  # in-memory tensors (benchmarks)
    """``count`` training images (a fixed random subset), float32 NCHW: the calibration set of both
    the PTQ peer and (for comparison) what hwkd's QAT observers saw first."""
    x = x_train.detach().cpu().numpy() if hasattr(x_train, "detach") else np.asarray(x_train)
    if len(x) == 0:
        raise StageError("PTQ calibration needs at least one training image; the training split is empty.")
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.permutation(len(x))[: max(1, min(count, len(x)))])
    return np.ascontiguousarray(x[idx], dtype=np.float32)


def _reader(images: np.ndarray, input_name: str):
    from onnxruntime.quantization import CalibrationDataReader

    class _Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter(
                [{input_name: images[i : i + CALIBRATION_BATCH]} for i in range(0, len(images), CALIBRATION_BATCH)]
            )

        def get_next(self):
            return next(self._it, None)

    return _Batches()


def quantize_ptq(
    fp32_path: str | Path,
    out_path: str | Path,
    images: Any,
    *,
    per_channel: bool = True,
    reduce_range: bool = False,
    preprocess: bool = True,
) -> Path:
    """Static PTQ of ``fp32_path`` with onnxruntime (QDQ, INT8) calibrated on ``images``; write ``out_path``.

    The model's ``metadata_props`` (preprocessing, labels, ...) are carried over, so the PTQ model is
    as self-describing as hwkd's own. Any failure is a ``StageError`` naming the cause.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, out_path = Path(fp32_path), Path(out_path)
    images = np.ascontiguousarray(np.asarray(images), dtype=np.float32)
    source = onnx.load(str(fp32_path), load_external_data=False)
    input_name = source.graph.input[0].name
    with tempfile.TemporaryDirectory(prefix="hwkd-ptq-") as tmp:
        src = fp32_path
        try:
            with _quiet_ort():
                if preprocess:
                    src = Path(tmp) / "pre.onnx"
                    quant_pre_process(str(fp32_path), str(src), skip_symbolic_shape=False)
                quantized = Path(tmp) / "ptq.onnx"
                quantize_static(
                    str(src),
                    str(quantized),
                    _reader(images, input_name),
                    quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    reduce_range=reduce_range,
                    activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    extra_options={"WeightSymmetric": True},
                )
        except Exception as exc:
            raise StageError(
                f"onnxruntime static quantization of {str(fp32_path)!r} failed: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:300] if str(exc) else ''}",
                "The FP32 ONNX model must run on onnxruntime's CPU EP; check model_fp32.onnx.",
            ) from exc
        proto = onnx.load(str(quantized))
    set_metadata(proto, {**{p.key: p.value for p in source.metadata_props}, "hwkd.quantization": "ort-static-ptq"})
    return save_with(out_path, lambda tmp: onnx.save_model(proto, str(tmp)))


@contextlib.contextmanager
def _quiet_ort():
    """onnxruntime's quantization tool logs each step at INFO/WARNING; keep the run's output clean."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
