"""The budget penalty: finite gradients on BN scales, weighted by cost, silent once under budget; and
budget-driven pruning that reaches the budget by pruning the channels the penalty drove down."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from hwkd.hardware.budget import Budget
from hwkd.hardware.cost import estimate
from hwkd.hardware.penalty import BudgetPenalty, channel_groups
from hwkd.hardware.profiles import load_profile
from hwkd.models.zoo import ZOO
from hwkd.stages.prune import IMPORTANCE, prune_step

X = torch.randn(1, 1, 16, 16)


@pytest.fixture(scope="module")
def profile():
    return load_profile("jetson")


def tiny(width: float = 1.0) -> nn.Module:
    torch.manual_seed(0)
    return ZOO.get("cnn")(num_classes=3, in_channels=1, width=width)


def test_channel_costs_follow_the_layers_they_shrink(profile):
    model = tiny()
    groups = channel_groups(model, X, profile, "fp32", ignored_layers=[model.head])
    by_root = {g.root_name: g for g in groups}
    assert set(by_root) == {"features.0.0", "features.1.0", "features.2.0"}
    for g in groups:
        assert g.latency_ms_per_channel > 0 and g.memory_mb_per_channel > 0
        assert len(g.bn_scales) == 1
    # features.1.0 (16->32 on 16x16, stride 2) cuts itself and features.2.0's inputs: its channel costs
    # more than one of features.2.0, whose only consumer is the tiny head (ignored).
    assert by_root["features.1.0"].latency_ms_per_channel > by_root["features.2.0"].latency_ms_per_channel


def test_penalty_gradient_is_finite_nonzero_and_cost_weighted(profile):
    model = tiny()
    base = estimate(model, X, profile).latency_ms
    penalty = BudgetPenalty(model, X, profile, Budget(latency_ms=0.5 * base, memory_mb=1e6), precision="fp32")
    assert penalty.gates() == (1.0, 0.0)
    value = penalty(model)
    value.backward()
    assert torch.isfinite(value) and value.item() > 0
    grads = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert mod.weight.grad is not None and torch.isfinite(mod.weight.grad).all()
            grads[name] = mod.weight.grad.abs().mean().item()
            assert grads[name] > 0
    # d penalty / d gamma = channel cost / (budget * mean|gamma|): the costlier channel gets pushed harder
    groups = {g.root_name: g for g in penalty.groups}
    ratio = groups["features.1.0"].latency_ms_per_channel / groups["features.2.0"].latency_ms_per_channel
    assert grads["features.1.1"] / grads["features.2.1"] == pytest.approx(ratio, rel=1e-4)


def test_penalty_is_zero_under_budget(profile):
    model = tiny()
    penalty = BudgetPenalty(model, X, profile, Budget(latency_ms=1e3, memory_mb=1e6), precision="fp32")
    value = penalty(model)
    value.backward()
    assert value.item() == 0.0
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d) and mod.weight.grad is not None:
            assert mod.weight.grad.abs().max().item() == 0.0


def test_penalty_fades_when_driven_channels_count_as_pruned(profile):
    """Zeroing the costliest BN scales makes the estimate (dead channels removed) fit: the gate closes."""
    model = tiny()
    base = estimate(model, X, profile).latency_ms
    penalty = BudgetPenalty(model, X, profile, Budget(latency_ms=0.9 * base, memory_mb=1e6), precision="fp32")
    assert penalty.gates()[0] == 1.0
    with torch.no_grad():
        model.features[1][1].weight[:24] = 0.0  # 24 of 32 channels of the costliest group
    assert penalty.gates()[0] == 0.0
    assert penalty(model).item() == 0.0


def test_training_with_the_penalty_shrinks_bn_scales(profile, tiny_dataset):
    from hwkd.config import TrainConfig
    from hwkd.train import fit

    model = ZOO.get("cnn")(num_classes=3, in_channels=1, width=1.0)
    x = tiny_dataset.example_input()
    base = estimate(model, x, profile).latency_ms
    penalty = BudgetPenalty(model, x, profile, Budget(latency_ms=0.3 * base, memory_mb=1e6), precision="fp32")

    def ce(m, xb, yb):
        return {"loss": nn.functional.cross_entropy(m(xb), yb)}

    before = model.features[1][1].weight.detach().abs().mean().item()
    history = fit(
        model, tiny_dataset, epochs=2, lr=0.05, loss_fn=ce, train_cfg=TrainConfig(batch_size=8, augment=False),
        penalty_fn=penalty, penalty_weight=20.0,
    )  # fmt: skip
    assert all("penalty" in row and row["penalty"] > 0 for row in history)
    assert model.features[1][1].weight.detach().abs().mean().item() < before


def test_budget_step_reaches_the_budget_and_keeps_round_multiples(profile):
    model = tiny(width=2.0)
    start = estimate(model, X, profile, "fp32").latency_ms
    target = 0.7 * start
    for _ in range(4):
        now = estimate(model, X, profile, "fp32").latency_ms
        if now <= target:
            break
        plan = prune_step(
            model, X, profile, "fp32", IMPORTANCE.get("bn_scale")(), need_ms=now - target, need_mb=0.0,
            round_to=8, max_layer_ratio=0.75,
        )  # fmt: skip
        assert plan["removed"] > 0
    assert estimate(model, X, profile, "fp32").latency_ms <= target
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d) and mod is not model.features[0][0]:
            assert mod.in_channels % 8 == 0
        if isinstance(mod, nn.Conv2d):
            assert mod.out_channels % 8 == 0 and mod.out_channels >= 8
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3)


def test_budget_step_prunes_the_channels_the_penalty_drove_down(profile):
    model = tiny(width=2.0)
    bn = model.features[1][1]
    with torch.no_grad():
        bn.weight.fill_(1.0)
        bn.weight[40:48] = 1e-3  # what the penalty leaves behind
        marker = model.features[1][0].weight[:40].clone()
    now = estimate(model, X, profile, "fp32").latency_ms
    group = next(g for g in channel_groups(model, X, profile, "fp32", [model.head]) if g.root_name == "features.1.0")
    need = 8 * group.latency_ms_per_channel * 0.99
    plan = prune_step(
        model, X, profile, "fp32", IMPORTANCE.get("bn_scale")(), need_ms=need, need_mb=0.0, round_to=8,
    )  # fmt: skip
    assert plan["layers"] == {"features.1.0": 8}
    assert model.features[1][0].out_channels == 56
    assert torch.equal(model.features[1][0].weight[:40], marker)  # the small-|gamma| channels went
    assert estimate(model, X, profile, "fp32").latency_ms < now


def test_budget_prune_stage_meets_budget_and_logs_penalty(profile, tiny_dataset, tmp_path):
    from hwkd.config import PruneConfig, TrainConfig
    from hwkd.kd.losses import make_kd_loss
    from hwkd.pipeline import PipelineState, RunContext
    from hwkd.stages import prune

    torch.manual_seed(0)
    student = ZOO.get("cnn")(num_classes=3, in_channels=1, width=2.0)
    teacher = ZOO.get("cnn")(num_classes=3, in_channels=1, width=1.0).eval()
    x = tiny_dataset.example_input()
    start = estimate(student, x, profile, "fp32").latency_ms
    budget = Budget(latency_ms=0.75 * start, memory_mb=1e6, precision="fp32")
    state = PipelineState(
        student=student, student_spec={}, teachers=[teacher], teacher_weights=[1.0], dataset=tiny_dataset,
        profile=profile, budget=budget, kd=make_kd_loss("hinton", 4.0, 0.7),
    )  # fmt: skip
    ctx = RunContext(run_dir=tmp_path, train=TrainConfig(batch_size=8, augment=False))
    cfg = PruneConfig(mode="budget", steps=2, recovery_epochs=1, penalty_weight=1.0, round_to=8)
    new_state, result = prune.run(state, cfg, ctx)
    assert result.metrics["budget_met"] is True
    assert result.metrics["estimated_latency_ms"] <= budget.latency_ms
    assert result.metrics["start_estimated_latency_ms"] == pytest.approx(start)
    rows = result.history
    assert rows and all(r["channels_removed"] > 0 for r in rows)
    assert all("penalty" in e for r in rows for e in r["recovery"])
    assert all(0.0 <= r["val_accuracy_pruned"] <= 1.0 for r in rows)  # what each cut cost, before recovery


def test_ratio_mode_still_prunes_a_fixed_share(profile, tiny_dataset, tmp_path):
    from hwkd.config import PruneConfig, TrainConfig
    from hwkd.pipeline import PipelineState, RunContext
    from hwkd.stages import prune

    student = ZOO.get("cnn")(num_classes=3, in_channels=1, width=2.0)
    state = PipelineState(
        student=student, student_spec={}, teachers=[student], teacher_weights=[1.0], dataset=tiny_dataset,
        profile=profile, budget=Budget(latency_ms=1e3, memory_mb=1e6),
    )  # fmt: skip
    ctx = RunContext(run_dir=tmp_path, train=TrainConfig(batch_size=8, augment=False))
    cfg = PruneConfig(mode="ratio", ratio=0.5, steps=1, recovery_epochs=0, round_to=8)
    _, result = prune.run(state, cfg, ctx)
    assert result.metrics["mode"] == "ratio"
    assert result.metrics["channels_before"]["features.1.0"] == 64
    assert result.metrics["channels_after"]["features.1.0"] == 32


def test_unknown_prune_mode_is_a_config_error(profile, tiny_dataset, tmp_path):
    from hwkd.config import PruneConfig
    from hwkd.errors import ConfigError
    from hwkd.pipeline import PipelineState, RunContext
    from hwkd.stages import prune

    state = PipelineState(
        student=tiny(), student_spec={}, teachers=[], teacher_weights=[], dataset=tiny_dataset,
        profile=profile, budget=Budget(latency_ms=1.0, memory_mb=1.0),
    )  # fmt: skip
    with pytest.raises(ConfigError, match="prune.mode"):
        prune.run(state, dataclasses.replace(PruneConfig(), mode="fast"), RunContext(run_dir=tmp_path))


def test_budget_reach_prices_the_model_with_every_layer_at_one_multiple(profile):
    """The floor is what budget pruning could ever leave, step after step: every prunable layer at one
    rounding multiple. The model itself is untouched; the verdict compares the floor with the budget."""
    import copy

    from hwkd.stages.common import out_channels
    from hwkd.stages.prune import budget_reach

    model = tiny(width=2.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    start = estimate(model, X, profile, "fp32")
    reach = budget_reach(model, X, profile, Budget(latency_ms=0.5 * start.latency_ms, memory_mb=1e6), 8)
    assert out_channels(model)["features.1.0"] == 64  # a copy was pruned, not the model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    by_hand = copy.deepcopy(model)
    plan = prune_step(by_hand, X, profile, "fp32", IMPORTANCE.get("l2")(), need_ms=float("inf"),
                      need_mb=float("inf"), round_to=8, min_channels=8)  # fmt: skip
    assert plan["removed"] > 0
    assert {n: c for n, c in out_channels(by_hand).items() if n != "head"} == {
        "features.0.0": 8, "features.1.0": 8, "features.2.0": 8,
    }  # fmt: skip
    assert by_hand(torch.randn(2, 1, 16, 16)).shape == (2, 3)
    floor_ms = reach["floor_latency_ms"]
    assert estimate(by_hand, X, profile, "fp32").latency_ms == pytest.approx(floor_ms)
    assert 0 < floor_ms < start.latency_ms and reach["floor_params"] < start.params and reach["floor_channels"] == 8
    assert reach["reachable"] is (floor_ms <= 0.5 * start.latency_ms)
    below = budget_reach(model, X, profile, Budget(latency_ms=0.99 * floor_ms, memory_mb=1e6), 8)
    above = budget_reach(model, X, profile, Budget(latency_ms=1.01 * floor_ms, memory_mb=1e6), 8)
    assert below["reachable"] is False and above["reachable"] is True
    tight_memory = Budget(latency_ms=1e3, memory_mb=0.5 * reach["floor_memory_mb"])
    assert budget_reach(model, X, profile, tight_memory, 8)["reachable"] is False


def test_steps_go_below_max_layer_ratio_of_the_start_but_not_of_the_current(profile):
    """max_layer_ratio bounds one step (64 -> 16 at most), so a budget below one step's floor is reached in
    later steps (16 -> 8), as the prune stage's extra steps expect."""
    model = tiny(width=2.0)
    sizes = []
    for _ in range(2):
        prune_step(model, X, profile, "fp32", IMPORTANCE.get("l2")(), need_ms=float("inf"), need_mb=0.0,
                   round_to=8, max_layer_ratio=0.75)  # fmt: skip
        sizes.append(model.features[1][0].out_channels)
    assert sizes == [16, 8]


