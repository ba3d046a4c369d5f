"""Cost model: hand-computed MACs and roofline times, monotonicity, INT8, and torch/ONNX agreement."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import onnx
import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch.nn import functional as F

from hwkd.errors import ConfigError, ModelError, ProfileError
from hwkd.hardware.cost import (
    DEFAULT_RUNTIME_OVERHEAD_MB,
    Cost,
    estimate,
    estimate_onnx,
    gemm_efficiency,
    round_up_factor,
)
from hwkd.hardware.profiles import list_profiles, load_profile
from tests.conftest import calibrated_int8

CONV_MACS = 8 * 3 * 9 * 64  # Conv2d 3->8, k3, pad 1 on 8x8: out elements x (in/groups x k x k)


def ideal(
    peak_gflops: float = 1.0, bandwidth_gbs: float = 1e6, overhead_us: float = 0.0, vector_width: int = 1
):
    """A profile whose roofline is easy to compute by hand: no efficiency loss, no runtime overhead."""
    base = load_profile("x86-avx2")
    hardware = dataclasses.replace(
        base.hardware,
        peak_gflops={"fp32": peak_gflops, "int8": 4 * peak_gflops},
        memory_bandwidth_gbs=bandwidth_gbs,
        per_op_overhead_us=overhead_us,
        vector_width=vector_width,
    )
    runtime = dataclasses.replace(base.runtime, threads=hardware.cpu_cores)
    calibration = {"efficiency": 1.0, "k_half": 0, "runtime_overhead_mb": 0}
    return dataclasses.replace(base, hardware=hardware, runtime=runtime, calibration=calibration)


def cnn(width: int = 16) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1, groups=width),
        nn.ReLU6(),
        nn.Conv2d(width, 2 * width, 1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, 10),
    ).eval()


# ---------------------------------------------------------------------------------------------- torch


def test_single_conv_hand_computed():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    cost = estimate(conv, torch.randn(1, 3, 8, 8), ideal())
    assert isinstance(cost, Cost)
    assert cost.macs == CONV_MACS == 13824
    assert cost.params == 8 * 3 * 9 + 8
    (row,) = cost.per_layer
    assert (row["op"], row["macs"], row["bound"]) == ("Conv2d", CONV_MACS, "compute")
    # compute bound at 1 GFLOP/s: 2 FLOP per MAC
    assert cost.latency_ms == pytest.approx(2 * CONV_MACS / 1e9 * 1e3)


def test_single_conv_memory_bound_hand_computed():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    cost = estimate(conv, torch.randn(1, 3, 8, 8), ideal(peak_gflops=1e9, bandwidth_gbs=1.0, overhead_us=2.0))
    traffic = (224 + 3 * 64 + 8 * 64) * 4  # weights + input + output, FP32
    (row,) = cost.per_layer
    assert row["bytes"] == traffic and row["bound"] == "memory"
    assert cost.latency_ms == pytest.approx((traffic / 1e9 + 2e-6) * 1e3)


def test_overhead_bound_tiny_layer():
    cost = estimate(nn.Linear(4, 2), torch.randn(1, 4), ideal(peak_gflops=1e6, overhead_us=50.0))
    assert cost.per_layer[0]["bound"] == "overhead"
    assert cost.latency_ms == pytest.approx(0.05, rel=1e-3)


def test_linear_and_batch_is_sliced_to_one():
    linear = nn.Linear(16, 10)
    one = estimate(linear, torch.randn(1, 16), ideal())
    many = estimate(linear, torch.randn(32, 16), ideal())
    assert one.macs == many.macs == 160
    assert one.params == 170
    assert many.latency_ms == pytest.approx(one.latency_ms)


def test_memory_is_weights_plus_peak_activations_plus_overhead():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    profile = ideal()
    profile = dataclasses.replace(profile, calibration={**profile.calibration, "runtime_overhead_mb": 1.5})
    fp32 = estimate(conv, torch.randn(1, 3, 8, 8), profile)
    assert fp32.weight_mb == pytest.approx(224 * 4 / 2**20)
    assert fp32.activation_mb == pytest.approx((3 * 64 + 8 * 64) * 4 / 2**20)
    assert fp32.memory_mb == pytest.approx(fp32.weight_mb + fp32.activation_mb + 1.5)
    int8 = estimate(conv, torch.randn(1, 3, 8, 8), profile, precision="int8")
    assert int8.weight_mb == pytest.approx(fp32.weight_mb / 4)


def test_default_runtime_overhead_is_charged():
    cost = estimate(nn.Linear(4, 2), torch.randn(1, 4), load_profile("rpi4"))
    assert cost.memory_mb > DEFAULT_RUNTIME_OVERHEAD_MB


def test_channels_off_the_vector_width_cost_as_rounded_up():
    x = torch.randn(1, 3, 8, 8)
    profile = ideal(vector_width=8)
    seven = estimate(nn.Conv2d(3, 7, 3, padding=1, bias=False), x, profile)
    eight = estimate(nn.Conv2d(3, 8, 3, padding=1, bias=False), x, profile)
    assert seven.macs < eight.macs
    assert seven.latency_ms == pytest.approx(eight.latency_ms)
    assert round_up_factor(7, 8) == pytest.approx(8 / 7)
    assert round_up_factor(16, 8) == 1.0 and round_up_factor(0, 8) == 1.0


def test_short_reductions_are_less_efficient():
    assert gemm_efficiency(9, 96) < gemm_efficiency(576, 96) < 1.0
    assert gemm_efficiency(9, 0) == 1.0


def test_bn_and_activation_after_conv_are_fused():
    cost = estimate(cnn(), torch.randn(1, 3, 8, 8), load_profile("rpi4"))
    bounds = {row["name"]: row["bound"] for row in cost.per_layer}
    assert bounds["1"] == bounds["2"] == bounds["4"] == bounds["6"] == "fused"  # BN, ReLU, ReLU6, ReLU
    assert bounds["7"] != "fused"  # the pool reads from a ReLU but is not an activation
    assert all(row["latency_ms"] == 0 for row in cost.per_layer if row["bound"] == "fused")
    assert cost.latency_ms == pytest.approx(sum(row["latency_ms"] for row in cost.per_layer))


def test_shared_module_called_twice_is_counted_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(self.fc(x))

    cost = estimate(Twice(), torch.randn(1, 8), ideal())
    assert [row["name"] for row in cost.per_layer] == ["fc", "fc#2"]
    assert cost.macs == 2 * 64


def test_macs_match_torch_pruning_counter():
    """Without biases, BN or activations (which torch-pruning counts as extra ops) the counts agree."""
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=4, bias=False),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10, bias=False),
    )
    x = torch.randn(1, 3, 8, 8)
    macs, params = tp.utils.count_ops_and_params(model, x)
    cost = estimate(model, x, load_profile("rpi4"))
    assert cost.macs == macs
    assert cost.params == params
    full = cnn()
    tp_macs, tp_params = tp.utils.count_ops_and_params(full, x)
    ours = estimate(full, x, load_profile("rpi4"))
    assert ours.params == tp_params
    assert ours.macs <= tp_macs <= ours.macs * 1.2  # torch-pruning adds bias/BN/ReLU/pool element ops


def test_estimate_leaves_the_model_as_it_was():
    model = cnn().train()
    bn = model[1]
    before = bn.running_mean.clone()
    estimate(model, torch.randn(4, 3, 8, 8), load_profile("rpi4"))
    assert model.training
    assert torch.equal(bn.running_mean, before)  # ran in eval mode
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("profile", list_profiles(), ids=lambda p: p.name)
def test_wider_model_costs_more(profile):
    x = torch.randn(1, 3, 16, 16)
    narrow = estimate(cnn(8), x, profile)
    wide = estimate(cnn(64), x, profile)
    assert wide.macs > narrow.macs and wide.params > narrow.params
    assert wide.latency_ms > narrow.latency_ms
    assert wide.memory_mb > narrow.memory_mb


@pytest.mark.parametrize("profile", list_profiles(), ids=lambda p: p.name)
def test_int8_is_cheaper_for_a_compute_heavy_model(profile):
    model = nn.Sequential(
        nn.Conv2d(3, 128, 3, padding=1), nn.ReLU(), nn.Conv2d(128, 128, 3, padding=1), nn.ReLU()
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    fp32 = estimate(model, x, profile)
    int8 = estimate(model, x, profile, precision="int8")
    assert int8.precision == "int8" and fp32.precision == "fp32"
    assert int8.macs == fp32.macs
    assert int8.latency_ms < fp32.latency_ms
    assert int8.memory_mb < fp32.memory_mb


def test_bad_precision_and_missing_peak():
    x = torch.randn(1, 4)
    with pytest.raises(ConfigError, match="bf16"):
        estimate(nn.Linear(4, 2), x, load_profile("rpi4"), precision="bf16")
    with pytest.raises(ProfileError, match="fp16"):
        estimate(nn.Linear(4, 2), x, load_profile("x86-avx2"), precision="fp16")  # AVX2 has no FP16 math


def test_bad_calibration_value_names_the_file():
    profile = dataclasses.replace(load_profile("rpi4"), calibration={"efficiency": 2.0})
    with pytest.raises(ProfileError, match="calibration.efficiency") as info:
        estimate(nn.Linear(4, 2), torch.randn(1, 4), profile)
    assert profile.source in str(info.value)


def test_calibrated_efficiency_scales_compute_time():
    model = nn.Conv2d(64, 64, 3, padding=1, bias=False)
    x = torch.randn(1, 64, 16, 16)
    base = ideal(bandwidth_gbs=1e9)
    half = dataclasses.replace(base, calibration={**base.calibration, "efficiency": {"fp32": 0.5}})
    assert estimate(model, x, half).latency_ms == pytest.approx(2 * estimate(model, x, base).latency_ms)


# ---------------------------------------------------------------------------------------------- onnx


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = cnn(16)
    x = torch.randn(1, 3, 16, 16)
    path = tmp_path_factory.mktemp("onnx") / "cnn.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    return model, x, path


def test_onnx_agrees_with_torch(exported):
    model, x, path = exported
    profile = load_profile("jetson")
    torch_cost = estimate(model, x, profile)
    onnx_cost = estimate_onnx(path, profile)
    assert onnx_cost.precision == "fp32"
    assert onnx_cost.macs == pytest.approx(torch_cost.macs, rel=0.01)
    assert onnx_cost.latency_ms == pytest.approx(torch_cost.latency_ms, rel=0.05)
    # the export folds BN into the conv, so ONNX holds slightly fewer parameters
    assert torch_cost.params - 2 * 16 <= onnx_cost.params <= torch_cost.params
    assert estimate_onnx(onnx.load(str(path)), profile).macs == onnx_cost.macs  # a ModelProto works too


def test_onnx_dynamic_batch_is_taken_as_one(exported):
    _, _, path = exported
    model = onnx.load(str(path))
    fixed = estimate_onnx(model, load_profile("rpi4"))
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    dim.Clear()
    dim.dim_param = "batch"
    del model.graph.value_info[:]  # force shape inference to rebuild every shape
    for out in model.graph.output:
        out.type.tensor_type.shape.dim[0].dim_param = "batch"
    dynamic = estimate_onnx(model, load_profile("rpi4"))
    assert dynamic.macs == fixed.macs
    assert dynamic.latency_ms == pytest.approx(fixed.latency_ms)


def test_onnx_other_dynamic_dims_are_an_error(exported):
    _, _, path = exported
    model = onnx.load(str(path))
    dim = model.graph.input[0].type.tensor_type.shape.dim[2]
    dim.Clear()
    dim.dim_param = "height"
    with pytest.raises(ModelError, match="height"):
        estimate_onnx(model, load_profile("rpi4"))


def test_onnx_quantized_graph_is_detected_as_int8(exported, tmp_path):
    from onnxruntime.quantization import quantize_dynamic

    _, _, path = exported
    quantized = tmp_path / "int8.onnx"
    quantize_dynamic(str(path), str(quantized))
    profile = load_profile("rpi4")
    fp32 = estimate_onnx(path, profile)
    int8 = estimate_onnx(quantized, profile)
    assert int8.precision == "int8"
    assert int8.macs == fp32.macs
    assert int8.weight_mb < fp32.weight_mb
    assert estimate_onnx(quantized, profile, precision="fp32").precision == "fp32"  # explicit wins


def test_onnx_missing_file():
    with pytest.raises(ModelError, match="does not exist"):
        estimate_onnx("/nonexistent/model.onnx", load_profile("rpi4"))


def test_calibrated_overheads_per_op_precision_and_per_run():
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(1, 3, 8, 8)
    plain = estimate(conv, x, ideal(peak_gflops=1e9, overhead_us=2.0)).latency_ms
    prof = ideal(peak_gflops=1e9, overhead_us=2.0)
    prof = dataclasses.replace(
        prof, calibration={**prof.calibration, "op_overhead_us": {"fp32": 5.0}, "per_run_overhead_us": 40.0}
    )
    compute_ms = 2 * CONV_MACS / 1e18 * 1e3
    assert plain == pytest.approx(compute_ms + 2.0e-3, rel=1e-3)
    # one conv: 5 us dispatch (the calibrated fp32 figure replaces the hardware one) + 40 us per run
    assert estimate(conv, x, prof).latency_ms == pytest.approx(compute_ms + 5.0e-3 + 40.0e-3, rel=1e-3)
    # int8 has no calibrated figure here: the hardware one applies, to the conv and to the INT8 graph's
    # QuantizeLinear of the input and DequantizeLinear of the output
    assert estimate(conv, x, prof, "int8").latency_ms == pytest.approx(3 * 2.0e-3 + 40.0e-3, rel=1e-2)


# ---------------------------------------------------------------------------------------------- kernel model


def kernel_profile(precision: str = "fp32", tile: int = 8, **ns_per_unit: float):
    """A profile whose fitted kernel model charges only the given features (ns per unit)."""
    from hwkd.hardware.cost import FEATURES

    base = load_profile("x86-avx2")
    table = {**dict.fromkeys(FEATURES, 0.0), "run_ns": 0.0, "k_half": 0.0, "channel_tile": tile, **ns_per_unit}
    calibration = {"runtime_overhead_mb": 0, "kernel_model": {precision: table}}
    return dataclasses.replace(base, calibration=calibration)


def test_kernel_model_hand_computed_conv():
    x = torch.randn(1, 3, 8, 8)
    pixels, reduction = 64, 27
    prof = kernel_profile(conv_flops=0.25, unaligned_flops=0.5, im2col=2.0, unaligned_im2col=3.0, ops=100.0,
                          mac_ops=50.0, run_ns=1000.0)  # fmt: skip
    # 3 input channels: not a multiple of 4, so the unaligned kernel's figures apply, not conv_flops
    expected_ns = 0.5 * 2 * CONV_MACS + (2.0 + 3.0) * pixels * reduction + 100.0 + 50.0 + 1000.0
    cost = estimate(nn.Conv2d(3, 8, 3, padding=1), x, prof)
    assert cost.latency_ms == pytest.approx(expected_ns * 1e-6, rel=1e-6)
    assert cost.per_layer[0]["bound"] == "compute"
    # 4 input channels: the ordinary k x k GEMM (k_half 0: full efficiency)
    macs4 = 8 * 4 * 9 * 64
    aligned = estimate(nn.Conv2d(4, 8, 3, padding=1), torch.randn(1, 4, 8, 8), prof).latency_ms
    assert aligned == pytest.approx((0.25 * 2 * macs4 + 2.0 * pixels * 36 + 150.0 + 1000.0) * 1e-6, rel=1e-6)


def test_kernel_model_charges_output_channels_off_the_lanes():
    x = torch.randn(1, 8, 4, 4)
    prof = kernel_profile(unaligned_outputs=1.0)  # x86-avx2: 8 lanes
    assert estimate(nn.Conv2d(8, 12, 1), x, prof).latency_ms == pytest.approx(12 * 16 * 1e-6)
    assert estimate(nn.Conv2d(8, 16, 1), x, prof).latency_ms == 0.0


def test_kernel_model_pads_channels_to_the_measured_tile():
    x = torch.randn(1, 16, 8, 8)
    prof = kernel_profile(pointwise_flops=1.0, tile=16)
    eight = estimate(nn.Conv2d(16, 8, 1), x, prof).latency_ms
    sixteen = estimate(nn.Conv2d(16, 16, 1), x, prof).latency_ms
    assert eight == pytest.approx(sixteen)  # 8 channels cost as much as 16 on a 16-wide tile
    assert estimate(nn.Conv2d(16, 8, 1), x, kernel_profile(pointwise_flops=1.0, tile=8)).latency_ms == pytest.approx(
        sixteen / 2
    )


def test_kernel_model_kinds_and_fused_epilogues():
    from hwkd.hardware.cost import trace_torch

    model = nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
        nn.Conv2d(8, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10),
    ).eval()  # fmt: skip
    works = trace_torch(model, torch.randn(1, 4, 8, 8))
    kinds = [(w.op, w.kind, w.fused) for w in works]
    assert kinds[:3] == [("Conv2d", "conv", False), ("BatchNorm2d", "elementwise", True), ("ReLU6", "elementwise", True)]
    assert ("Conv2d", "depthwise", False) in kinds and ("Conv2d", "pointwise", False) in kinds
    assert ("Linear", "gemm", False) in kinds
    # ReLU6 costs one pass over its output once fused; BN and ReLU cost nothing
    prof = kernel_profile(epilogue=1.0)
    assert estimate(model, torch.randn(1, 4, 8, 8), prof).latency_ms == pytest.approx(8 * 64 * 1e-6)


def test_kernel_model_charges_conv_output_pixels_whatever_the_channels():
    """k x k convs pay conv_pixels per output pixel; 1x1 and depthwise convs light_pixels (stop 28)."""
    prof = kernel_profile(conv_pixels=2.0, light_pixels=0.5)
    x = torch.randn(1, 8, 6, 6)
    for cout in (8, 16, 64):  # 36 output pixels each
        assert estimate(nn.Conv2d(8, cout, 3, padding=1), x, prof).latency_ms == pytest.approx(2.0 * 36 * 1e-6)
    assert estimate(nn.Conv2d(8, 16, 1, stride=2), x, prof).latency_ms == pytest.approx(0.5 * 9 * 1e-6)
    depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
    assert estimate(depthwise, x, prof).latency_ms == pytest.approx(0.5 * 36 * 1e-6)
    grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)  # grouped but not depthwise: a k x k conv
    assert estimate(grouped, x, prof).latency_ms == pytest.approx(2.0 * 36 * 1e-6)
    assert estimate(nn.Linear(8, 16), torch.randn(1, 8), prof).latency_ms == 0.0  # a GEMM has no pixels


def test_a_grouped_conv_pays_a_pixel_set_up_per_group_and_a_depthwise_or_plain_conv_none():
    """ORT runs one GEMM per group of a grouped conv (stop 29): group_pixels is charged pixels x groups."""
    prof = kernel_profile(group_pixels=1.0)
    x = torch.randn(1, 8, 6, 6)  # 36 output pixels at padding 1
    assert estimate(nn.Conv2d(8, 8, 3, padding=1, groups=2), x, prof).latency_ms == pytest.approx(2 * 36 * 1e-6)
    assert estimate(nn.Conv2d(8, 16, 1, groups=4), x, prof).latency_ms == pytest.approx(4 * 36 * 1e-6)
    assert estimate(nn.Conv2d(8, 16, 3, padding=1), x, prof).latency_ms == 0.0
    assert estimate(nn.Conv2d(8, 8, 3, padding=1, groups=8), x, prof).latency_ms == 0.0  # depthwise: its own kernel
    older = kernel_profile(conv_pixels=2.0)  # fitted before group_pixels existed: grouped pixels cost what it assumed
    del older.calibration["kernel_model"]["fp32"]["group_pixels"]
    assert estimate(nn.Conv2d(8, 8, 3, padding=1, groups=2), x, older).latency_ms == pytest.approx(2.0 * 36 * 1e-6)


def test_a_gemm_is_priced_at_the_pointwise_flop_rate_and_an_old_gemm_figure_is_ignored():
    # calibration's Gemms are classifier heads, too small to fit a rate of their own (one draw fitted
    # 1.4 ns per FLOP, 350x a conv's): a Gemm is the 1x1 conv's GEMM kernel and costs as one
    prof = kernel_profile(pointwise_flops=1.0, gemm_flops=500.0)  # gemm_flops: what a stop-18 profile carries
    fc = estimate(nn.Linear(64, 16), torch.randn(1, 64), prof).latency_ms
    assert fc == pytest.approx(2 * 64 * 16 * 1e-6)
    pointwise = estimate(nn.Conv2d(64, 16, 1), torch.randn(1, 64, 1, 1), prof).latency_ms
    assert fc == pytest.approx(pointwise)


def test_input_align_decides_which_convs_take_the_unaligned_kernel():
    x = torch.randn(1, 8, 4, 4)
    conv = nn.Conv2d(8, 16, 1)
    four = kernel_profile(pointwise_flops=1.0, unaligned_flops=3.0)
    block = kernel_profile(pointwise_flops=1.0, unaligned_flops=3.0, input_align=16)
    flops = 2 * 8 * 16 * 16
    assert estimate(conv, x, four).latency_ms == pytest.approx(1.0 * flops * 1e-6)  # 8 % 4 == 0
    assert estimate(conv, x, block).latency_ms == pytest.approx(3.0 * flops * 1e-6)  # 8 % 16 != 0: NCHW input
    from hwkd.hardware.calibrate import input_align

    assert input_align("fp32", arm=False, vector_width=16) == 16  # ORT's NCHWc block on AVX-512
    assert input_align("int8", arm=False, vector_width=16) == 4 and input_align("fp32", arm=True, vector_width=4) == 4


def test_a_profile_calibrated_before_conv_pixels_still_prices():
    """Features added later are optional: an older profile prices them at 0 and aligns inputs to 4."""
    from hwkd.hardware.cost import fitted_kernel_model

    prof = kernel_profile(conv_flops=1.0)
    table = prof.calibration["kernel_model"]["fp32"]
    del table["conv_pixels"]
    model = fitted_kernel_model(prof, "fp32")
    assert model["conv_pixels"] == 0.0 and model["input_align"] == 4.0
    assert estimate(nn.Conv2d(8, 16, 3), torch.randn(1, 8, 6, 6), prof).latency_ms > 0


def test_a_profile_fitted_before_light_pixels_prices_every_conv_pixel_at_its_one_rate():
    """Before stop 28 one conv_pixels rate covered 1x1 and depthwise convs too: such a profile keeps its estimates."""
    from hwkd.hardware.cost import fitted_kernel_model

    prof = kernel_profile(conv_pixels=2.0)
    del prof.calibration["kernel_model"]["fp32"]["light_pixels"]
    assert fitted_kernel_model(prof, "fp32")["light_pixels"] == 2.0
    x = torch.randn(1, 8, 6, 6)
    assert estimate(nn.Conv2d(8, 16, 1), x, prof).latency_ms == pytest.approx(2.0 * 36 * 1e-6)


def test_pools_are_priced_per_value_at_their_own_rate_and_an_older_profile_prices_them_as_adds():
    """A pool reads a window or reduces per value (stop 31): its own rate, not the add's."""
    from hwkd.hardware.cost import fitted_kernel_model, is_pool

    prof = kernel_profile(elementwise=1.0, pool=3.0)
    x = torch.randn(1, 8, 6, 6)  # 288 values
    assert estimate(nn.MaxPool2d(2), x, prof).latency_ms == pytest.approx(3.0 * (288 + 72) * 1e-6)
    assert estimate(nn.AdaptiveAvgPool2d(1), x, prof).latency_ms == pytest.approx(3.0 * (288 + 8) * 1e-6)
    assert estimate(nn.SiLU(), x, prof).latency_ms == pytest.approx(1.0 * (288 + 288) * 1e-6)
    assert all(map(is_pool, ("MaxPool", "GlobalAveragePool", "AveragePool", "ReduceMean", "AdaptiveAvgPool2d")))
    assert not any(map(is_pool, ("Add", "Mul", "Concat", "QuantizeLinear", "HardSwish")))
    older = kernel_profile(elementwise=1.0)
    del older.calibration["kernel_model"]["fp32"]["pool"]
    assert fitted_kernel_model(older, "fp32")["pool"] == 1.0
    assert estimate(nn.MaxPool2d(2), x, older).latency_ms == pytest.approx(1.0 * (288 + 72) * 1e-6)


