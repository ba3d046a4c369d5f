"""Stage 3: quantization-aware distillation. INT8 fake-quant training (torchao PT2E) of the student,
with the FP32 student itself as the teacher, so INT8 learns to mimic the model it replaces.

Recipe (hwkd.onnx.quantizer): uint8 per-tensor activations, int8 per-channel symmetric weights, Q/DQ
where onnxruntime's CPU EP fuses them into integer kernels (every conv, linear, add, mul, sigmoid).
BatchNorm is folded into the convolutions before fake-quant is inserted (the student is already
trained, so its BN statistics are final); this is also what the deployed graph computes, and it spares
torchao's conv-BN pattern rewrite, which costs ~25 s per model. Observers are frozen for the last part
of training so the final epochs fine-tune against fixed quantization grids. Models that torch.fx cannot
trace keep their BN and go through torchao's own QAT conv-BN handling (slower, same result), with BN
frozen late in training. If the quantizer cannot handle the student, the run goes on with onnxruntime's
static PTQ as the INT8 model, and says so.
"""

from __future__ import annotations

import copy
import dataclasses
import logging

import torch

from hwkd.config import QatConfig
from hwkd.errors import ConfigError, StageError
from hwkd.kd.losses import make_kd_loss
from hwkd.pipeline import PipelineState, RunContext, StageResult
from hwkd.registry import Registry
from hwkd.train import Modes, distill_loss_fn, fit, split_accuracy

QUANTIZERS: Registry = Registry("quantizer")
# Both CPU families get the same ORT-shaped recipe (hwkd.onnx.quantizer): uint8 activations, int8
# per-channel weights. The family is recorded; the recipe does not depend on it (see
# docs/decisions-issue11.md: torchao's inductor quantizers annotate for torch.compile, not for ORT).
QUANTIZERS.register("x86")(lambda reduce_range=False: _ort_quantizer("x86", reduce_range))
QUANTIZERS.register("arm")(lambda reduce_range=False: _ort_quantizer("arm", reduce_range))


def _ort_quantizer(family: str, reduce_range: bool):
    from hwkd.onnx.quantizer import OrtQuantizer

    return OrtQuantizer(family, reduce_range)


def host_needs_reduce_range() -> bool:
    """True on x86 hosts without VNNI, where ORT's u8s8 kernels (VPMADDUBSW) saturate 8-bit weights."""
    import platform

    from hwkd.onnx.host import cpu_flags

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    flags = set(cpu_flags())
    return not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def reduce_range(cfg: QatConfig) -> bool:
    """``qat.reduce_range``: auto | on | off -> whether weights use 7 bits ([-64, 63])."""
    if cfg.reduce_range not in ("auto", "on", "off"):
        raise ConfigError(f"qat.reduce_range must be auto, on or off, not {cfg.reduce_range!r}.")
    return host_needs_reduce_range() if cfg.reduce_range == "auto" else cfg.reduce_range == "on"


def make_quantizer(family: str, reduce_range: bool = False):
    """The quantizer hwkd uses for ``family``: Q/DQ where ORT fuses them (hwkd.onnx.quantizer).

    Weights are per-channel symmetric INT8 and activations uint8 on every family. ``reduce_range``
    uses 7-bit weights: onnxruntime recommends it for U8S8 on x86 without VNNI, where 8-bit weights
    saturate the int16 pair sums of VPMADDUBSW and ORT's result drifts from the Q/DQ reference.
    """
    return QUANTIZERS.get(family)(reduce_range=reduce_range)


QUANT_METHODS = ("qat", "ptq", "auto")


def quant_method(cfg: QatConfig) -> str:
    """``qat.method`` (``--quant``), checked: qat | ptq | auto."""
    if cfg.method not in QUANT_METHODS:
        raise ConfigError(
            f"Unknown quantization method {cfg.method!r} (qat.method / --quant).",
            f"Use one of: {', '.join(QUANT_METHODS)}.",
        )
    return cfg.method


def quantizer_family(cfg: QatConfig, profile) -> str:
    """The quantizer follows the profile's CPU family unless the recipe names one."""
    family = profile.hardware.cpu_family if cfg.quantizer == "auto" else cfg.quantizer
    if family not in QUANTIZERS:
        raise ConfigError(f"No INT8 quantizer for CPU family {family!r}.", f"Use one of: {QUANTIZERS.names()}.")
    return family