def _prune_state(profile, dataset, budget_fraction: float):
    from hwkd.kd.losses import make_kd_loss
    from hwkd.pipeline import PipelineState

    torch.manual_seed(0)
    student = ZOO.get("cnn")(num_classes=3, in_channels=1, width=2.0)
    teacher = ZOO.get("cnn")(num_classes=3, in_channels=1, width=1.0).eval()
    start = estimate(student, dataset.example_input(), profile, "fp32").latency_ms
    budget = Budget(latency_ms=budget_fraction * start, memory_mb=1e6, precision="fp32")
    return PipelineState(
        student=student, student_spec={}, teachers=[teacher], teacher_weights=[1.0], dataset=dataset,
        profile=profile, budget=budget, kd=make_kd_loss("hinton", 4.0, 0.7),
    )  # fmt: skip


def test_budget_below_the_floor_leaves_the_student_unpruned_and_says_why(profile, tiny_dataset, tmp_path, caplog):
    """The stop-20 defect: a budget channel pruning cannot reach used to prune the student to its floor
    (and its accuracy with it) for a model that still missed. Now it is left as it is, with a warning."""
    from hwkd.config import PruneConfig, TrainConfig
    from hwkd.pipeline import RunContext
    from hwkd.stages import prune
    from hwkd.stages.common import out_channels

    state = _prune_state(profile, tiny_dataset, budget_fraction=0.05)  # far below any per-layer floor
    before = out_channels(state.student)
    weights = {k: v.clone() for k, v in state.student.state_dict().items()}
    ctx = RunContext(run_dir=tmp_path, train=TrainConfig(batch_size=8, augment=False))
    cfg = PruneConfig(mode="budget", steps=2, recovery_epochs=1, round_to=8)
    with caplog.at_level("WARNING", logger="hwkd"):
        _, result = prune.run(state, cfg, ctx)
    m = result.metrics
    assert m["budget_reachable"] is False and m["budget_met"] is False
    assert m["floor_estimated_latency_ms"] > state.budget.latency_ms
    assert m["end_estimated_latency_ms"] == pytest.approx(m["start_estimated_latency_ms"])
    assert "left unpruned" in m["budget_note"]
    assert result.history == [] and out_channels(state.student) == before
    assert all(torch.equal(weights[k], v) for k, v in state.student.state_dict().items())  # no recovery training
    message = " ".join(r.getMessage() for r in caplog.records)
    assert "out of reach of channel pruning" in message and "--latency-budget" in message