def test_incomplete_kernel_model_names_the_fix():
    prof = kernel_profile()
    del prof.calibration["kernel_model"]["fp32"]["ops"]
    with pytest.raises(ProfileError, match="calibrate"):
        estimate(nn.Conv2d(3, 8, 3), torch.randn(1, 3, 8, 8), prof)


def test_onnx_prices_only_the_qdq_the_runtime_cannot_fold(exported, tmp_path):
    """INT8 QDQ: Q/DQ between two QLinear kernels fold away; the input Q and the output DQ run."""
    from hwkd.hardware.calibrate import quantize
    from hwkd.hardware.onnx_trace import trace_onnx

    _, x, path = exported
    qpath = quantize(path, tmp_path / "q.onnx", np.random.default_rng(0))
    works, _, precision = trace_onnx(qpath)
    assert precision == "int8"
    qdq = [w for w in works if w.op in ("QuantizeLinear", "DequantizeLinear")]
    assert all(w.kind == "elementwise" and not w.fused for w in qdq)
    assert qdq[0].op == "QuantizeLinear" and qdq[0].act_in == x.numel()  # the graph input
    assert qdq[-1].op == "DequantizeLinear" and qdq[-1].act_out == 10  # the logits
    in_graph = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in onnx.load(qpath).graph.node)
    assert len(qdq) <= 4 < in_graph  # the pairs around every QLinearConv (and the weights' DQ) are folded


