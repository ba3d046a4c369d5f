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

With ``target="plan"`` the sums run only over the channels the prune stage's own planner
(``plan_removal``) would remove now to meet the budget, re-planned every ``replan_every`` calls: the
pruner's choice is made soft ahead of time, and the channels it keeps train without the penalty's pull.

With ``target="mask"`` the planned channels are not pulled but held at zero: after every optimizer step
(``after_step``) their BN scale *and shift* are set to 0, so the student trains as the network pruning
will leave (soft filter pruning, with the pruner's own budget plan choosing the filters). Both are
zeroed because a scale alone leaves the shift, a constant pruning would drop; a masked channel outputs
exactly zero, so pruning it changes nothing. (On the CIFAR-10 student the cost of pruning came from live
channels the plan missed, not from shifts: docs/decisions-issue14.md, stop 36.) The term it adds to the
loss is 0; ``penalty_weight > 0`` only switches it on. It is hwkd's default target (from 30% of
distillation): on CIFAR-10 it was above penalty-off + 0.5 points on the mean at both binding budgets and ahead of
it on every seed (by less than 0.5 on one of six); ``cost`` was above off + 0.5 on the mean too, with more epochs.
Mask is ahead of ``cost`` at 30% and in the jetson pipeline, level with it at 15%, and trains the fewest epochs
(docs/decisions-issue14.md, stops 38-41).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hwkd.config import PENALTY_TARGETS
from hwkd.errors import ConfigError
from hwkd.hardware.cost import BYTES_PER_VALUE, estimate

_MB = 2**20


def tp_bn_scale_importance():
    """torch-pruning's Network Slimming score, unnormalised: the prune stage's default ``bn_scale``."""
    import torch_pruning as tp

    return tp.importance.BNScaleImportance(normalizer=None)


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
    bn_shifts: list[torch.Tensor | None] = field(default_factory=list)  # each BN's bias, parallel to bn_scales
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

    def held_at_zero(self) -> list[int]:
        """Root channel positions whose BN scale and shift are exactly zero in every BN of the group: channels
        that put out nothing (what ``penalty_target = "mask"`` holds), so removing them changes nothing. A
        position no BN covers is not counted (nothing says it is dead)."""
        if not self.bn_scales:
            return []
        covered = torch.zeros(self.channels)
        live = torch.zeros(self.channels)
        for (w, idxs, root_idxs), b in zip(self.bn_scales, self.bn_shifts, strict=True):
            roots = torch.as_tensor(root_idxs, dtype=torch.long)
            nonzero = w.detach()[idxs].cpu() != 0
            if b is not None:
                nonzero |= b.detach()[idxs].cpu() != 0
            covered.index_add_(0, roots, torch.ones(len(root_idxs)))
            live.index_add_(0, roots, nonzero.float())
        return [i for i in range(self.channels) if covered[i] > 0 and live[i] == 0]


def dependency_graph(model: nn.Module, example_input: Any):
    """torch-pruning's graph; layers it cannot follow (``dg.hwkd_unprunable``) are left out of the groups."""
    from hwkd.models.depgraph import dependency_graph as tolerant_graph

    return tolerant_graph(model, example_input)