def test_distill_drops_the_penalty_when_pruning_cannot_reach_the_budget(profile, tiny_dataset, tmp_path):
    from hwkd.config import DistillConfig, TrainConfig
    from hwkd.pipeline import RunContext
    from hwkd.stages import distill

    state = _prune_state(profile, tiny_dataset, budget_fraction=0.3)
    ctx = RunContext(run_dir=tmp_path, train=TrainConfig(batch_size=8, augment=False))
    cfg = DistillConfig(epochs=1, penalty_weight=1.0)
    _, on = distill.run(state, cfg, ctx)
    assert on.metrics["penalty_weight"] == 1.0 and all("penalty" in row for row in on.history)
    unreachable = dataclasses.replace(_prune_state(profile, tiny_dataset, 0.3), budget_reach={"reachable": False})
    _, off = distill.run(unreachable, cfg, RunContext(run_dir=tmp_path / "off", train=ctx.train))
    assert off.metrics["penalty_weight"] == 0.0 and "out of reach" in off.metrics["penalty_note"]
    assert not any("penalty" in row for row in off.history)


# --- penalty target "plan": only the channels the pruner would take now ------------------------------------


def test_plan_penalty_pushes_exactly_the_channels_the_pruner_would_remove(profile):
    """The plan target's gradient is nonzero on the channels prune_step removes and zero everywhere else."""
    import copy

    model = tiny(width=2.0)
    with torch.no_grad():  # distinct |gamma| so the plan is unambiguous
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.copy_(torch.linspace(0.2, 1.0, mod.num_features)[torch.randperm(mod.num_features)])
    base = estimate(model, X, profile, "fp32").latency_ms
    budget = Budget(latency_ms=0.7 * base, memory_mb=1e6)
    penalty = BudgetPenalty(model, X, profile, budget, precision="fp32", ignored_layers=[model.head],
                            target="plan", round_to=8, plan_max_layer_ratio=0.75, check_rounds=0)  # fmt: skip
    value = penalty(model)
    value.backward()
    assert value.item() > 0
    pruned = copy.deepcopy(model)
    plan = prune_step(pruned, X, profile, "fp32", IMPORTANCE.get("bn_scale")(), need_ms=base - 0.99 * budget.latency_ms,
                      need_mb=0.0, round_to=8, max_layer_ratio=0.75)  # fmt: skip
    assert plan["removed"] > 0
    targeted = {}
    for g, idxs in zip(penalty.groups, penalty.plan, strict=True):
        targeted[g.root_name] = len(idxs)
        bn = g.bn_scales[0][0]
        pushed = (bn.grad != 0).nonzero().flatten().tolist()
        assert sorted(pushed) == sorted(idxs)  # no force on the channels the plan keeps
    assert {k: v for k, v in targeted.items() if v} == plan["layers"]