def test_kernel_model_with_threads_splits_only_large_layers():
    from hwkd.hardware.cost import LayerWork, layer_features

    def conv(macs: int) -> LayerWork:
        return LayerWork("c", "Conv", macs=macs, params=0, act_in=0, act_out=macs // 36, channels=16, kernel=9,
                         in_channels=4)  # fmt: skip

    small, large = conv(36 * 16), conv(36 * 16 * 10**5)
    for w, speedup in ((small, 1.0), (large, 2.0)):
        serial = layer_features(w, tile=8, k_half=0.0)
        split = layer_features(w, tile=8, k_half=0.0, threads=2, grain=1e6)
        assert split["conv_flops"] == pytest.approx(serial["conv_flops"] / speedup, rel=0.02)
        assert split["ops"] == serial["ops"] == 1.0  # dispatch does not split


# ---------------------------------------------------------------------------------------------- functional ops


class _Block(nn.Module):
    """A residual block whose add, SE-style gate and activations are written in ``forward``, not as modules."""

    def __init__(self, c: int = 8, in_place: bool = False):
        super().__init__()
        self.conv, self.bn, self.in_place = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), in_place
        self.gate = nn.Conv2d(c, c, 1)

    def forward(self, x):
        out = self.bn(self.conv(x))
        if self.in_place:
            out += x
        else:
            out = out + x
        y = torch.relu(out)
        gate = torch.sigmoid(self.gate(y.mean((2, 3), keepdim=True)))
        return torch.cat([y * gate, x], 1)


