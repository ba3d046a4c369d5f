"""torch-pruning fallbacks: layers behind a channel shuffle stay unpruned; other failures become StageErrors."""

from __future__ import annotations

import pytest
import torch
import torch_pruning as tp
from torch import nn

from hwkd.errors import StageError
from hwkd.models.depgraph import base_pruner, dependency_graph, torch_pruning_errors, unprunable_layers

torch.set_num_threads(2)


tv = pytest.importorskip("torchvision")


def _shufflenet():
    return tv.models.shufflenet_v2_x0_5(num_classes=3).eval()


def _x():
    return torch.rand(1, 3, 32, 32)


def test_plain_torch_pruning_crashes_on_the_shuffle():
    """The failure this module works round (if torch-pruning fixes it, the fallback is no longer needed)."""
    with pytest.raises(ZeroDivisionError):
        tp.DependencyGraph().build_dependency(_shufflenet(), example_inputs=_x(), verbose=False)


def test_layers_feeding_the_shuffle_stay_unpruned_the_rest_prunes():
    model = _shufflenet()
    names = unprunable_layers(model, _x())
    assert "stage2.0.branch1.2" in names and "stage2.0.branch2.5" in names  # the convs that feed a shuffle
    assert "stage2.0.branch2.0" not in names  # inside a branch: its channels never reach a shuffle
    assert all("channel shuffle" in why for why in names.values())
    before = sum(p.numel() for p in model.parameters())
    widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    pruner, skipped = base_pruner(
        model, _x(), ignored_layers=[model.fc], importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=0.3,
    )  # fmt: skip
    assert set(skipped) == set(names)
    pruner.step()
    after = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert all(after[n] == widths[n] for n in names if n in widths)  # left alone
    assert after["stage2.0.branch2.0"] < widths["stage2.0.branch2.0"]  # pruned
    assert sum(p.numel() for p in model.parameters()) < 0.9 * before
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 3)


def test_channel_groups_skip_unprunable_layers_and_regroup_safely():
    from hwkd.hardware.penalty import channel_groups
    from hwkd.hardware.profiles import load_profile

    model = _shufflenet()
    dg = dependency_graph(model, _x())
    names = {m: n for n, m in model.named_modules()}
    unprunable = {names[m] for m in dg.hwkd_unprunable}
    groups = channel_groups(model, _x(), load_profile("x86-avx2"), ignored_layers=[model.fc], dg=dg)
    roots = {g.root_name for g in groups}
    assert "stage2.0.branch2.3" in roots and not roots & unprunable  # the depthwise conv roots its branch group
    for g in groups:  # every get_pruning_group re-maps indices: it must not crash either
        root = g.group[0]
        dg.get_pruning_group(root.dep.target.module, root.dep.handler, [0])


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.conv(x), 1), 1))


def test_other_torch_pruning_failures_become_stage_errors(monkeypatch):
    from torch_pruning.dependency import index_mapping

    def broken(graph):
        raise IndexError("list index out of range")

    monkeypatch.setattr(index_mapping, "update_index_mapping", broken)
    with pytest.raises(StageError) as info:
        dependency_graph(Tiny().eval(), _x())
    msg = str(info.value)
    assert "torch-pruning failed while tracing" in msg and "Tiny" in msg and "IndexError" in msg
    assert "--stages distill,qat,export,bench" in msg


def test_errors_not_from_torch_pruning_pass_through_unchanged():
    with pytest.raises(KeyError), torch_pruning_errors(nn.Linear(1, 1), "pruning"):
        raise KeyError("mine")


def test_preflight_forms_every_group_and_reports_grouping_failures(monkeypatch):
    model = _shufflenet()
    assert unprunable_layers(model, _x(), check_groups=True)  # shufflenet: handled, no error

    def broken(self, *args, **kwargs):
        raise IndexError("list index out of range")

    monkeypatch.setattr(tp.DependencyGraph, "get_pruning_group", broken)
    with pytest.raises(StageError, match="grouping the channels that prune together.*IndexError"):
        unprunable_layers(Tiny().eval(), _x(), check_groups=True)