def test_plan_penalty_replans_and_its_state_resumes(profile):
    model = tiny(width=2.0)
    base = estimate(model, X, profile, "fp32").latency_ms
    budget = Budget(latency_ms=0.7 * base, memory_mb=1e6)

    def make():
        return BudgetPenalty(model, X, profile, budget, precision="fp32", ignored_layers=[model.head],
                             target="plan", round_to=8, replan_every=2)  # fmt: skip

    penalty = make()
    penalty(model)
    first = [list(p) for p in penalty.plan]
    gi = next(i for i, idxs in enumerate(first) if idxs)
    bn = penalty.groups[gi].bn_scales[0][0]
    with torch.no_grad():  # the planned channels become the most important ones of their group
        bn[first[gi]] += 10.0
    penalty(model)
    assert penalty.plan == first  # replan_every=2: the second call keeps the plan
    penalty(model)
    assert penalty.plan != first
    resumed = make()
    resumed.load_state_dict(penalty.state_dict())
    assert resumed.plan == penalty.plan and resumed.calls == penalty.calls == 3
    assert resumed(model).item() == pytest.approx(penalty(model).item())


def test_penalty_target_is_checked_before_training():
    from hwkd.config import PipelineConfig
    from hwkd.errors import ConfigError

    with pytest.raises(ConfigError, match="distill.penalty_target"):
        PipelineConfig.from_dict({"distill": {"penalty_target": "plans"}})
    with pytest.raises(ConfigError, match="prune.mode"):
        PipelineConfig.from_dict({"prune": {"mode": "fast"}})
    assert PipelineConfig.from_dict({"prune": {"penalty_target": "plan"}}).prune.penalty_target == "plan"