def test_functional_ops_in_forward_are_traced_as_the_onnx_nodes_they_export_to():
    """Residual +, torch.relu, x.mean, sigmoid, * and cat in forward are work (stop 32: they were invisible)."""
    from hwkd.hardware.cost import trace_torch

    n = 8 * 6 * 6
    works = {w.name: w for w in trace_torch(_Block().eval(), torch.randn(1, 8, 6, 6))}
    # each named after the layer whose output it consumes ("bn#add"): the penalty weighs channels by module name
    add, relu, mean = works["bn#add"], works["bn#relu"], works["bn#reducemean"]
    assert (add.op, add.act_in, add.act_out, add.fused) == ("Add", 2 * n, n, False)
    assert relu.op == "Relu" and not relu.fused  # after an add: no conv epilogue to fold into
    assert (mean.op, mean.act_in, mean.act_out) == ("ReduceMean", n, 8)
    assert works["gate#sigmoid"].fused  # straight after the 1x1 gate conv: its epilogue
    assert (works["bn#mul"].act_in, works["bn#mul"].act_out) == (n + 8, n)
    assert (works["bn#concat"].op, works["bn#concat"].act_in, works["bn#concat"].act_out) == ("Concat", 2 * n, 2 * n)
    assert {"conv", "bn", "gate"} <= works.keys() and len(works) == 9  # BN's own F.batch_norm is not counted again
    # the in-place ``out += x`` returns the BN output itself: the relu after it still is not a conv epilogue
    in_place = {w.name: w for w in trace_torch(_Block(in_place=True).eval(), torch.randn(1, 8, 6, 6))}
    assert in_place["bn#add"].op == "Add" and not in_place["bn#relu"].fused


