"""benchmarks/kernel_dataset.py: ORT's per-node profile matched to the traced layers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from hwkd.hardware.cost import LayerWork

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import kernel_dataset as kd  # noqa: E402


def _works():
    return [
        LayerWork("stem", "Conv", 3 * 8 * 9 * 1024, 216, 3072, 8192, 8, kernel=9, in_channels=3),
        LayerWork("relu", "Relu", 0, 0, 8192, 8192, fused=True),
        LayerWork("c2", "Conv", 8 * 16 * 9 * 256, 1152, 8192, 4096, 16, kernel=9, in_channels=8),
        LayerWork("pool", "GlobalAveragePool", 0, 0, 4096, 16),
        LayerWork("fc", "Gemm", 160, 170, 16, 10, 10),
    ]


def _node(op, us, out):
    return {"node": op.lower(), "op": op, "us": us, "out": out}


def test_each_mac_node_is_charged_to_its_layer_with_the_reorder_before_it():
    nodes = [_node("Conv", 10.0, [1, 16, 32, 32]), _node("ReorderOutput", 2.0, [1, 8, 32, 32]),
             _node("Conv", 7.0, [1, 16, 16, 16]), _node("GlobalAveragePool", 1.0, [1, 16, 1, 1]),
             _node("ReorderOutput", 0.5, [1, 16, 1, 1]), _node("Reshape", 0.25, [1, 16]), _node("Gemm", 1.5, [1, 10])]  # fmt: skip
    times, other, why = kd.layer_times(_works(), nodes)
    assert why == ""
    assert times == {0: 10.0, 2: 9.0, 4: 2.0}  # c2 pays the reorder before it; fc the one before the reshape
    assert other == pytest.approx(1.25)  # the pool and the reshape


def test_nhwc_int8_outputs_match_and_a_missing_layer_is_reported():
    nodes = [_node("Transpose", 1.0, [1, 32, 32, 3]), _node("QLinearConv", 10.0, [1, 32, 32, 8]),
             _node("QLinearConv", 5.0, [1, 16, 16, 16]), _node("Gemm", 1.0, [1, 10])]  # fmt: skip
    times, _, why = kd.layer_times(_works(), nodes)
    assert why == "" and times[0] == 11.0
    _, _, why = kd.layer_times(_works(), nodes[:2] + nodes[3:])
    assert why == "3 MAC layers traced, 2 MAC nodes executed"
    wrong = [nodes[0], _node("QLinearConv", 10.0, [1, 8, 30, 30]), *nodes[2:]]
    _, _, why = kd.layer_times(_works(), wrong)
    assert "1024 output pixels traced" in why


def _synthetic_models(n: int, seed: int = 0) -> list[dict]:
    """Networks whose every conv costs 0.005 ns per FLOP + 2 us, with 3 us per run: what a fit must recover."""
    import numpy as np

    rng = np.random.default_rng(seed)
    models = []
    for k in range(n):
        works, layer_us = [], {}
        for i in range(4):
            cin, cout, pix = (int(rng.choice([16, 32, 64])), int(rng.choice([16, 32, 64])), int(rng.choice([64, 256, 1024])))
            w = LayerWork(f"c{i}", "Conv", cin * cout * 9 * pix, cin * cout * 9, cin * pix, cout * pix, cout,
                          kernel=9, in_channels=cin)  # fmt: skip
            works.append(w)
            layer_us[i] = 2 * w.macs * 0.005e-3 + 2.0
        total_ms = (sum(layer_us.values()) + 3.0) * 1e-3
        models.append({"model": f"n{k}", "group": "calibration:random" if k % 2 else "calibration:resnet",
                       "precision": "int8", "works": works, "layer_us": layer_us, "cpu_ms": total_ms,
                       "wall_ms": total_ms, "unmatched": ""})  # fmt: skip
    return models


def test_the_per_layer_fits_recover_a_known_per_layer_cost():
    import kernel_fit

    train, test = _synthetic_models(40), _synthetic_models(10, seed=1)
    layer = kernel_fit.LayerFit().fit(train, "int8")
    assert all(abs(layer.predict_ms(m) / m["wall_ms"] - 1) < 0.02 for m in test)
    kernel = kernel_fit.KernelFit().fit(train, "int8")
    assert all(abs(kernel.predict_ms(m) / m["wall_ms"] - 1) < 0.15 for m in test)  # trees: piecewise, not exact