def test_distill_holds_the_penalty_off_until_penalty_start(profile, tiny_dataset, tmp_path):
    from hwkd.config import DistillConfig, TrainConfig
    from hwkd.pipeline import RunContext
    from hwkd.stages import distill

    state = _prune_state(profile, tiny_dataset, budget_fraction=0.3)
    ctx = RunContext(run_dir=tmp_path, train=TrainConfig(batch_size=8, augment=False))
    cfg = DistillConfig(epochs=2, penalty_weight=1.0, penalty_target="plan", penalty_start=0.5)
    _, result = distill.run(state, cfg, ctx)
    assert [row["penalty"] == 0.0 for row in result.history] == [True, False]
    assert result.metrics["penalty_target"] == "plan" and result.metrics["penalty_start"] == 0.5


def test_the_distill_plan_penalty_rounds_channels_as_the_prune_stage_will(profile, tiny_dataset, tmp_path, monkeypatch):
    """prune.round_to reaches the distill stage's plan (it used the profile's multiple whatever the user set)."""
    from hwkd.config import DistillConfig, TrainConfig
    from hwkd.pipeline import RunContext
    from hwkd.stages import distill

    built = []
    monkeypatch.setattr(distill, "BudgetPenalty", lambda *a, **k: built.append(k) or BudgetPenalty(*a, **k))
    cfg = DistillConfig(epochs=1, penalty_target="plan")
    ctx = RunContext(run_dir=tmp_path, train=TrainConfig(batch_size=8, augment=False))
    distill.run(dataclasses.replace(_prune_state(profile, tiny_dataset, 0.3), round_to=1), cfg, ctx)
    distill.run(_prune_state(profile, tiny_dataset, 0.3), cfg, RunContext(run_dir=tmp_path / "b", train=ctx.train))
    assert [k["round_to"] for k in built] == [1, profile.runtime.channel_multiple]
    assert profile.runtime.channel_multiple != 1


# --- penalty target "mask": the plan's channels held at zero, so pruning them changes nothing -----------


