"""KD losses (known values on hand-made logits and features), their combination, feature hooks,
multi-teacher weighting and the distill stage's use of them."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from hwkd.errors import ConfigError
from hwkd.kd.features import FeatureTap, auto_layers
from hwkd.kd.losses import (
    KD_LOSSES,
    AttentionTerm,
    DecoupledTerm,
    FitNetTerm,
    KDBatch,
    RelationTerm,
    SimilarityTerm,
    accuracy_weights,
    make_kd_loss,
    parse_spec,
    soft_kl,
)


def _kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def _softmax(v, t=1.0):
    e = [math.exp(x / t) for x in v]
    return [x / sum(e) for x in e]


def test_dkd_known_value():
    s, t, y, temp = [2.0, 0.0, -1.0], [0.5, 2.0, 0.0], 0, 2.0
    ps, pt = _softmax(s, temp), _softmax(t, temp)
    tckd = _kl([pt[0], 1 - pt[0]], [ps[0], 1 - ps[0]])
    nckd = _kl(_softmax(t[1:], temp), _softmax(s[1:], temp))
    expected = (1.0 * tckd + 8.0 * nckd) * temp**2
    batch = KDBatch(torch.tensor([s]), torch.tensor([t]), torch.tensor([y]), ((temp, 1.0),))
    assert DecoupledTerm()(batch).item() == pytest.approx(expected, rel=1e-4)


def test_dkd_is_zero_when_student_matches_teacher():
    x = torch.randn(4, 5)
    batch = KDBatch(x, x.clone(), torch.tensor([0, 1, 2, 3]), ((4.0, 1.0),))
    assert DecoupledTerm()(batch).item() == pytest.approx(0.0, abs=1e-5)


def test_multi_temperature_fusion_is_the_weighted_sum():
    s, t = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[0.0, 3.0, 0.0]])
    batch = KDBatch(s, t, torch.tensor([0]), ((6.0, 0.5), (1.0, 0.5)))
    expected = 0.5 * soft_kl(s, t, 6.0) + 0.5 * soft_kl(s, t, 1.0)
    assert KD_LOSSES.get("hinton")()(batch).item() == pytest.approx(expected.item(), rel=1e-6)


def test_fitnet_known_value_with_identity_adapter():
    s = torch.ones(1, 2, 2, 2)
    t = torch.zeros(1, 2, 4, 4)
    t[:, 0] = 3.0  # pooled to 2x2 it stays 3 in channel 0, 0 in channel 1
    adapter = nn.Conv2d(2, 2, 1, bias=False)
    with torch.no_grad():
        adapter.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
    batch = KDBatch(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([0]), student_maps=[s], teacher_maps=[t],
                    adapters=nn.ModuleList([adapter]))
    # channel 0: (1 - 3)^2 = 4, channel 1: (1 - 0)^2 = 1 -> mean 2.5
    assert FitNetTerm()(batch).item() == pytest.approx(2.5)


def test_attention_transfer_known_value():
    s = torch.zeros(1, 1, 1, 2)
    s[..., 0] = 1.0  # attention all on position 0
    t = torch.zeros(1, 1, 1, 2)
    t[..., 1] = 2.0  # all on position 1
    batch = KDBatch(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), student_maps=[s], teacher_maps=[t])
    # normalized maps (1, 0) and (0, 1): mean squared difference = (1 + 1) / 2
    assert AttentionTerm()(batch).item() == pytest.approx(1.0)
    same = KDBatch(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([0]), student_maps=[s], teacher_maps=[3 * s])
    assert AttentionTerm()(same).item() == pytest.approx(0.0)


def test_rkd_ignores_scale_and_sees_geometry():
    e = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    scaled = KDBatch(torch.zeros(3, 2), torch.zeros(3, 2), torch.tensor([0, 1, 0]), student_embedding=e,
                     teacher_embedding=5 * e)
    assert RelationTerm()(scaled).item() == pytest.approx(0.0, abs=1e-6)
    # Distance only: student distances (1, 2, sqrt5) vs teacher (1, 1, sqrt2) after mean-normalization.
    t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    ds = torch.tensor([1.0, 2.0, 5**0.5])
    dt = torch.tensor([1.0, 1.0, 2**0.5])
    expected = F.smooth_l1_loss(ds / ds.mean(), dt / dt.mean()).item()
    batch = KDBatch(torch.zeros(3, 2), torch.zeros(3, 2), torch.tensor([0, 1, 0]), student_embedding=e,
                    teacher_embedding=t)
    assert RelationTerm(distance=1.0, angle=0.0)(batch).item() == pytest.approx(expected, rel=1e-5)
    assert RelationTerm(distance=0.0, angle=1.0)(batch).item() > 0


def test_similarity_preserving_known_value():
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(2, 2, 1, 1)  # orthogonal samples: G = I
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(2, 2, 1, 1)  # identical samples: G rows (1,1)/sqrt2
    batch = KDBatch(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([0, 1]), student_maps=[s], teacher_maps=[t])
    r = 2**-0.5
    expected = 2 * ((1 - r) ** 2 + r**2) / 4
    assert SimilarityTerm()(batch).item() == pytest.approx(expected, rel=1e-5)


def test_combination_mixes_ce_alpha_and_weighted_feature_terms():
    s, t, y = torch.tensor([[2.0, 0.5, -1.0]]), torch.tensor([[0.0, 3.0, 0.0]]), torch.tensor([0])
    kd = make_kd_loss("hinton+rkd:2", temperature=4.0, alpha=0.25)
    kd._student_tap = type("Tap", (), {"maps": [], "embedding": torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])})()
    kd._teacher_taps = [type("Tap", (), {"maps": [], "embedding": torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])})()]
    out = kd(s, [t], [1.0], y)
    ce, hint = F.cross_entropy(s, y).item(), soft_kl(s, t, 4.0).item()
    assert out["hinton"].item() == pytest.approx(hint)
    assert out["loss"].item() == pytest.approx(0.75 * ce + 0.25 * hint + 2.0 * out["rkd"].item(), rel=1e-6)
    assert out["kd"].item() == pytest.approx(0.25 * hint + 2.0 * out["rkd"].item(), rel=1e-6)


def test_feature_only_loss_keeps_full_cross_entropy():
    kd = make_kd_loss("at", alpha=0.9)
    x = torch.randn(2, 3, 4, 4)
    kd._student_tap = type("Tap", (), {"maps": [x], "embedding": None})()
    kd._teacher_taps = [type("Tap", (), {"maps": [x], "embedding": None})()]
    s, y = torch.randn(2, 4), torch.tensor([0, 1])
    out = kd(s, [torch.randn(2, 4)], [1.0], y)
    assert out["loss"].item() == pytest.approx(F.cross_entropy(s, y).item() + 1000 * out["at"].item(), rel=1e-5)


def test_none_is_the_student_alone():
    kd = make_kd_loss("none")
    s, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    assert not kd.needs_teacher
    assert kd(s, [], [], y)["loss"].item() == pytest.approx(F.cross_entropy(s, y).item())


@pytest.mark.parametrize(
    ("spec", "message"),
    [("hintn", "Unknown KD loss"), ("hinton+none", "none"), ("hinton+at:x", "not a number"), ("at+at", "twice")],
)
def test_bad_specs_are_config_errors(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_spec(spec)


def test_spec_weights_parse():
    assert parse_spec("hinton+at:500") == [("hinton", None), ("at", 500.0)]
    assert parse_spec("none") == []


def _net(widths=(8, 16, 16), classes=3):
    c1, c2, c3 = widths
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1), nn.BatchNorm2d(c2), nn.ReLU(),
        nn.Conv2d(c2, c3, 3, stride=2, padding=1), nn.BatchNorm2d(c3), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c3, classes),
    )


def test_auto_layers_find_the_last_three_stages():
    assert auto_layers(_net(), torch.randn(2, 1, 8, 8)) == ["2", "5", "8"]
    assert auto_layers(_net(), torch.randn(2, 1, 8, 8), count=2) == ["5", "8"]


def test_feature_tap_rejects_unknown_layers():
    with pytest.raises(ConfigError, match="not in"):
        FeatureTap(_net(), ["features.9"])


@pytest.mark.parametrize("name", KD_LOSSES.names())
def test_every_registered_loss_trains_student_and_adapters(name):
    torch.manual_seed(0)
    student, teachers = _net(), [_net((16, 32, 32)).eval(), _net((8, 8, 24)).eval()]
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    kd = make_kd_loss(name, 3.0, 0.5)
    extra = kd.attach(student, teachers, x)
    with torch.no_grad():
        t_logits = [t(x) for t in teachers]
    out = kd(student(x), t_logits, [0.7, 0.3], y)
    assert set(out) >= {"loss", "ce", "kd", name} and math.isfinite(out["loss"].item())
    out["loss"].backward()
    assert student[0].weight.grad is not None and student[0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in extra)
    assert bool(extra) == KD_LOSSES.get(name).needs_adapters
    kd.detach()
    hooks = [m._forward_hooks for m in student.modules()] + [m._forward_pre_hooks for m in student.modules()]
    assert not any(hooks)


def test_teacher_weights_are_applied_per_term():
    s, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    t1, t2 = torch.randn(4, 3), torch.randn(4, 3)
    out = make_kd_loss("dkd", 3.0, 1.0)(s, [t1, t2], [0.25, 0.75], y)
    one = [make_kd_loss("dkd", 3.0, 1.0)(s, [t], [1.0], y)["dkd"].item() for t in (t1, t2)]
    assert out["dkd"].item() == pytest.approx(0.25 * one[0] + 0.75 * one[1], rel=1e-5)


def test_accuracy_weights_count_only_accuracy_above_chance():
    assert accuracy_weights([0.9, 0.5], 10) == pytest.approx([0.8 / 1.2, 0.4 / 1.2])
    assert accuracy_weights([0.1, 0.05], 10) == pytest.approx([0.5, 0.5])  # none above chance: equal
    assert accuracy_weights([0.95, 0.1], 10) == pytest.approx([1.0, 0.0])


def test_logits_only_drops_feature_terms():
    assert make_kd_loss("dkd+at").logits_only().spec == "dkd"
    assert make_kd_loss("fitnet").logits_only().spec == "hinton"
    assert make_kd_loss("none").logits_only().spec == "none"


def test_feature_kd_without_attach_is_a_clear_error():
    with pytest.raises(ConfigError, match="attach"):
        make_kd_loss("at")(torch.randn(2, 3), [torch.randn(2, 3)], [1.0], torch.tensor([0, 1]))