def test_an_op_on_weights_alone_is_folded_by_the_export_and_not_priced():
    from hwkd.hardware.cost import trace_torch

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.gamma = nn.Conv2d(3, 4, 1), nn.Parameter(torch.ones(4, 1, 1))

        def forward(self, x):
            return self.conv(x) * torch.sigmoid(self.gamma.mean())  # the gate is a constant of the graph

    ops = [w.op for w in trace_torch(Scaled().eval(), torch.randn(1, 3, 4, 4))]
    assert ops == ["Conv2d", "Mul"]


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = torch.relu(self.stem_bn(self.stem(x)))
        return self.head(self.bn(self.conv(y)) + y)


def test_a_residual_adds_cost_is_weighed_in_the_channel_group_that_feeds_it():
    from hwkd.hardware.penalty import channel_groups

    model, x, profile = _Residual().eval(), torch.randn(1, 3, 6, 6), load_profile("rpi4")
    (group,) = [g for g in channel_groups(model, x, profile) if g.channels == 8]  # stem + conv out, tied by the add
    rows = estimate(model, x, profile).per_layer
    variable = {r["name"]: max(0.0, r["latency_ms"] - r["fixed_ms"]) for r in rows}
    assert variable["bn#add"] > 0 and variable["stem_bn#relu"] == 0.0  # the relu is the stem's epilogue
    members = ("stem", "stem_bn", "conv", "bn")  # the head reads the 8 channels too: its share per input channel
    expected = sum(v for k, v in variable.items() if k.split("#", 1)[0] in members) / 8 + variable["head"] / 8
    assert group.latency_ms_per_channel == pytest.approx(expected)


