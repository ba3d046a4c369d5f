"""Stage 3: quantization-aware distillation. INT8 fake-quant training (torchao PT2E) of the student,
with the FP32 student itself as the teacher, so INT8 learns to mimic the model it replaces.

Recipe: weights per-channel symmetric, activations per-tensor (the quantizer's defaults). BatchNorm is
folded into the convolutions before fake-quant is inserted (the student is already trained, so its BN
statistics are final); this is also what the deployed graph computes, and it spares torchao's conv-BN
pattern rewrite, which costs ~25 s per model. Observers are frozen for the last part of training so the
final epochs fine-tune against fixed quantization grids. Models that torch.fx cannot trace keep their BN
and go through torchao's own QAT conv-BN handling (slower, same result), with BN frozen late in training.
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
from hwkd.train import Modes, accuracy, distill_loss_fn, fit

QUANTIZERS: Registry = Registry("quantizer")


@QUANTIZERS.register("x86")
def _x86_quantizer():
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config(is_qat=True))
    return quantizer


@QUANTIZERS.register("arm")
def _arm_quantizer():
    from torchao.quantization.pt2e.quantizer.arm_inductor_quantizer import (
        ArmInductorQuantizer,
        get_default_arm_inductor_quantization_config,
    )

    quantizer = ArmInductorQuantizer()
    quantizer.set_global(get_default_arm_inductor_quantization_config(is_qat=True))
    return quantizer


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


def prepare_qat(model: torch.nn.Module, example: torch.Tensor, family: str):
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
    return prepare_qat_pt2e(graph, QUANTIZERS.get(family)()), folded


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

    family = quantizer_family(cfg, state.profile)
    fp32 = copy.deepcopy(state.student).eval()
    prepared, bn_folded = prepare_qat(state.student, state.dataset.x_train[:2], family)

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
    )
    converted = convert(prepared)
    ds = state.dataset
    metrics = {
        "accuracy": accuracy(converted, ds.x_test, ds.y_test, Modes(eval=move_exported_model_to_eval)),
        "val_accuracy": accuracy(converted, ds.x_val, ds.y_val, Modes(eval=move_exported_model_to_eval)),
        "fp32_accuracy": accuracy(fp32, ds.x_test, ds.y_test),
        "quantizer": family,
        "precision": "int8",
        "observers_frozen_from_epoch": freeze_obs_epoch + 1,
        "bn_folded_before_qat": bn_folded,
        "bn_frozen_from_epoch": None if bn_folded else freeze_bn_epoch + 1,
    }
    return dataclasses.replace(state, quantized=converted), StageResult("qat", metrics=metrics, history=history)
