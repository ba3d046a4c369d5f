"""Stage 2: structured channel pruning with torch-pruning (DepGraph), recovering with distillation.

DepGraph finds the layers that must shrink together (residual adds, depthwise convs, the BN after each
conv), so whole channels disappear and the model gets really smaller and faster, not just sparser.
Channel counts are rounded to the profile's multiple, since odd widths waste SIMD lanes.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch_pruning as tp

from hwkd.config import PRUNE_MODES, PruneConfig
from hwkd.distributed import any_rank, sync_model
from hwkd.errors import ConfigError
from hwkd.hardware.cost import estimate
from hwkd.hardware.penalty import (
    BudgetPenalty,
    channel_groups,
    dependency_graph,
    plan_removal,
    remove_channels,
    tp_bn_scale_importance,
)
from hwkd.kd.losses import make_kd_loss
from hwkd.models.depgraph import base_pruner, torch_pruning_errors, unprunable_layers
from hwkd.models.loaders import find_head
from hwkd.pipeline import PipelineState, RunContext, StageResult
from hwkd.registry import Registry
from hwkd.stages.common import channel_rounding, model_metrics, out_channels
from hwkd.train import distill_loss_fn, fit, predict, split_accuracy

IMPORTANCE: Registry = Registry("importance criterion")
IMPORTANCE.register("l2")(lambda: tp.importance.GroupMagnitudeImportance(p=2))
# Raw |gamma|, not normalised per group: the budget penalty shrinks the BN scales of expensive channels
# across the whole network, and only unnormalised scores let that reach the cross-layer choice of what
# to prune (as in Network Slimming). l2 / taylor scores are normalised per group (mean 1) to compare.
IMPORTANCE.register("bn_scale")(tp_bn_scale_importance)
IMPORTANCE.register("taylor")(lambda: tp.importance.GroupTaylorImportance())


def _accumulate_gradients(model, loss_fn, dataset, batches: int = 4, batch_size: int = 64) -> None:
    """Taylor importance needs weight gradients of the task loss; a few batches are enough."""
    model.eval()
    model.zero_grad(set_to_none=True)
    for i, (xb, yb) in enumerate(dataset.eval_batches("train", batch_size, limit=batches * batch_size)):
        if i >= batches:
            break
        loss_fn(model, xb, yb)["loss"].backward()


def run(state: PipelineState, cfg: PruneConfig, ctx: RunContext) -> tuple[PipelineState, StageResult]:
    if cfg.mode not in PRUNE_MODES:
        raise ConfigError(f"prune.mode must be one of {', '.join(PRUNE_MODES)}, got {cfg.mode!r}.")
    if cfg.mode == "ratio" and not 0.0 < cfg.ratio < 1.0:
        raise ConfigError(f"prune.ratio must be between 0 and 1 (exclusive), got {cfg.ratio}.")
    if not 0.0 < cfg.max_layer_ratio < 1.0:
        raise ConfigError(f"prune.max_layer_ratio must be between 0 and 1 (exclusive), got {cfg.max_layer_ratio}.")
    if cfg.steps < 1:
        raise ConfigError(f"prune.steps must be at least 1, got {cfg.steps}.")
    model = state.student
    model.eval()
    round_to = channel_rounding(cfg.round_to, state.profile)
    kd = state.kd or make_kd_loss("hinton", 4.0, 0.7)
    loss_fn = distill_loss_fn(kd, state.teachers, state.teacher_weights)
    before = out_channels(model)
    # Layers torch-pruning cannot follow (e.g. through a channel shuffle) stay as they are; said in the report.
    unpruned = unprunable_layers(model, state.example_input)
    if unpruned:
        ctx.log.warning(
            "prune: %d layers stay unpruned because %s: %s", len(unpruned), next(iter(unpruned.values())),
            ", ".join(list(unpruned)[:8]) + (" ..." if len(unpruned) > 8 else ""),
        )  # fmt: skip
    with torch_pruning_errors(model, "pruning"):
        if cfg.mode == "ratio":
            history = _prune_by_ratio(model, state, cfg, ctx, loss_fn, round_to)
            extra = {"ratio": cfg.ratio}
        else:
            history, extra = _prune_to_budget(model, state, cfg, ctx, loss_fn, round_to)
    extra["unpruned_layers"] = unpruned
    model.eval()
    after = out_channels(model)
    with torch.no_grad():
        model(state.example_input)  # fail here, inside the stage, if pruning broke the graph
    result = StageResult(
        name="prune",
        metrics={
            **model_metrics(model, state),
            "mode": cfg.mode,
            "importance": cfg.importance,
            "round_to": round_to,
            **extra,
            "channels_before": before,
            "channels_after": after,
        },
        history=history,
    )
    channels = {**state.channels, "before_prune": before, "after_prune": after}
    return dataclasses.replace(state, student=model, channels=channels, kd=kd), result


def _recover(model, state, cfg, ctx, loss_fn, step: int, label: str, stage_state=None, epochs: int | None = None) -> list[dict]:
    """KD recovery after a pruning step, with the budget penalty rebuilt for the new shape.

    ``stage_state`` (the step and the rows before it) is saved with each recovery epoch, so a resumed
    run restores the pruned structure and skips the steps already done. ``epochs`` defaults to
    ``cfg.recovery_epochs``; budget mode passes more after cuts that needed none (see ``_prune_to_budget``).
    """
    epochs = cfg.recovery_epochs if epochs is None else epochs
    if epochs <= 0:
        return []
    checkpoint = ctx.checkpoint("prune")
    checkpoint.stage_state = {"mode": cfg.mode, "step": step, **(stage_state or {})}
    penalty = None
    if cfg.penalty_weight > 0:
        remaining = max(1, cfg.steps - step)  # prune steps still to come, each at most max_layer_ratio
        penalty = BudgetPenalty(model, state.example_input, state.profile, state.budget,
                                ignored_layers=[find_head(model)], target=cfg.penalty_target,
                                round_to=channel_rounding(cfg.round_to, state.profile),
                                plan_max_layer_ratio=1 - (1 - cfg.max_layer_ratio) ** remaining)  # fmt: skip
    return fit(
        model,
        state.dataset,
        epochs=epochs,
        lr=cfg.lr,
        loss_fn=loss_fn,
        train_cfg=ctx.train,
        seed=ctx.seed + step,
        progress=ctx.progress,
        description=label,
        penalty_fn=penalty,
        penalty_weight=cfg.penalty_weight,
        device=ctx.device,
        amp=ctx.amp,
        modules=state.teachers,
        checkpoint=checkpoint,
        checkpoint_tag=f"step {step}",
    )


def _resume_point(model, ctx, cfg) -> dict | None:
    """Budget mode: put the saved pruned structure and weights back; return the saved stage state.

    Ratio mode replays its steps instead (torch-pruning's pruner keeps per-step state of its own): the
    steps before the saved one recompute exactly (same weights, same seeds) and the saved one continues.
    """
    from hwkd.artifacts import apply_structure, assign_tensors

    ckpt = ctx.checkpoint("prune")
    saved = ckpt.saved_stage_state
    if not saved or saved.get("mode") != "budget" or cfg.mode != "budget":
        return None
    apply_structure(model, ckpt.saved["model"]["structure"])
    assign_tensors(model, ckpt.saved["model"]["state_dict"])
    ctx.log.info("prune: resuming at step %d from %s", saved["step"], ckpt.path)
    return saved


def _prune_by_ratio(model, state, cfg, ctx, loss_fn, round_to) -> list[dict]:
    """The fixed-ratio path: the same fraction of channels in ``steps`` steps, whatever the device."""
    example = state.example_input
    pruner, _unpruned = base_pruner(
        model,
        example,
        importance=IMPORTANCE.get(cfg.importance)(),
        pruning_ratio=cfg.ratio,
        iterative_steps=cfg.steps,
        ignored_layers=[find_head(model)],
        round_to=round_to,
    )
    history = []
    for step in range(cfg.steps):
        if cfg.importance == "taylor":
            _accumulate_gradients(model, loss_fn, state.dataset)
        pruner.step()
        sync_model(model)  # torchrun: rank 0's pruning decision is every rank's
        model.zero_grad(set_to_none=True)
        macs, params = tp.utils.count_ops_and_params(model, example)
        row = {"step": step + 1, "params": int(params), "macs": int(macs)}
        epochs = _recover(model, state, cfg, ctx, loss_fn, step + 1, f"prune step {step + 1}/{cfg.steps} recovery")
        if epochs:
            row.update({k: v for k, v in epochs[-1].items() if k != "epoch"})
            row["recovery"] = epochs
        history.append(row)
    return history


def _prune_to_budget(model, state, cfg, ctx, loss_fn, round_to) -> tuple[list[dict], dict]:
    """Prune in steps until the estimated latency and memory meet the budget.

    Step k aims at ``start - k/steps * (start - budget)``; a step whose linearised saving fell short is
    followed by more (at most ``max(3, steps)`` extra), each re-estimated with the full cost model. From
    the last planned step on, the aim is 1% under budget, since the linearisation tends to fall short.

    Each step first removes the channels the student already does without (BN scale and shift exactly zero:
    what ``penalty_target = "mask"`` holds), whatever ``max_layer_ratio`` says, since that costs nothing;
    the planner then cuts what the step's aim still needs. A step whose cut leaves the network's output
    unchanged gets no recovery of its own: its epochs join the next step's, so the student trains one
    schedule instead of restarting the learning rate on a network that lost nothing (on CIFAR-10 such a
    restart cost 0.5 points of validation accuracy). The step that meets the budget also takes the epochs
    of the planned steps it made unnecessary: the stage trains ``steps * recovery_epochs`` epochs in all,
    more only when it needs extra steps.
    """
    budget, profile, example = state.budget, state.profile, state.example_input
    precision = budget.precision
    start = estimate(model, example, profile, precision)
    history: list[dict] = []
    extra = {
        "budget_latency_ms": budget.latency_ms,
        "budget_memory_mb": budget.memory_mb,
        "budget_precision": precision,
        "start_estimated_latency_ms": start.latency_ms,
        "penalty_weight": cfg.penalty_weight,
        "penalty_target": cfg.penalty_target,
    }
    if not fits(start, budget):
        reach = state.budget_reach or budget_reach(model, example, profile, budget, round_to)
        extra.update(floor_estimated_latency_ms=reach["floor_latency_ms"], floor_estimated_memory_mb=reach["floor_memory_mb"])
        if not reach["reachable"]:
            if state.budget_reach is None:  # the pipeline said so before training; a direct call hears it here
                ctx.log.warning("prune: %s", unreachable_message(reach))
            extra.update(
                budget_reachable=False, budget_met=False, end_estimated_latency_ms=start.latency_ms,
                end_estimated_memory_mb=start.memory_mb,
                budget_note=f"out of reach of channel pruning (floor {reach['floor_latency_ms']:.4g} ms, "
                f"{reach['floor_memory_mb']:.4g} MB): left unpruned",
            )  # fmt: skip
            return history, extra
        extra["budget_reachable"] = True
    total_steps = cfg.steps + max(3, cfg.steps)
    deferred = 0  # recovery epochs of lossless cuts, added to the next recovery
    resumed = _resume_point(model, ctx, cfg)
    for step in range(1, total_steps + 1):
        if resumed is not None and step < resumed["step"]:
            continue  # done before the run stopped; its row is in the saved history
        if resumed is not None and step == resumed["step"]:
            history, row = [dict(r) for r in resumed["history"]], dict(resumed["row"])
            resumed = None
            _finish_step(model, state, cfg, ctx, loss_fn, step, row, history)
            continue
        cost = estimate(model, example, profile, precision)
        if fits(cost, budget):
            break
        target_ms, target_mb = _step_target(start, budget, step, cfg.steps)
        probe = _output_probe(model, state, ctx)
        cut = _cut(model, state, cfg, loss_fn, round_to, cost, target_ms, target_mb)
        after = estimate(model, example, profile, precision)
        row = {
            "step": step,
            "params": after.params,
            "macs": after.macs,
            "estimated_latency_ms": after.latency_ms,
            "estimated_memory_mb": after.memory_mb,
            "target_latency_ms": target_ms,
            "channels_removed": cut["removed"],
            "held_at_zero_removed": cut["held_at_zero_removed"],
            "layers": cut["layers"],
        }
        if row["channels_removed"] == 0:
            if deferred:  # the lossless cuts before this one still get their recovery
                row["recovery_epochs"] = deferred
                _finish_step(model, state, cfg, ctx, loss_fn, step, row, history)
            else:
                history.append(row)
            break  # nothing left that saves anything: every group is at its floor
        row["val_accuracy_pruned"] = _accuracy_untrained(model, state, ctx)
        row["lossless"] = _output_unchanged(model, probe, ctx)
        met = fits(after, budget)
        if row["lossless"] and not met and step < total_steps:
            row["recovery_epochs"] = 0
            deferred += cfg.recovery_epochs
            history.append(row)
            continue
        unneeded = max(0, cfg.steps - step) * cfg.recovery_epochs if met else 0  # planned steps not needed
        row["recovery_epochs"] = cfg.recovery_epochs + deferred + unneeded
        deferred = 0
        _finish_step(model, state, cfg, ctx, loss_fn, step, row, history)
    final = estimate(model, example, profile, precision)
    extra.update(end_estimated_latency_ms=final.latency_ms, end_estimated_memory_mb=final.memory_mb,
                 budget_met=fits(final, budget))  # fmt: skip
    return history, extra


def _step_target(start, budget, step: int, steps: int) -> tuple[float, float]:
    """Step ``step``'s aim (latency ms, memory MB): a share ``step / steps`` of the way from ``start`` to the
    budget, and 1% under it from the last planned step on, since the linearised saving tends to fall short."""
    frac = min(1.0, step / steps)
    margin = 0.99 if frac >= 1.0 else 1.0
    return (start.latency_ms - frac * (start.latency_ms - margin * budget.latency_ms),
            start.memory_mb - frac * (start.memory_mb - margin * budget.memory_mb))  # fmt: skip


def _cut(model, state, cfg, loss_fn, round_to: int, cost, target_ms: float, target_mb: float) -> dict:
    """One budget step's cut of a model estimated at ``cost``: the channels held at zero (free, beyond
    ``max_layer_ratio``), then what the planner must still remove to reach the step's aim. Returns the
    channels removed, in all, held at zero, and per layer; every torchrun rank ends with rank 0's network."""
    budget, profile, example, precision = state.budget, state.profile, state.example_input, state.budget.precision
    free = cut_held_at_zero(model, example, profile, precision, round_to)
    if free["removed"]:
        cost = estimate(model, example, profile, precision)
    need_ms = max(0.0, cost.latency_ms - min(target_ms, cost.latency_ms))
    need_mb = max(0.0, cost.memory_mb - min(target_mb, cost.memory_mb))
    plan = {"removed": 0, "layers": {}}
    if not fits(cost, budget) and (need_ms > 0 or need_mb > 0):
        if cfg.importance == "taylor":
            _accumulate_gradients(model, loss_fn, state.dataset)
        plan = prune_step(
            model, example, profile, precision, IMPORTANCE.get(cfg.importance)(), need_ms=need_ms,
            need_mb=need_mb, round_to=round_to, max_layer_ratio=cfg.max_layer_ratio,
        )  # fmt: skip
    model.zero_grad(set_to_none=True)
    sync_model(model)  # torchrun: rank 0's pruning decision is every rank's
    layers = dict(free["layers"])
    for name, n in plan["layers"].items():
        layers[name] = layers.get(name, 0) + n
    return {"removed": free["removed"] + plan["removed"], "held_at_zero_removed": free["removed"], "layers": layers}