class _Functional(nn.Module):
    """Convs, a matmul and a linear layer written with torch.nn.functional and ``@`` in forward, as weight-
    standardised convs and attention blocks are, plus the transposes that feed them."""

    def __init__(self):
        super().__init__()
        self.conv_w, self.conv_b = nn.Parameter(torch.randn(16, 3, 3, 3)), nn.Parameter(torch.zeros(16))
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Parameter(torch.randn(16, 1, 3, 3))
        self.fc_w = nn.Parameter(torch.randn(10, 16))

    def forward(self, x):
        w = (self.conv_w - self.conv_w.mean((1, 2, 3), keepdim=True)) / (self.conv_w.std((1, 2, 3), keepdim=True) + 1e-5)
        y = torch.relu(self.bn(F.conv2d(x, w, self.conv_b, 1, 1)))
        y = F.conv2d(y, self.dw, None, 1, 1, 1, 16)
        t = y.flatten(2).transpose(1, 2)  # (1, HW, C)
        z = ((t @ t.transpose(1, 2)) @ t).mean(1)
        return F.linear(z, self.fc_w)


def test_functional_convs_matmuls_and_linears_are_priced_as_their_onnx_nodes(tmp_path):
    """Stop 33: F.conv2d / F.linear / ``@`` / transpose in forward were invisible to the PyTorch-side estimate."""
    from hwkd.hardware.cost import estimate_onnx, trace_torch

    model, x, profile = _Functional().eval(), torch.randn(1, 3, 16, 16), load_profile("rpi4")
    works = {w.name: w for w in trace_torch(model, x)}
    conv = works["conv"]  # the standardised weight is computed from weights alone: a constant, not an input
    assert (conv.op, conv.macs, conv.kind, conv.kernel, conv.in_channels) == ("Conv", 16 * 256 * 27, "conv", 9, 3)
    assert works["bn"].fused and works["bn#relu"].fused  # BN and relu fold into the functional conv
    assert works["bn#conv"].kind == "depthwise" and works["bn#conv"].macs == 16 * 256 * 9
    assert [w.macs for w in works.values() if w.op == "MatMul"] == [256 * 256 * 16, 256 * 16 * 256]
    assert works["gemm"].macs == 160 and works["gemm"].params == 160
    path = tmp_path / "functional.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    assert estimate(model, x, profile).latency_ms == pytest.approx(estimate_onnx(path, profile).latency_ms, rel=1e-3)


def test_an_exported_convnext_is_priced_though_its_value_info_names_the_batch(tmp_path):
    """timm's ConvNeXt export keeps ``[batch, C]`` in value_info for its classifier's input; shape inference
    kept the symbol once the input was pinned to batch 1, and `hwkd estimate` failed on the Gemm (stop 33)."""
    timm = pytest.importorskip("timm")
    from hwkd.hardware.cost import estimate_onnx
    from hwkd.onnx.export import export_onnx

    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10).eval()
    path = export_onnx(model, torch.randn(1, 3, 64, 64), tmp_path / "convnext.onnx", {}, name="convnext_atto")
    cost = estimate_onnx(path, load_profile("rpi4"))
    assert cost.latency_ms > 0 and cost.macs > 0
    assert [r for r in cost.per_layer if r["op"] == "Gemm"][0]["macs"] == 320 * 10
    # and the PyTorch side sees the Transposes its LayerNorm2d writes around F.layer_norm (0.81 before stop 33)
    from_torch = estimate(model, torch.zeros(1, 3, 64, 64), load_profile("rpi4")).latency_ms
    assert from_torch == pytest.approx(cost.latency_ms, rel=0.01)


