"""Measurements every stage reports the same way, so stages compare side by side in the report."""

from __future__ import annotations

from typing import Any

import torch

from hwkd.train import Modes, split_accuracy


def out_channels(model: torch.nn.Module) -> dict[str, int]:
    """Output channels of every conv / linear layer, for the before/after pruning table."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Conv2d):
            out[name] = mod.out_channels
        elif isinstance(mod, torch.nn.Linear):
            out[name] = mod.out_features
    return out


def channel_rounding(round_to: int, profile: Any) -> int:
    """Channel counts pruning rounds to: ``prune.round_to``, or the profile's ``channel_multiple`` when 0.
    The prune stage, the plan penalty and a width-multiplier student all round this way."""
    return round_to or profile.runtime.channel_multiple


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_metrics(model: torch.nn.Module, state, modes: Modes | None = None) -> dict[str, Any]:
    """Test/val accuracy, params, MACs and the cost model's estimate for an FP32 nn.Module."""
    from hwkd.hardware.cost import estimate

    ds = state.dataset
    cost = estimate(model, state.example_input, state.profile, precision="fp32")
    return {
        "accuracy": split_accuracy(model, ds, "test", modes),
        "val_accuracy": split_accuracy(model, ds, "val", modes),
        "params": cost.params,
        "macs": cost.macs,
        "estimated_latency_ms": cost.latency_ms,
        "estimated_memory_mb": cost.memory_mb,
    }