@pytest.mark.parametrize("arch", ["cnn", "mobilenetv2"])
def test_mask_zeroes_the_planned_channels_and_pruning_them_is_lossless(profile, arch):
    """after_step zeroes BN scale and shift of exactly the planned channels (through residual adds and
    depthwise convs); the prune stage's own step then removes those channels and the output does not move."""
    import copy

    torch.manual_seed(0)
    if arch == "cnn":
        model, x = tiny(width=2.0), X
    else:
        model, x = ZOO.get(arch)(num_classes=3, in_channels=3, width=1.0), torch.randn(1, 3, 32, 32)
    model.eval()
    with torch.no_grad():  # a trained network's BN: scales and shifts far from 1 and 0
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.2, 1.0)
                mod.bias.uniform_(-0.5, 0.5)
    base = estimate(model, x, profile, "fp32").latency_ms
    budget = Budget(latency_ms=0.8 * base, memory_mb=1e6)
    from hwkd.models.loaders import find_head

    head = find_head(model)
    penalty = BudgetPenalty(model, x, profile, budget, precision="fp32", ignored_layers=[head], target="mask",
                            round_to=8, plan_max_layer_ratio=0.75, check_rounds=0)  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert penalty(model).item() == 0.0  # nothing added to the loss: the mask acts on the parameters
    penalty.after_step(model)
    planned = sum(len(p) for p in penalty.plan)
    assert planned > 0
    for g, idxs in zip(penalty.groups, penalty.plan, strict=True):
        for (w, bn_idx, root_idx), b in zip(g.bn_scales, g.bn_shifts, strict=True):
            hit = [i for i, r in zip(bn_idx, root_idx, strict=True) if r in set(idxs)]
            assert torch.all(w[hit] == 0) and torch.all(b[hit] == 0)
    changed = sum(int((p != before[n]).sum()) for n, p in model.named_parameters())
    assert changed > 0
    with torch.no_grad():
        masked_out = model(x)
    pruned = copy.deepcopy(model)
    plan = prune_step(pruned, x, profile, "fp32", IMPORTANCE.get("bn_scale")(), need_ms=base - 0.99 * budget.latency_ms,
                      need_mb=0.0, round_to=8, max_layer_ratio=0.75)  # fmt: skip
    assert plan["removed"] == planned  # the zeroed channels are what bn_scale importance removes first
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), masked_out, rtol=1e-4, atol=1e-5)


def test_mask_holds_through_training_and_resumes(profile, tiny_dataset, tmp_path):
    """Distillation with the mask target ends with the planned channels still exactly zero; its plan
    is saved with the checkpoint like the plan target's."""
    from hwkd.config import DistillConfig, TrainConfig
    from hwkd.pipeline import RunContext
    from hwkd.stages import distill

    state = _prune_state(profile, tiny_dataset, budget_fraction=0.5)
    ctx = RunContext(run_dir=tmp_path, train=TrainConfig(batch_size=8, augment=False))
    out, result = distill.run(state, DistillConfig(epochs=2, penalty_target="mask", penalty_start=0.5), ctx)
    assert result.metrics["penalty_target"] == "mask"
    assert all(row["penalty"] == 0.0 for row in result.history)
    groups = channel_groups(out.student, tiny_dataset.example_input(), profile, "fp32", ignored_layers=[out.student.head])
    zero = sum(int((g.scale_magnitude() == 0).sum()) for g in groups if g.bn_scales)
    assert zero > 0  # trained a whole epoch after the mask started, and the masked channels stayed at zero
    penalty = BudgetPenalty(out.student, tiny_dataset.example_input(), profile, state.budget, precision="fp32",
                            ignored_layers=[out.student.head], target="mask")  # fmt: skip
    penalty(out.student)
    saved = penalty.state_dict()
    assert saved["plan"] == penalty.plan


def test_after_a_masked_distillation_the_first_prune_step_costs_no_accuracy(profile, tiny_dataset, tmp_path):
    """The mechanism's claim, through both stages: distillation masks the plan's channels, the prune stage
    removes them, and validation accuracy right after the cut equals the distilled student's."""
    from hwkd.config import DistillConfig, PruneConfig, TrainConfig
    from hwkd.pipeline import RunContext
    from hwkd.stages import distill, prune
    from hwkd.train import split_accuracy

    state = _prune_state(profile, tiny_dataset, budget_fraction=0.75)
    ctx = RunContext(run_dir=tmp_path, train=TrainConfig(batch_size=8, augment=False))
    state, _ = distill.run(state, DistillConfig(epochs=2, penalty_target="mask", penalty_start=0.5), ctx)
    distilled = split_accuracy(state.student, tiny_dataset, "val")
    cfg = PruneConfig(mode="budget", steps=2, recovery_epochs=1, round_to=0, penalty_target="mask")
    _, result = prune.run(state, cfg, RunContext(run_dir=tmp_path / "prune", train=ctx.train))
    first = result.history[0]
    assert first["channels_removed"] > 0
    assert first["val_accuracy_pruned"] == pytest.approx(distilled)


