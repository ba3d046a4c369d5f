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
from hwkd.train import Modes, distill_loss_fn, fit, split_accuracy

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


_ACTIVATIONS = ("relu", "relu_", "hardtanh", "hardtanh_", "relu6")


def _op_name(node) -> str:
    target = getattr(node, "target", None)
    name = getattr(target, "__name__", str(target))  # aten.conv2d.default -> "conv2d.default"
    return name.split(".")[0]


class OrtQuantizer:
    """The family's inductor quantizer, plus the Q/DQ placement ONNX Runtime needs for integer kernels.

    The inductor quantizers annotate for torch.compile, which fuses a conv with a following residual
    add in FP32: they leave a conv's output unquantized when it feeds an add (and the last conv before
    pooling), so the exported ONNX graph has ``DQ -> Conv -> Add`` that ORT can only run as an FP32
    FusedConv, with Transpose/Q/DQ around it. ORT's QDQ fusions want ``DQ -> op -> Q`` around every
    conv (activation included) and add, as its own static quantizer writes them. This wrapper keeps the
    family's recipe (per-channel symmetric weights, its activation dtype) and adds an output
    quantization spec to every conv or linear pattern (the op, or op -> ReLU/ReLU6) and to every add.
    """

    def __init__(self, base, act_qspec):
        self.base = base
        self.act_qspec = act_qspec

    def transform_for_annotation(self, model):
        return self.base.transform_for_annotation(model)

    def validate(self, model) -> None:
        self.base.validate(model)

    def prepare_obs_or_fq_callback(self, model, edge_or_node_to_obs_or_fq) -> None:
        self.base.prepare_obs_or_fq_callback(model, edge_or_node_to_obs_or_fq)

    def annotate(self, model):
        from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

        model = self.base.annotate(model)
        key = "quantization_annotation"

        def pattern_end(node):
            users = list(node.users)
            if len(users) == 1 and _op_name(users[0]) in _ACTIVATIONS:
                return users[0]
            return node

        def quantize_output(node) -> None:
            ann = node.meta.get(key)
            if ann is None:
                node.meta[key] = QuantizationAnnotation(output_qspec=self.act_qspec, _annotated=True)
            elif ann.output_qspec is None:
                ann.output_qspec = self.act_qspec
                ann._annotated = True

        for node in list(model.graph.nodes):
            if node.op != "call_function":
                continue
            name = _op_name(node)
            if name in ("conv2d", "linear"):
                quantize_output(pattern_end(node))
            elif name in ("add", "add_"):
                ann = node.meta.get(key)
                if ann is None:
                    ann = node.meta[key] = QuantizationAnnotation(_annotated=True)
                for arg in node.args[:2]:
                    if isinstance(arg, torch.fx.Node) and ann.input_qspec_map.get(arg) is None:
                        ann.input_qspec_map[arg] = self.act_qspec
                ann._annotated = True
                end = pattern_end(node)
                quantize_output(end)
        return model


def host_needs_reduce_range() -> bool:
    """True on x86 hosts without VNNI, where ORT's u8s8 kernels (VPMADDUBSW) saturate 8-bit weights."""
    import platform

    from hwkd.ortbench import _cpu_flags

    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    flags = set(_cpu_flags())
    return not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def reduce_range(cfg: QatConfig) -> bool:
    """``qat.reduce_range``: auto | on | off -> whether weights use 7 bits ([-64, 63])."""
    if cfg.reduce_range not in ("auto", "on", "off"):
        raise ConfigError(f"qat.reduce_range must be auto, on or off, not {cfg.reduce_range!r}.")
    return host_needs_reduce_range() if cfg.reduce_range == "auto" else cfg.reduce_range == "on"


def make_quantizer(family: str, is_qat: bool = True, reduce_range: bool = False):
    """The quantizer hwkd uses: the family's inductor recipe with ORT-friendly output quantization.

    Weights are per-channel symmetric INT8 on every family: torchao's ARM QAT recipe quantizes them
    per tensor ("only per tensor for now"), while a conv's output channels differ in range by orders of
    magnitude after BN folding and ORT's QLinearConv takes per-channel scales. ``reduce_range`` uses 7
    bits: onnxruntime recommends it for U8S8 on AVX2/AVX512 without VNNI, where 8-bit weights saturate
    the int16 pair sums of VPMADDUBSW and ORT's result drifts from the Q/DQ reference (measured here:
    top-1 agreement 0.91, max |logit diff| 1.7 with 8-bit weights on the default student).
    """
    base = QUANTIZERS.get(family)()
    config = base.global_config
    if config is None:
        return base
    base.set_global(_with_per_channel_weights(config, reduce_range))
    return OrtQuantizer(base, base.global_config.input_activation)


def _with_per_channel_weights(config, reduce_range: bool = False):
    from torchao.quantization.pt2e import FusedMovingAvgObsFakeQuantize, MovingAveragePerChannelMinMaxObserver
    from torchao.quantization.pt2e.quantizer import QuantizationSpec

    weight = QuantizationSpec(
        dtype=torch.int8,
        quant_min=-64 if reduce_range else -128,
        quant_max=63 if reduce_range else 127,
        qscheme=torch.per_channel_symmetric,
        ch_axis=0,  # output channels of conv (oc, ic, kh, kw) and linear (out, in) weights
        is_dynamic=False,
        observer_or_fake_quant_ctr=FusedMovingAvgObsFakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver, eps=2**-12
        ),
    )
    return dataclasses.replace(config, weight=weight)


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
    return prepare_qat_pt2e(graph, make_quantizer(family, reduce_range=reduce_range)), folded


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
    prepared, bn_folded = prepare_qat(state.student, state.dataset.example_input(2), family, seven_bit)

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
    converted = convert(prepared)
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