def test_a_vision_transformer_is_priced_as_its_export(tmp_path):
    """Attention (F.scaled_dot_product_attention), qkv.unbind and exact GELU are priced as the nodes the exporter
    writes for them (stop 33: the PyTorch side saw 0.69 of a ViT-Tiny's ONNX estimate)."""
    pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    from hwkd.hardware.cost import estimate_onnx
    from hwkd.onnx.export import export_onnx

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
    path = export_onnx(model, torch.randn(1, 3, 32, 32), tmp_path / "vit.onnx", {}, name="vit")
    profile = load_profile("rpi4")
    works = [w.op for w in trace_torch_ops(model)]
    assert works.count("Softmax") == 2 and works.count("Erf") == 2 and works.count("Slice") == 2 * (3 + 3)
    # stop 35: the class token's Expand (and the Concat of its run-time shape) and the x[:, 0] Gather, left out
    # before (3.5% of this 2-block toy, 0.06% of ViT-Tiny at 224 px)
    assert works[2:4] == ["Concat", "Expand"] and works[-2:] == ["Gather", "Linear"]
    assert estimate(model, torch.zeros(1, 3, 32, 32), profile).latency_ms == pytest.approx(
        estimate_onnx(path, profile).latency_ms, rel=1e-3
    )


class _Indexing(nn.Module):
    """Indexing in ``forward``: integer indices (Gather), partial slices (Slice), whole slices and a weight's
    slice (nothing: the exporter folds it), an expand of activations."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8 * 6 + 8, 10)
        self.scale = nn.Parameter(torch.ones(12))

    def forward(self, x):
        y = self.conv(x).flatten(2)  # (batch, 8 channels, 64 positions)
        a = y[:, :, 1:7]  # one Slice
        b = y[:, 0:4, 0][:, :, None].expand(-1, -1, 2).flatten(1)  # Slice + Gather, then Expand
        return self.fc(torch.cat([a.flatten(1), b], 1)) * self.scale[:10]


def test_indexing_is_priced_as_its_export(tmp_path):
    """Stop 35: x[:, 0] and x[:, 1:] in forward were not priced (a ViT's class token, its head's Gather)."""
    from hwkd.hardware.cost import estimate_onnx, trace_onnx, trace_torch
    from hwkd.onnx.export import export_onnx

    model, x, profile = _Indexing().eval(), torch.randn(1, 3, 8, 8), load_profile("rpi4")
    path = export_onnx(model, x, tmp_path / "indexing.onnx", {}, name="indexing")
    sizes = [(w.op, w.act_in, w.act_out) for w in trace_torch(model, x) if w.op in ("Gather", "Slice", "Expand")]
    assert sizes == [("Slice", 512, 48), ("Slice", 512, 256), ("Gather", 256, 4), ("Expand", 4, 8)]
    exported = [(w.op, w.act_in, w.act_out) for w in trace_onnx(path)[0] if w.op in ("Gather", "Slice", "Expand")]
    assert sorted(exported) == sorted(sizes)
    assert estimate(model, x, profile).latency_ms == pytest.approx(estimate_onnx(path, profile).latency_ms, rel=1e-6)


def trace_torch_ops(model):
    from hwkd.hardware.cost import trace_torch

    return trace_torch(model, torch.zeros(1, 3, 32, 32))


class _TanhGelu(nn.Module):
    """GELU's tanh form, as a module and as a function: exported as eight nodes, not exact GELU's five."""

    def __init__(self):
        super().__init__()
        self.conv, self.act, self.fc = nn.Conv2d(3, 16, 3, padding=1), nn.GELU(approximate="tanh"), nn.Linear(16, 10)

    def forward(self, x):
        y = self.act(self.conv(x)).mean((2, 3))
        return self.fc(F.gelu(y, approximate="tanh"))


def test_tanh_gelu_is_priced_as_its_export(tmp_path):
    from hwkd.hardware.cost import estimate_onnx, trace_torch

    model, x, profile = _TanhGelu().eval(), torch.randn(1, 3, 16, 16), load_profile("rpi4")
    ops = [w.op for w in trace_torch(model, x)]
    assert ops.count("Tanh") == 2 and ops.count("Pow") == 2 and "Erf" not in ops  # stop 34: priced as exact before
    from hwkd.onnx.export import export_onnx  # at hwkd's opset (18), where GELU is not one ONNX op yet

    path = export_onnx(model, x, tmp_path / "tanh_gelu.onnx", {}, name="tanh_gelu")
    assert estimate(model, x, profile).latency_ms == pytest.approx(estimate_onnx(path, profile).latency_ms, rel=1e-3)


def test_int8_transformer_and_convnext_blocks_are_priced_as_hwkd_exports_them(tmp_path):
    """Stop 34: at INT8 the PyTorch side kept GELU as one op between a DQ and a Q, and a ViT's LayerNorms
    quantized. Stop 35: ONNX Runtime's optimised graph of the PT2E export runs 20 Q and 20 DQ in a 2-block toy
    ViT, where both sides priced 6 and 8: the Q after each token linear's float bias Add, after GELU and after
    attention; the DQs of q, k (twice) and v, one per GELU node reading x; a ConvNeXt's norm converts at both
    ends through its transposes."""
    timm = pytest.importorskip("timm")
    from timm.models.vision_transformer import VisionTransformer

    from hwkd.hardware.cost import estimate_onnx, trace_onnx

    profile = load_profile("rpi4")
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    _, path = calibrated_int8(copy.deepcopy(vit), x.shape[1:], tmp_path=tmp_path, filename="vit_int8.onnx")
    assert _qdq_counts(w.op for w in trace_onnx(path)[0]) == ort_qdq_counts(path) == (20, 20)
    ops = [w.op for w in trace_torch_int8(vit, x)]
    assert ops.count("Erf") == 2 and ops.count("LayerNorm") == 5
    # the PyTorch side leaves out one requantizing DQ -> Q pair on the first block's residual (1.7% of the toy)
    assert _qdq_counts(ops) == (19, 19)
    assert estimate(vit, x[:1], profile, "int8").latency_ms == pytest.approx(
        estimate_onnx(path, profile, "int8").latency_ms, rel=0.02
    )
    convnext = timm.create_model("convnext_atto", pretrained=False, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    _, path = calibrated_int8(copy.deepcopy(convnext), x.shape[1:], tmp_path=tmp_path, filename="convnext_int8.onnx")
    assert _qdq_counts(w.op for w in trace_torch_int8(convnext, x)) == _qdq_counts(w.op for w in trace_onnx(path)[0])
    assert estimate(convnext, x[:1], profile, "int8").latency_ms == pytest.approx(
        estimate_onnx(path, profile, "int8").latency_ms, rel=0.02
    )


class _MeanHead(nn.Module):
    """A conv net whose head averages with x.mean (ReduceMean: no integer kernel in ORT) and flattens."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean(3).mean(2, keepdim=True).flatten(1))