def fold_batchnorm(model: torch.nn.Module) -> tuple[torch.nn.Module, bool]:
    """Fold eval-mode BatchNorm into the preceding convs (torch.fx); return (model, folded?)."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(copy.deepcopy(model).eval()), True
    except Exception as exc:  # not symbolically traceable: keep BN, torchao handles it in QAT
        logging.getLogger("hwkd").info("qat: BatchNorm not folded up front (%s)", exc)
        return copy.deepcopy(model), False


def prepare_qat(model: torch.nn.Module, example: torch.Tensor, family: str, reduce_range: bool = False):
    """Fold BN, export with a dynamic batch and insert fake-quant observers; return (prepared, folded?)."""
    logging.getLogger("torchao").setLevel(logging.ERROR)  # optional CUDA kernels it cannot load here
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    model, folded = fold_batchnorm(model)
    model.train()
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        graph = torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()
    except Exception as exc:
        raise StageError(
            f"qat: torch.export could not capture the student ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200]}).",
            "The student must be export-traceable (no data-dependent Python control flow).",
        ) from exc
    try:
        prepared = prepare_qat_pt2e(graph, make_quantizer(family, reduce_range=reduce_range))
    except StageError:
        raise
    except Exception as exc:  # torchao's prepare failed on this graph: say so, no traceback
        raise StageError(
            f"qat: torchao could not insert fake-quant into the student ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}).",
            "Use --quant ptq (onnxruntime static PTQ of the FP32 model) or --precision fp32.",
        ) from exc
    return prepared, folded


def convert(prepared):
    """Fake-quant graph -> reference INT8 graph (quantize/dequantize ops) in eval mode."""
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    move_exported_model_to_eval(prepared)
    converted = convert_pt2e(prepared)
    move_exported_model_to_eval(converted)
    return converted


def run(state: PipelineState, cfg: QatConfig, ctx: RunContext) -> tuple[PipelineState, StageResult]:
    from torchao.quantization.pt2e import (
        disable_observer,
        move_exported_model_to_eval,
        move_exported_model_to_train,
    )

    method = quant_method(cfg)
    if method == "ptq":
        # The user chose onnxruntime's static PTQ: no fake-quant training; export quantizes the FP32 model.
        result = StageResult("qat", metrics={"method": "ptq", "precision": "int8", "trained": False})
        return dataclasses.replace(state, quantized=None, quant_method="ptq", reduce_range=reduce_range(cfg)), result
    family = quantizer_family(cfg, state.profile)
    fp32 = copy.deepcopy(state.student).eval()
    seven_bit = reduce_range(cfg)
    try:
        prepared, bn_folded = prepare_qat(state.student, state.dataset.example_input(2), family, seven_bit)
    except StageError as exc:
        # Handled, not refused: the FP32 model still exports and onnxruntime's PTQ quantizes it; the
        # qat metrics and the report's INT8 selection say so.
        ctx.log.warning("qat: %s Falling back to onnxruntime static PTQ.", exc.args[0] if exc.args else exc)
        result = StageResult("qat", metrics={
            "method": "ptq", "precision": "int8", "trained": False,
            "fallback": f"hwkd's quantizer failed on this student; model.onnx is onnxruntime static PTQ. "
                        f"{exc.args[0] if exc.args else exc}",
        })
        return dataclasses.replace(state, quantized=None, quant_method="ptq", reduce_range=seven_bit), result

    bn_frozen = {"on": False}

    def set_train(m):
        # Frozen BN = train with BN in inference form (running statistics), gradients still flow.
        (move_exported_model_to_eval if bn_frozen["on"] else move_exported_model_to_train)(m)

    modes = Modes(train=set_train, eval=move_exported_model_to_eval)
    freeze_obs_epoch = int(cfg.freeze_observers_at * cfg.epochs)
    freeze_bn_epoch = int(cfg.freeze_bn_at * cfg.epochs)

    def on_epoch_start(epoch: int) -> None:
        if epoch >= freeze_obs_epoch and epoch > 0:
            prepared.apply(disable_observer)
        if epoch >= freeze_bn_epoch and epoch > 0:
            bn_frozen["on"] = True

    kd = make_kd_loss("hinton", state.kd.temperature if state.kd else 4.0, 0.7)
    history = fit(
        prepared,
        state.dataset,
        epochs=cfg.epochs,
        lr=cfg.lr,
        loss_fn=distill_loss_fn(kd, [fp32], [1.0]),
        train_cfg=ctx.train,
        seed=ctx.seed + 100,
        progress=ctx.progress,
        description=f"qat int8 ({family})",
        on_epoch_start=on_epoch_start,
        modes=modes,
        device=ctx.device,  # fake-quant training on the device; convert and export on the CPU
        amp=ctx.amp,
        modules=[fp32],
    )
    try:
        converted = convert(prepared)
    except Exception as exc:  # torchao's convert on a graph it prepared: its bug, explained
        raise StageError(
            f"qat: torchao could not convert the fake-quant student to INT8 ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else ''}).",
            "Use --quant ptq (onnxruntime static PTQ of the FP32 model) or --precision fp32.",
        ) from exc
    ds = state.dataset
    metrics = {
        "accuracy": split_accuracy(converted, ds, "test", Modes(eval=move_exported_model_to_eval)),
        "val_accuracy": split_accuracy(converted, ds, "val", Modes(eval=move_exported_model_to_eval)),
        "fp32_accuracy": split_accuracy(fp32, ds, "test"),
        "method": method,
        "quantizer": family,
        "weights": f"per-channel symmetric int8{' (7-bit range, reduce_range)' if seven_bit else ''}",
        "precision": "int8",
        "observers_frozen_from_epoch": freeze_obs_epoch + 1,
        "bn_folded_before_qat": bn_folded,
        "bn_frozen_from_epoch": None if bn_folded else freeze_bn_epoch + 1,
    }
    state = dataclasses.replace(state, quantized=converted, quant_method=method, reduce_range=seven_bit)
    return state, StageResult("qat", metrics=metrics, history=history)