def cut_held_at_zero(model, example, profile, precision: str, round_to: int) -> dict:
    """Remove the channels the network already does without (``ChannelGroup.held_at_zero``), keeping every
    layer a multiple of ``round_to`` channels and at least one multiple. Returns what was removed, per layer."""
    if not any(_zero_scale_and_shift(m) for m in model.modules()):
        return {"removed": 0, "layers": {}}  # the usual case (no mask target): no graph to build
    chunk = max(1, round_to)
    dg = dependency_graph(model, example)
    groups = channel_groups(model, example, profile, precision, ignored_layers=[find_head(model)], dg=dg)
    channels = {}
    for gi, g in enumerate(groups):
        dead = g.held_at_zero()
        keep = max(chunk, math.ceil((g.channels - len(dead)) / chunk) * chunk)
        idxs = dead[: max(0, g.channels - keep)]
        if idxs:
            channels[gi] = idxs
    return remove_channels(dg, groups, channels)


def _zero_scale_and_shift(module) -> bool:
    """Whether ``module`` is a BatchNorm with some channel whose scale and shift are both exactly zero."""
    if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm) or module.weight is None:
        return False
    zero = module.weight.detach() == 0
    if module.bias is not None:
        zero &= module.bias.detach() == 0
    return bool(zero.any())