class _TokenNorm(nn.Module):
    """Tokens through a linear, a LayerNorm (its weights quantized by ORT's static QDQ, their DQs kept by ORT),
    a softmax (an integer kernel in ORT) and slices (views on int8)."""

    def __init__(self):
        super().__init__()
        self.fc, self.norm, self.head = nn.Linear(8, 12), nn.LayerNorm(12), nn.Linear(6 * 16, 10)

    def forward(self, x):  # x: (batch, 16 tokens, 8)
        y = self.norm(self.fc(x)).softmax(-1)
        return self.head((y[:, :, :6] * y[:, :, 6:]).flatten(1))


@pytest.mark.parametrize(("model", "shape", "counts"), [(_MeanHead, (3, 8, 8), (2, 2)), (_TokenNorm, (16, 8), None)])
def test_qdq_nodes_priced_are_those_onnx_runtime_runs(tmp_path, model, shape, counts):
    """Stop 35: a Q after a view of a float op (ReduceMean -> Flatten -> Q) was priced as folded because the
    view is foldable, and a DQ of a quantized constant feeding a float op (a LayerNorm's weight) not at all; ORT
    runs both. What is priced is what ORT's optimised graph keeps (ONNX Runtime's static QDQ here)."""
    from hwkd.hardware.calibrate import quantize
    from hwkd.hardware.cost import trace_onnx
    from hwkd.onnx.export import export_onnx

    fp32 = export_onnx(model().eval(), torch.randn(1, *shape), tmp_path / "m.onnx", {}, name="m")
    int8 = quantize(fp32, tmp_path / "m-int8.onnx", np.random.default_rng(0))
    priced, runs = _qdq_counts(w.op for w in trace_onnx(int8)[0]), ort_qdq_counts(int8)
    assert priced == runs and (counts is None or runs == counts)


def _qdq_counts(ops) -> tuple[int, int]:
    ops = list(ops)
    return ops.count("QuantizeLinear"), ops.count("DequantizeLinear")


def ort_qdq_counts(path) -> tuple[int, int]:
    """QuantizeLinear and DequantizeLinear nodes in ONNX Runtime's optimised graph: what it really runs."""
    from hwkd.onnx.check import ort_executed_ops

    return _qdq_counts(ort_executed_ops(path).elements())


def trace_torch_int8(model, x):
    from hwkd.hardware.cost import trace_torch

    return trace_torch(model, x[:1], "int8")


class _TokenMLP(nn.Module):
    """Linear layers on tokens (rank 3), as a module and as F.linear, each followed by an activation."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2_w, self.fc2_b = nn.Linear(8, 32), nn.Parameter(torch.randn(8, 32)), nn.Parameter(torch.zeros(8))
        self.head = nn.Linear(16 * 8, 10)

    def forward(self, x):  # x: (batch, 16 tokens, 8)
        y = F.gelu(F.linear(F.gelu(self.fc1(x)), self.fc2_w, self.fc2_b))
        return self.head(y.flatten(1))


def test_a_linear_on_tokens_keeps_its_bias_add_and_activation_apart(tmp_path):
    """Stop 34: ORT fuses MatMul + Add into a Gemm only in 2-D; a ViT's optimised graph keeps each token linear's
    bias Add (and what follows) as nodes of their own, which both sides priced as a free epilogue."""
    from hwkd.hardware.cost import estimate_onnx, trace_onnx, trace_torch
    from hwkd.onnx.export import export_onnx

    model, x, profile = _TokenMLP().eval(), torch.randn(1, 16, 8), load_profile("rpi4")
    path = export_onnx(model, x, tmp_path / "tokens.onnx", {}, name="tokens")
    onnx_works = trace_onnx(path)[0]
    assert [(w.op, w.fused) for w in onnx_works if w.op in ("Add", "Div")] == [("Add", False), ("Div", False), ("Add", False)] * 2
    works = trace_torch(model, x)
    assert [(w.op, w.fused) for w in works if w.op in ("Add", "Div")] == [("Add", False), ("Div", False), ("Add", False)] * 2
    assert sum(w.params for w in works) == sum(p.numel() for p in model.parameters())
    _, int8 = calibrated_int8(copy.deepcopy(model), (16, 8), tmp_path=tmp_path, filename="tokens_int8.onnx")
    for precision, exported in (("fp32", path), ("int8", int8)):  # the head (2-D) still takes its bias as a Gemm
        assert estimate(model, x, profile, precision).latency_ms == pytest.approx(
            estimate_onnx(exported, profile, precision).latency_ms, rel=1e-3
        )
