"""The post-training quantization peer: onnxruntime's own static PTQ of the FP32 ONNX model.

This is what a user would reach for instead of hwkd's QAT, so every INT8 run produces it side by side
from the same ``model_fp32.onnx`` and the same calibration images, as its users call it
(``quantize_static(model_in, model_out, reader, **options)`` after ORT's own ``quant_pre_process``,
the step its docs and examples run first). The variants (``VARIANTS``):

- ``ptq``: ``quantize_static``'s defaults: QDQ, int8 activations and weights (S8S8), per-tensor, MinMax;
- ``ptq_u8s8``: the types ORT's docs point to for x86 CPUs (uint8 activations, int8 weights: what its
  AVX2/AVX-512 kernels are built for), with ``reduce_range`` where the docs recommend it (x86 without
  VNNI); everything else at its defaults;
- ``ptq_tuned``: hwkd's tuning (U8S8, per-channel symmetric weights, ``reduce_range`` as above),
  labelled as such in reports: it is not how ORT's users call it.

Example::

    quantize_ptq("run/model_fp32.onnx", "run/model_ptq.onnx", dataset.sample("train", 256)[0])
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hwkd.artifacts import save_with
from hwkd.errors import StageError
from hwkd.onnx.export import set_metadata

CALIBRATION_BATCH = 32


@dataclass(frozen=True)
class Variant:
    """One way of calling ``quantize_static``: who chose the options, and the options."""

    label: str
    by: str  # "onnxruntime defaults" | "onnxruntime docs (x86)" | "hwkd-tuned"
    u8_activations: bool
    per_channel: bool
    symmetric_weights: bool
    host_reduce_range: bool  # reduce_range where the host needs it (x86 without VNNI)


VARIANTS: dict[str, Variant] = {
    "ptq": Variant("onnxruntime quantize_static, defaults (QDQ, S8S8, per-tensor, MinMax)",
                   "onnxruntime defaults", False, False, False, False),
    "ptq_u8s8": Variant("onnxruntime quantize_static, U8S8 (its docs' types for x86), otherwise defaults",
                        "onnxruntime docs (x86)", True, False, False, True),
    "ptq_tuned": Variant("onnxruntime quantize_static, hwkd-tuned: U8S8, per-channel symmetric weights",
                         "hwkd-tuned", True, True, True, True),
}


def calibration_images(source: Any, count: int, seed: int = 0) -> np.ndarray:
    """``count`` training images, float32 NCHW: the calibration set of every PTQ variant.

    ``source`` is the images (tensor/array: a fixed random subset is drawn) or an iterable of batches
    (``x`` or ``(x, y)``, e.g. a seeded sample or loader: the first ``count`` images are taken).
    """
    if hasattr(source, "shape"):
        x = source.detach().cpu().numpy() if hasattr(source, "detach") else np.asarray(source)
    else:
        taken, n = [], 0
        for batch in source:
            xb = batch[0] if isinstance(batch, tuple | list) else batch
            xb = xb.detach().cpu().numpy() if hasattr(xb, "detach") else np.asarray(xb)
            taken.append(xb[: count - n])
            n += len(taken[-1])
            if n >= count:
                break
        x = np.concatenate(taken) if taken else np.zeros((0,), np.float32)
        if len(x) == 0:
            raise StageError("PTQ calibration needs at least one training image; the training split is empty.")
        return np.ascontiguousarray(x, dtype=np.float32)
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
    variant: str = "ptq",
    reduce_range: bool = False,
    preprocess: bool = True,
) -> Path:
    """Static PTQ of ``fp32_path`` with onnxruntime calibrated on ``images``; write ``out_path``.

    ``variant`` is a key of ``VARIANTS``; ``reduce_range`` says whether this host needs it (only the
    variants that follow ORT's docs on it use it).

    The model's ``metadata_props`` (preprocessing, labels, ...) are carried over, so the PTQ model is
    as self-describing as hwkd's own. Any failure is a ``StageError`` naming the cause.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if variant not in VARIANTS:
        raise StageError(f"Unknown PTQ variant {variant!r}; known: {', '.join(VARIANTS)}.")
    v = VARIANTS[variant]
    options: dict[str, Any] = {}  # only what differs from quantize_static's defaults
    if v.u8_activations:
        options.update(activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    if v.per_channel:
        options["per_channel"] = True
    if v.symmetric_weights:
        options["extra_options"] = {"WeightSymmetric": True}
    if v.host_reduce_range and reduce_range:
        options["reduce_range"] = True
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
                quantize_static(str(src), str(quantized), _reader(images, input_name), **options)
        except Exception as exc:
            raise StageError(
                f"onnxruntime static quantization of {str(fp32_path)!r} failed: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:300] if str(exc) else ''}",
                "The FP32 ONNX model must run on onnxruntime's CPU EP; check model_fp32.onnx.",
            ) from exc
        proto = onnx.load(str(quantized))
    set_metadata(proto, {**{p.key: p.value for p in source.metadata_props}, "hwkd.quantization": f"ort-static-ptq:{variant}"})
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