def remove_channels(dg, groups: list[ChannelGroup], channels: dict[int, list[int]], model: nn.Module | None = None) -> dict:
    """Prune ``channels`` (group index -> root channel positions) through torch-pruning's graph ``dg``. The
    groups were found on the model ``dg`` was built from, or on the original of ``model``, a copy (its layers
    are then found by name). Returns how many channels were removed, in all and per group root."""
    modules = dict(model.named_modules()) if model is not None else None
    removed, layers = 0, {}
    for gi, idxs in channels.items():
        g = groups[gi]
        root = g.group[0]
        layer = root.dep.target.module if modules is None else modules[g.root_name]
        dg.get_pruning_group(layer, root.dep.handler, list(idxs)).prune()
        removed += len(idxs)
        layers[g.root_name] = len(idxs)
    return {"removed": removed, "layers": layers}


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
        bns, shifts, seen = [], [], set()
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
                shifts.append(module.bias)
        groups.append(
            ChannelGroup(
                root=root_item.dep.target.module,
                root_name=names.get(root_item.dep.target.module, ""),
                channels=n,
                latency_ms_per_channel=ms,
                memory_mb_per_channel=mb,
                bn_scales=bns,
                bn_shifts=shifts,
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


@dataclass
class RemovalPlan:
    """Which channels of which group a budget-pruning step removes, and the saving it predicts."""

    channels: dict[int, list[int]]  # group index -> channel positions in the group's root, cheapest first
    saved_ms: float
    saved_mb: float


def plan_removal(
    groups: list[ChannelGroup], scores: list[torch.Tensor | None], *, need_ms: float, need_mb: float,
    round_to: int = 1, max_layer_ratio: float = 0.75, min_channels: int | None = None,
) -> RemovalPlan:  # fmt: skip
    """The greedy HALP-like choice of the prune stage, without pruning: take channel chunks with the least
    importance (``scores[i]``, per channel of ``groups[i]``; None skips the group) per unit of cost saved
    until the linearised saving covers ``need_ms`` and ``need_mb``.

    Chunks are ``round_to`` channels, so every layer keeps a count the device's vector units like. A group
    keeps at least ``min_channels`` when given, else ``1 - max_layer_ratio`` of what it has. The budget
    penalty's "plan" target calls this during training to learn which channels pruning will take.
    """
    chunk = max(1, round_to)
    candidates, orders = [], {}
    for gi, (g, score) in enumerate(zip(groups, scores, strict=True)):
        if score is None:
            continue
        order = torch.argsort(score.detach().float().cpu()).tolist()
        orders[gi] = order
        floor = min_channels or max(chunk, math.ceil(g.channels * (1 - max_layer_ratio) / chunk) * chunk)
        first = g.channels % chunk or chunk  # align the rest to multiples of round_to
        pos = 0
        size = first
        while g.channels - (pos + size) >= floor:
            saved_ms = size * g.latency_ms_per_channel
            saved_mb = size * g.memory_mb_per_channel
            gain = _share(saved_ms, need_ms) + _share(saved_mb, need_mb)
            if gain > 0:
                value = float(score[order[pos : pos + size]].sum())
                candidates.append((value / gain, gi, pos + size, saved_ms, saved_mb))
            pos += size
            size = chunk
    candidates.sort(key=lambda c: c[0])
    upto: dict[int, int] = {}
    got_ms = got_mb = 0.0
    for _, gi, end, saved_ms, saved_mb in candidates:
        if got_ms >= need_ms and got_mb >= need_mb:
            break
        if end <= upto.get(gi, 0):
            continue
        upto[gi] = end  # chunks of one group are taken cheapest first, since value/gain rises with score
        got_ms += saved_ms
        got_mb += saved_mb
    return RemovalPlan({gi: orders[gi][:end] for gi, end in upto.items()}, got_ms, got_mb)


def _share(saved: float, need: float) -> float:
    """What a chunk's saving is worth against what is still needed (an unlimited need: any saving counts)."""
    if need <= 0:
        return 0.0
    return saved / need if math.isfinite(need) else float(saved > 0)


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
        target: str = "cost",
        round_to: int = 1,
        plan_max_layer_ratio: float = 0.9375,
        replan_every: int = 50,
        check_rounds: int = 8,
    ):
        if target not in PENALTY_TARGETS:
            raise ConfigError(f"the penalty target must be one of {', '.join(PENALTY_TARGETS)}, got {target!r}.")
        self.target = target
        self.round_to = round_to
        self.plan_max_layer_ratio = plan_max_layer_ratio
        self.replan_every = max(1, replan_every)
        self.check_rounds = check_rounds  # replan(): plans checked against the estimate of a pruned copy
        self.calls = 0
        self.enabled = True  # False: the penalty is 0 and plans nothing (distill.penalty_start)
        self.plan: list[list[int]] | None = None  # "plan": per group, the channels pruning would take now
        self._masks: list[torch.Tensor] | None = None
        self._held_at_zero: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]] = []  # mask target
        self.precision = precision or getattr(budget, "precision", "fp32")
        self.budget_ms = float(budget.latency_ms)
        self.budget_mb = float(budget.memory_mb)
        self.dead_fraction = dead_fraction
        self.ramp = ramp
        self._model, self._example, self._profile = model, example_input, profile
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

    def state_dict(self) -> dict[str, float]:
        """What was fixed when the penalty was built (the normaliser and starting estimate), for resume.

        Rebuilt from a partly trained model these would differ, so a resumed epoch would see another loss.
        """
        state: dict[str, Any] = {"g0": self.g0, "latency_ms": self.latency_ms, "memory_mb": self.memory_mb}
        if self.target in ("plan", "mask"):
            state.update(calls=self.calls, plan=self.plan)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.g0, self.latency_ms, self.memory_mb = state["g0"], state["latency_ms"], state["memory_mb"]
        if self.target in ("plan", "mask") and state.get("plan") is not None:
            self.calls = int(state["calls"])
            self._set_plan(state["plan"])

    def replan(self) -> None:
        """Ask the pruner's own planner which channels it would remove now to meet the budget (1% under it,
        as the prune stage aims), ranking by raw |gamma| like the default ``bn_scale`` importance.

        The planner's saving is linearised per channel, and on small students it over-predicts (CIFAR-10,
        MobileNetV2 at 15%: the cost model's estimate of the pruned model fell by 0.37-0.52 of what the plan
        predicted), so a plan for the predicted need covers only part of the cut the prune stage then makes,
        step by step against the full estimate. The plan is therefore checked the same way: the planned
        channels are pruned from a copy and the copy estimated; while it misses, the need is scaled by how
        far the prediction fell short and the plan is made again (``check_rounds``)."""
        importance = tp_bn_scale_importance()
        with torch.no_grad():
            scores = [importance(g.group) for g in self.groups]
        want_ms = max(0.0, self.latency_ms - 0.99 * self.budget_ms)
        want_mb = max(0.0, self.memory_mb - 0.99 * self.budget_mb)

        def make(scale: float) -> RemovalPlan:
            return plan_removal(self.groups, scores, round_to=self.round_to, max_layer_ratio=self.plan_max_layer_ratio,
                                need_ms=scale * want_ms, need_mb=scale * want_mb)  # fmt: skip

        plan = self._checked_plan(make, want_ms, want_mb)
        self._set_plan([plan.channels.get(i, []) for i in range(len(self.groups))])

    def _checked_plan(self, make, want_ms: float, want_mb: float) -> RemovalPlan:
        """The plan for the smallest multiple (>= 1) of the need whose pruned copy the cost model prices within
        the budget: grow the multiple by the shortfall until a plan fits, then bisect between the last miss and
        the last fit, ``check_rounds`` estimates at most (0: the linearised plan alone)."""
        scale, plan = 1.0, make(1.0)
        miss, fit, fitting = 1.0, None, None
        for _ in range(self.check_rounds):
            if not plan.channels:
                break
            after_ms, after_mb = self._estimate_without(plan.channels)
            real_ms, real_mb = self.latency_ms - after_ms, self.memory_mb - after_mb
            if real_ms >= want_ms and real_mb >= want_mb:
                fit, fitting = scale, plan
            else:
                miss = scale
            if fit is None:
                short_ms = want_ms / max(real_ms, 1e-3 * want_ms) if want_ms > 0 else 1.0
                short_mb = want_mb / max(real_mb, 1e-3 * want_mb) if want_mb > 0 else 1.0
                scale = miss * max(1.05, short_ms, short_mb)
            else:
                scale = (miss + fit) / 2
            following = make(scale)
            if following.channels == plan.channels:
                break  # a larger need changes nothing (every group at its floor), or the bisection has closed
            plan = following
        return fitting or plan

    def _estimate_without(self, channels: dict[int, list[int]]) -> tuple[float, float]:
        """The cost model's (latency ms, memory MB) of a copy of the model with ``channels`` pruned."""
        import copy

        model = copy.deepcopy(self._model).eval()
        remove_channels(dependency_graph(model, self._example), self.groups, channels, model=model)
        cost = estimate(model, self._example, self._profile, self.precision)
        return cost.latency_ms, cost.memory_mb

    def _set_plan(self, plan: list[list[int]]) -> None:
        self.plan = [list(map(int, p)) for p in plan]
        self._masks = []
        self._held_at_zero = []  # (BN scale, BN shift, positions in that BN), worked out once per plan
        for g, idxs in zip(self.groups, self.plan, strict=True):
            w = g.bn_scales[0][0]
            mask = torch.zeros(g.channels, dtype=w.dtype, device=w.device)
            mask[idxs] = 1.0
            self._masks.append(mask)
            wanted = set(idxs)
            for (scale, bn_idxs, root_idxs), shift in zip(g.bn_scales, g.bn_shifts, strict=True):
                pos = [i for i, r in zip(bn_idxs, root_idxs, strict=True) if r in wanted]
                if pos:
                    self._held_at_zero.append((scale, shift, torch.as_tensor(pos, device=scale.device)))

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
        for i, g in enumerate(self.groups):
            mag = g.scale_magnitude()
            mag = (mag if self._masks is None else mag * self._masks[i]).sum()
            a = mag * (g.latency_ms_per_channel / (self.budget_ms * self.g0))
            b = mag * (g.memory_mb_per_channel / (self.budget_mb * self.g0))
            lat = a if lat is None else lat + a
            mem = b if mem is None else mem + b
        if lat is None:
            zero = torch.zeros(())
            return zero, zero
        return lat, mem

    def __call__(self, model: nn.Module | None = None) -> torch.Tensor:
        if not self.enabled:
            return torch.zeros(())
        if self.target in ("plan", "mask"):
            if self.calls % self.replan_every == 0 or self._masks is None:
                self.replan()
            self.calls += 1
        if self.target == "mask":
            return torch.zeros(())  # the mask acts in after_step, on the parameters
        gate_ms, gate_mb = self.gates()
        lat, mem = self.soft_terms()
        return gate_ms * lat + gate_mb * mem

    def after_step(self, model: nn.Module | None = None) -> None:
        """``mask`` target: hold the planned channels' BN scale and shift at zero (called after each
        optimizer step, so the next forward and every evaluation see the network pruning will leave)."""
        if self.target != "mask" or not self.enabled or self.plan is None:
            return
        with torch.no_grad():
            for scale, shift, at in self._held_at_zero:
                scale.index_fill_(0, at, 0.0)
                if shift is not None:
                    shift.index_fill_(0, at, 0.0)


def _ramp(over: float, width: float) -> float:
    """0 when at or under budget, rising linearly to 1 at ``width`` (a fraction) over it."""
    if over <= 0:
        return 0.0
    return min(1.0, over / width)


__all__ = ["PENALTY_TARGETS", "BudgetPenalty", "ChannelGroup", "RemovalPlan", "channel_groups", "dependency_graph", "plan_removal", "remove_channels"]