def test_the_plan_is_checked_against_the_estimate_of_the_model_it_leaves(profile):
    """The planner's linearised saving over-predicts on small nets: a plan for the predicted need leaves a
    model the cost model still prices over budget. replan() prunes a copy, estimates it, and plans again for a
    larger need until the copy fits, so the plan and mask targets cover the whole cut pruning will make."""
    import copy

    from hwkd.models.loaders import find_head

    torch.manual_seed(0)
    model = ZOO.get("mobilenetv2")(num_classes=3, in_channels=3, width=1.0).eval()
    x = torch.randn(1, 3, 32, 32)
    base = estimate(model, x, profile, "int8")
    budget = Budget(latency_ms=0.8 * base.latency_ms, memory_mb=1e6, precision="int8")

    def planned_estimate(check_rounds: int) -> float:
        """The cost model's estimate of the model left when the plan's channels are pruned (torch-pruning directly)."""
        import torch_pruning as tp

        penalty = BudgetPenalty(model, x, profile, budget, ignored_layers=[find_head(model)], target="mask",
                                round_to=8, check_rounds=check_rounds)  # fmt: skip
        penalty.replan()
        pruned = copy.deepcopy(model)
        modules = dict(pruned.named_modules())
        dg = tp.DependencyGraph().build_dependency(pruned, example_inputs=x)
        for g, idxs in zip(penalty.groups, penalty.plan, strict=True):
            if idxs:
                dg.get_pruning_group(modules[g.root_name], tp.prune_conv_out_channels, idxs).prune()
        return estimate(pruned, x, profile, "int8").latency_ms

    linearised = planned_estimate(check_rounds=0)
    checked = planned_estimate(check_rounds=5)
    assert linearised > 0.99 * budget.latency_ms  # the linearised plan alone misses (why the check exists)
    assert checked <= 0.99 * budget.latency_ms < linearised


def test_a_cut_of_channels_held_at_zero_leaves_the_output_unchanged_and_a_live_cut_does_not(profile, tiny_dataset):
    """The prune stage's test for a lossless cut: logits on a fixed validation batch before and after."""
    import copy

    from hwkd.pipeline import RunContext
    from hwkd.stages.prune import _output_probe, _output_unchanged

    state = _prune_state(profile, tiny_dataset, budget_fraction=0.8)
    model, x = state.student.eval(), tiny_dataset.example_input()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.2, 1.0)
                mod.bias.uniform_(-0.5, 0.5)
    penalty = BudgetPenalty(model, x, profile, state.budget, precision="fp32", ignored_layers=[model.head],
                            target="mask", round_to=8, plan_max_layer_ratio=0.75, check_rounds=0)  # fmt: skip
    penalty(model)  # plans
    penalty.after_step(model)  # holds the plan at zero
    planned = sum(len(p) for p in penalty.plan)
    ctx = RunContext(run_dir=None)
    need = estimate(model, x, profile, "fp32").latency_ms - 0.99 * state.budget.latency_ms  # as the mask test above
    masked, live = model, copy.deepcopy(model)
    with torch.no_grad():  # the live copy: the same channels, but carrying signal
        for mod in live.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight[mod.weight == 0] = 0.5
    for net, expected in ((masked, True), (live, False)):
        net.train()
        probe = _output_probe(net, state, ctx)
        assert net.training  # the probe looks in eval mode and puts the modes back
        plan = prune_step(net, x, profile, "fp32", IMPORTANCE.get("bn_scale")(), need_ms=need, need_mb=0.0,
                          round_to=8, max_layer_ratio=0.75)  # fmt: skip
        if expected:
            assert plan["removed"] == planned > 0  # exactly the channels held at zero
        assert _output_unchanged(net, probe, ctx) is expected


def _randomised_bn(model):
    with torch.no_grad():  # a trained network's BN: scales and shifts far from 1 and 0
        for mod in model.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.2, 1.0)
                mod.bias.uniform_(-0.5, 0.5)
    return model


