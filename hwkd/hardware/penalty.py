"""What each prunable channel costs on the device, and the budget penalty built from it.

``channel_groups`` asks torch-pruning's DependencyGraph which layers shrink together when one channel
goes (a conv's outputs, its BN, the next convs' inputs, every branch of a residual add) and prices one
channel of each group with the cost model: the latency and memory it adds, linearised from the layer
estimates. The budget-driven prune stage ranks groups by importance per millisecond saved with it, and
the penalty uses it to weight each channel's BN scale.

``BudgetPenalty`` is MorphNet's cost-weighted sparsity on BatchNorm scales, turned towards a budget::

    penalty = gate_latency * sum_c |gamma_c| * ms_c / (B_ms * g0)
            + gate_memory  * sum_c |gamma_c| * mb_c / (B_mb * g0)

where ``ms_c`` / ``mb_c`` is what channel ``c`` costs and ``g0`` the mean |gamma| when the penalty was
built, so at the start each sum is about (channel-dependent latency) / budget. Channels that cost more
are pushed harder; channels that cost nothing (layers bound by dispatch overhead) are left alone. A
gate in [0, 1] fades the term once the estimate, counting channels whose |gamma| has fallen below
``dead_fraction`` of their group's largest as pruned, is under budget, so the penalty stops shrinking a
model that already fits. The channels it drives down are the ones BN-scale importance prunes first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hwkd.hardware.cost import BYTES_PER_VALUE, estimate

_MB = 2**20


@dataclass
class ChannelGroup:
    """Channels that are pruned together, with what one of them costs on the device."""

    root: nn.Module  # the conv/linear whose output channels define the group
    root_name: str
    channels: int
    latency_ms_per_channel: float
    memory_mb_per_channel: float
    # (BN weight, its channel idxs, the matching root channel positions)
    bn_scales: list[tuple[torch.Tensor, list[int], list[int]]] = field(default_factory=list)
    group: Any = None  # torch-pruning Group, valid until the model is pruned

    def scale_magnitude(self) -> torch.Tensor | None:
        """Per channel, the sum of |gamma| over the group's BN layers (None when it has no BN)."""
        if not self.bn_scales:
            return None
        out = None
        for w, idxs, root_idxs in self.bn_scales:
            part = torch.zeros(self.channels, dtype=w.dtype, device=w.device)
            part = part.index_add(0, torch.as_tensor(root_idxs, device=w.device), w[idxs].abs())
            out = part if out is None else out + part
        return out


def dependency_graph(model: nn.Module, example_input: Any):
    """torch-pruning's graph; layers it cannot follow (``dg.hwkd_unprunable``) are left out of the groups."""
    from hwkd.models.depgraph import dependency_graph as tolerant_graph

    return tolerant_graph(model, example_input)


def channel_groups(
    model: nn.Module,
    example_input: Any,
    profile: Any,
    precision: str = "fp32",
    ignored_layers: list[nn.Module] | None = None,
    dg: Any = None,
) -> list[ChannelGroup]:
    """Every prunable channel group of ``model`` with its per-channel latency and memory on ``profile``."""
    cost = estimate(model, example_input, profile, precision)
    variable_ms: dict[str, float] = {}
    for row in cost.per_layer:
        base = row["name"].split("#", 1)[0]
        variable_ms[base] = variable_ms.get(base, 0.0) + max(0.0, row["latency_ms"] - row["fixed_ms"])
    names = {m: n for n, m in model.named_modules()}
    nbytes = BYTES_PER_VALUE[precision]
    dg = dg or dependency_graph(model, example_input)
    groups = []
    ignored = [*(ignored_layers or []), *getattr(dg, "hwkd_unprunable", {})]
    for group in dg.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv2d, nn.Conv1d, nn.Linear)):
        root_item = group[0]
        n = len(root_item.idxs)
        ms = mb = 0.0
        bns, seen = [], set()
        for item in group:
            module = item.dep.target.module
            if not isinstance(module, nn.Module) or module in seen:
                continue
            seen.add(module)
            size = _pruned_dim_size(module, item.dep.handler.__name__)
            if size <= 0:
                continue
            name = names.get(module, "")
            ms += variable_ms.get(name, 0.0) / size
            own = sum(p.numel() for p in module.parameters(recurse=False))
            mb += own * nbytes / _MB / size
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
                bns.append((module.weight, list(item.idxs), list(item.root_idxs)))
        groups.append(
            ChannelGroup(
                root=root_item.dep.target.module,
                root_name=names.get(root_item.dep.target.module, ""),
                channels=n,
                latency_ms_per_channel=ms,
                memory_mb_per_channel=mb,
                bn_scales=bns,
                group=group,
            )
        )
    return groups