def _accuracy_untrained(model, state, ctx) -> float:
    """Validation accuracy right after a pruning step, before recovery: what the cut itself cost. The RNG
    is forked so this look changes nothing the training after it draws."""
    with torch.random.fork_rng(devices=[]):
        return split_accuracy(model, state.dataset, "val", device=ctx.device)


def _output_probe(model, state, ctx) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed batch of validation images and the model's logits on it, to tell afterwards whether a cut
    changed what the network computes. Train/eval modes and the RNG are left as they were."""
    x, _ = state.dataset.sample("val" if state.dataset.split_size("val") else "train", 64, seed=0)
    return x, _logits(model, x, ctx)


def _output_unchanged(model, probe, ctx, tol: float = 1e-4) -> bool:
    """Whether the model's logits on the probe's images are what they were before the cut, to ``tol``
    of their largest magnitude (a removed channel that was exactly zero changes only the summation order)."""
    x, before = probe
    after = _logits(model, x, ctx)
    same = bool(after.shape == before.shape and (after - before).abs().max() <= tol * before.abs().max().clamp_min(1e-12))
    return not any_rank(not same, ctx.device)  # torchrun: every rank must take the same schedule


def _logits(model, x, ctx) -> torch.Tensor:
    modes = {m: m.training for m in model.modules()}
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            return predict(model, x, device=ctx.device)
    finally:
        for m, training in modes.items():
            m.train(training)


def fits(cost, budget) -> bool:
    """Whether an estimate meets both the latency and the memory budget."""
    return bool(cost.latency_ms <= budget.latency_ms and cost.memory_mb <= budget.memory_mb)


def budget_reach(model, example, profile, budget, round_to: int) -> dict:
    """Can channel pruning meet ``budget`` at all? Prunes a copy of ``model`` with every prunable layer at
    one rounding multiple (``round_to`` channels, the least budget pruning can ever leave, step after
    step) and estimates it.

    A student whose estimate is mostly per-layer cost (dispatch, small kernels) keeps most of it however
    thin its layers get; pruning such a student towards an unreachable budget destroys its accuracy for
    little latency (the CIFAR-10 0.3x student on jetson: 92% of its parameters gone for 9% of its
    estimate). The prune stage leaves it unpruned instead, and the distill stage drops a penalty that
    pushes towards a budget pruning will not reach.
    """
    import copy

    chunk = max(1, round_to)
    floor_model = copy.deepcopy(model).eval()
    with torch_pruning_errors(floor_model, "pruning"):
        prune_step(
            floor_model, example, profile, budget.precision, tp.importance.GroupMagnitudeImportance(p=2),
            need_ms=math.inf, need_mb=math.inf, round_to=chunk, min_channels=chunk,
        )  # fmt: skip
    floor = estimate(floor_model, example, profile, budget.precision)
    return {
        "reachable": fits(floor, budget),
        "floor_latency_ms": floor.latency_ms,
        "floor_memory_mb": floor.memory_mb,
        "floor_params": floor.params,
        "floor_channels": chunk,
        "budget_latency_ms": budget.latency_ms,
        "budget_memory_mb": budget.memory_mb,
        "precision": budget.precision,
    }


def unreachable_message(reach: dict) -> str:
    """One paragraph for a budget channel pruning cannot meet: what was found and what to do instead."""
    over = []
    if reach["floor_latency_ms"] > reach["budget_latency_ms"]:
        over.append(f"{reach['floor_latency_ms']:.4g} ms against the {reach['budget_latency_ms']:.4g} ms budget")
    if reach["floor_memory_mb"] > reach["budget_memory_mb"]:
        over.append(f"{reach['floor_memory_mb']:.4g} MB against the {reach['budget_memory_mb']:.4g} MB budget")
    return (
        f"the {reach['precision'].upper()} budget is out of reach of channel pruning for this student: with every "
        f"prunable layer cut to {reach['floor_channels']} channel{'s' if reach['floor_channels'] > 1 else ''} "
        f"({reach['floor_params']:,} parameters left) it is still estimated at {' and '.join(over)}, because most "
        "of its estimate does not shrink with channel counts "
        "(per-layer cost). The student is left unpruned, and the distillation penalty is off, rather than pruned "
        "to the floor for a model that still misses. Raise the budget (--latency-budget / --memory-budget), "
        "choose a student with fewer layers (--student), or prune by a fixed share (--set prune.mode=ratio)."
    )


def _finish_step(model, state, cfg, ctx, loss_fn, step: int, row: dict, history: list[dict]) -> None:
    """Recover after a budget-mode step and append its row (the recovery's last epoch, then every epoch)."""
    before = {"history": history, "row": row}
    epochs = _recover(model, state, cfg, ctx, loss_fn, step, f"prune step {step} recovery", before,
                      epochs=row.get("recovery_epochs"))  # fmt: skip
    if epochs:
        row.update({k: v for k, v in epochs[-1].items() if k not in ("epoch",) and k not in row})
        row["recovery"] = epochs
    history.append(row)


def prune_step(
    model, example, profile, precision: str, importance, *, need_ms: float, need_mb: float,
    round_to: int = 1, max_layer_ratio: float = 0.75, min_channels: int | None = None,
) -> dict:  # fmt: skip
    """One HALP-like greedy step: remove the channel chunks with the least importance per unit of cost saved
    until the linearised saving covers ``need_ms`` and ``need_mb``. Returns what was removed, per layer.

    Scores compare across layers (bn_scale: raw |gamma|, which the budget penalty shaped; l2 / taylor:
    normalised per group); cost saved is each chunk's latency and memory relative to what is still needed. Chunks are ``round_to``
    channels, so every layer keeps a channel count the device's vector units like. A layer keeps at least
    ``min_channels`` when given (``budget_reach``: one multiple), else ``1 - max_layer_ratio`` of
    what it has now (per step: later steps can go further). ``need_ms = need_mb = inf`` takes every group down to its floor.
    """
    head = find_head(model)
    dg = dependency_graph(model, example)
    groups = channel_groups(model, example, profile, precision, ignored_layers=[head], dg=dg)
    scores = []
    for g in groups:
        score = importance(g.group)
        scores.append(tp.importance.GroupMagnitudeImportance(p=2)(g.group) if score is None else score)
    plan = plan_removal(groups, scores, need_ms=need_ms, need_mb=need_mb, round_to=round_to,
                        max_layer_ratio=max_layer_ratio, min_channels=min_channels)  # fmt: skip
    return {**remove_channels(dg, groups, plan.channels), "predicted_saving_ms": plan.saved_ms, "predicted_saving_mb": plan.saved_mb}