def test_channels_held_at_zero_are_cut_whatever_max_layer_ratio_says(profile):
    """cut_held_at_zero removes exactly the channels whose BN scale and shift are zero in every BN of their
    group (through MobileNetV2's residual adds), beyond max_layer_ratio, and the output does not move."""
    from hwkd.stages.prune import cut_held_at_zero

    torch.manual_seed(0)
    model = _randomised_bn(ZOO.get("mobilenetv2")(num_classes=3, in_channels=3, width=1.0)).eval()
    x = torch.randn(2, 3, 32, 32)
    base = estimate(model, x, profile, "fp32").latency_ms
    budget = Budget(latency_ms=0.6 * base, memory_mb=1e6)
    penalty = BudgetPenalty(model, x, profile, budget, precision="fp32", ignored_layers=[model.head], target="mask",
                            round_to=8, plan_max_layer_ratio=0.95)  # fmt: skip
    penalty(model)
    penalty.after_step(model)
    planned = {g.root_name: len(idxs) for g, idxs in zip(penalty.groups, penalty.plan, strict=True) if idxs}
    assert max(n / g.channels for g in penalty.groups for name, n in planned.items() if g.root_name == name) > 0.75
    with torch.no_grad():
        before = model(x)
    assert cut_held_at_zero(model, x[:1], profile, "fp32", round_to=8) == {"removed": sum(planned.values()), "layers": planned}
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)
    assert cut_held_at_zero(model, x[:1], profile, "fp32", round_to=8)["removed"] == 0  # nothing dead is left


def test_a_lossless_step_defers_its_recovery_and_the_stage_trains_steps_x_recovery_epochs(profile, tiny_dataset, tmp_path):
    """A student with some channels held at zero: step 1 cuts them (free, and enough for its half-way aim),
    changes nothing and gets no recovery; step 2 cuts live channels and recovers for both steps' epochs."""
    from hwkd.config import PruneConfig, TrainConfig
    from hwkd.pipeline import RunContext
    from hwkd.stages import prune
    from hwkd.stages.common import channel_rounding

    state = _prune_state(profile, tiny_dataset, budget_fraction=0.75)
    model, x = _randomised_bn(state.student).eval(), tiny_dataset.example_input()
    start = estimate(model, x, profile, "fp32").latency_ms
    half_way = Budget(latency_ms=0.84 * start, memory_mb=1e6, precision="fp32")  # past step 1's aim (0.875)
    penalty = BudgetPenalty(model, x, profile, half_way, precision="fp32", ignored_layers=[model.head], target="mask",
                            round_to=channel_rounding(0, profile))  # fmt: skip
    penalty(model)
    penalty.after_step(model)
    ctx = RunContext(run_dir=tmp_path, train=TrainConfig(batch_size=8, augment=False))
    cfg = PruneConfig(mode="budget", steps=2, recovery_epochs=1, round_to=0, penalty_weight=0.0)
    _, result = prune.run(state, cfg, ctx)
    first, second = result.history
    assert first["held_at_zero_removed"] == first["channels_removed"] > 0
    assert first["lossless"] is True and first["recovery_epochs"] == 0 and "recovery" not in first
    assert second["lossless"] is False and second["recovery_epochs"] == len(second["recovery"]) == 2
    assert result.metrics["budget_met"] is True


def test_after_a_masked_distillation_the_free_cut_comes_first_and_recovery_keeps_its_epochs(profile, tiny_dataset, tmp_path):
    """Through both stages with the mask target: the prune stage first cuts every channel distillation held
    at zero, which changes nothing; whatever the budget needs beyond them is cut and recovered, and the
    stage trains steps x recovery_epochs epochs in all."""
    from hwkd.config import DistillConfig, PruneConfig, TrainConfig
    from hwkd.pipeline import RunContext
    from hwkd.stages import distill, prune

    state = _prune_state(profile, tiny_dataset, budget_fraction=0.75)
    ctx = RunContext(run_dir=tmp_path, train=TrainConfig(batch_size=8, augment=False))
    state, _ = distill.run(state, DistillConfig(epochs=2, penalty_target="mask", penalty_start=0.5), ctx)
    cfg = PruneConfig(mode="budget", steps=2, recovery_epochs=1, round_to=0, penalty_target="mask")
    _, result = prune.run(state, cfg, RunContext(run_dir=tmp_path / "prune", train=ctx.train))
    rows = result.history
    assert result.metrics["budget_met"] is True
    assert rows[0]["held_at_zero_removed"] == rows[0]["channels_removed"] > 0 and rows[0]["lossless"] is True
    assert sum(len(r.get("recovery", [])) for r in rows) == cfg.recovery_epochs * max(cfg.steps, len(rows))