def _pruned_dim_size(module: nn.Module, handler: str) -> int:
    """Channels along the dimension a torch-pruning handler cuts (out for outputs/BN, in for inputs)."""
    out_side = handler == "prune_out_channels"
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels if out_side else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if out_side else module.in_features
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features
    return 0


class BudgetPenalty:
    """``penalty(model) -> scalar``: cost-weighted L1 on BN scales that fades once under budget.

    Built once per training run for a fixed architecture (the channel costs come from the cost model and
    torch-pruning's groups); call it on the same model it was built for.

    Example::

        penalty = BudgetPenalty(model, x[:1], profile, budget)
        fit(model, data, ..., penalty_fn=penalty, penalty_weight=1.0)
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Any,
        profile: Any,
        budget: Any,
        precision: str | None = None,
        ignored_layers: list[nn.Module] | None = None,
        dead_fraction: float = 0.05,
        ramp: float = 0.05,
    ):
        self.precision = precision or getattr(budget, "precision", "fp32")
        self.budget_ms = float(budget.latency_ms)
        self.budget_mb = float(budget.memory_mb)
        self.dead_fraction = dead_fraction
        self.ramp = ramp
        cost = estimate(model, example_input, profile, self.precision)
        self.latency_ms = cost.latency_ms
        self.memory_mb = cost.memory_mb
        groups = channel_groups(model, example_input, profile, self.precision, ignored_layers)
        self.groups = [g for g in groups if g.bn_scales]
        with torch.no_grad():
            mags = [g.scale_magnitude() for g in self.groups]
            total = sum(float(m.sum()) for m in mags)
            count = sum(m.numel() for m in mags)
        self.g0 = max(total / max(count, 1), 1e-8)

    def gates(self) -> tuple[float, float]:
        """(latency, memory) gates in [0, 1]: 0 once the estimate, with dead channels removed, fits."""
        saved_ms = saved_mb = 0.0
        with torch.no_grad():
            for g in self.groups:
                mag = g.scale_magnitude()
                dead = int((mag < self.dead_fraction * mag.max().clamp_min(1e-12)).sum())
                saved_ms += dead * g.latency_ms_per_channel
                saved_mb += dead * g.memory_mb_per_channel
        over_ms = (self.latency_ms - saved_ms) / self.budget_ms - 1.0
        over_mb = (self.memory_mb - saved_mb) / self.budget_mb - 1.0
        return _ramp(over_ms, self.ramp), _ramp(over_mb, self.ramp)

    def soft_terms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Ungated (latency, memory) sums, each about channel-dependent cost / budget at the start."""
        lat = mem = None
        for g in self.groups:
            mag = g.scale_magnitude().sum()
            a = mag * (g.latency_ms_per_channel / (self.budget_ms * self.g0))
            b = mag * (g.memory_mb_per_channel / (self.budget_mb * self.g0))
            lat = a if lat is None else lat + a
            mem = b if mem is None else mem + b
        if lat is None:
            zero = torch.zeros(())
            return zero, zero
        return lat, mem

    def __call__(self, model: nn.Module | None = None) -> torch.Tensor:
        gate_ms, gate_mb = self.gates()
        lat, mem = self.soft_terms()
        return gate_ms * lat + gate_mb * mem


def _ramp(over: float, width: float) -> float:
    """0 when at or under budget, rising linearly to 1 at ``width`` (a fraction) over it."""
    if over <= 0:
        return 0.0
    return min(1.0, over / width)


__all__ = ["BudgetPenalty", "ChannelGroup", "channel_groups", "dependency_graph"]
