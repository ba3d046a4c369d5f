import math

import pytest
import torch
import torch.nn as nn

from hwkd.config import TrainConfig
from hwkd.kd.losses import KD_LOSSES, make_kd_loss, soft_kl
from hwkd.train import accuracy, distill_loss_fn, fit, lr_at


def test_lr_schedule_warmup_then_cosine():
    assert lr_at(0, 100, 1.0, warmup_steps=10) == pytest.approx(0.1)
    assert lr_at(9, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert lr_at(10, 100, 1.0, warmup_steps=10) == pytest.approx(1.0)
    assert lr_at(55, 100, 1.0, warmup_steps=10) == pytest.approx(0.5)
    assert lr_at(100, 100, 1.0, warmup_steps=10) == pytest.approx(0.0, abs=1e-12)
    values = [lr_at(s, 50, 0.1) for s in range(50)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_soft_kl_known_value():
    s = torch.tensor([[1.0, 0.0]])
    t = torch.tensor([[0.0, 1.0]])
    temp = 2.0
    p = torch.softmax(t / temp, 1)[0]
    q = torch.softmax(s / temp, 1)[0]
    expected = float((p * (p / q).log()).sum()) * temp * temp
    assert soft_kl(s, t, temp).item() == pytest.approx(expected, rel=1e-5)
    assert soft_kl(t, t, temp).item() == pytest.approx(0.0, abs=1e-6)


def test_hinton_mixes_hard_and_soft_terms():
    s = torch.tensor([[2.0, 0.5, -1.0]])
    t = torch.tensor([[0.0, 3.0, 0.0]])
    y = torch.tensor([0])
    out = make_kd_loss("hinton", temperature=4.0, alpha=0.25)(s, [t], [1.0], y)
    ce = nn.functional.cross_entropy(s, y).item()
    kd = soft_kl(s, t, 4.0).item()
    assert out["ce"].item() == pytest.approx(ce)
    assert out["hinton"].item() == pytest.approx(kd)
    assert out["kd"].item() == pytest.approx(0.25 * kd)
    assert out["loss"].item() == pytest.approx(0.75 * ce + 0.25 * kd)


def test_multi_teacher_weights_are_applied():
    s, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    t1, t2 = torch.randn(4, 3), torch.randn(4, 3)
    loss = make_kd_loss("hinton", 3.0, 1.0)
    both = loss(s, [t1, t2], [0.25, 0.75], y)["kd"].item()
    assert both == pytest.approx(0.25 * soft_kl(s, t1, 3.0).item() + 0.75 * soft_kl(s, t2, 3.0).item(), rel=1e-5)


@pytest.mark.parametrize("name", [n for n in KD_LOSSES.names() if KD_LOSSES.get(n).uses == "logits"])
def test_every_logit_kd_loss_returns_a_differentiable_total(name):
    s = torch.randn(5, 4, requires_grad=True)
    out = make_kd_loss(name, 2.0, 0.5)(s, [torch.randn(5, 4)], [1.0], torch.randint(0, 4, (5,)))
    out["loss"].backward()
    assert s.grad is not None and math.isfinite(out["loss"].item())


def test_fit_trains_extra_params_logs_hook_values_and_val_loss(tiny_dataset):
    model = _tiny_cnn()
    extra = nn.Parameter(torch.ones(3))
    rows_seen = []

    def loss_fn(m, xb, yb):
        return {"loss": nn.functional.cross_entropy(m(xb) * extra, yb)}

    history = fit(
        model, tiny_dataset, epochs=2, lr=0.05, loss_fn=loss_fn, train_cfg=TrainConfig(batch_size=8),
        extra_params=[extra], on_epoch_start=lambda e: {"temperature": 4.0 - e},
        on_epoch_end=rows_seen.append,
    )
    assert not torch.equal(extra.detach(), torch.ones(3))
    assert [r["temperature"] for r in history] == [4.0, 3.0]
    assert rows_seen == history and all(r["val_loss"] > 0 for r in history)


def _tiny_cnn(classes=3):
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, classes)
    )


def test_fit_learns_and_logs_history(tiny_dataset):
    torch.manual_seed(0)
    model = _tiny_cnn()
    before = accuracy(model, tiny_dataset.eval_batches("val"))
    loss_fn = distill_loss_fn(make_kd_loss("none", 1.0, 0.0), [], [])
    history = fit(
        model, tiny_dataset, epochs=15, lr=0.1, loss_fn=loss_fn, train_cfg=TrainConfig(batch_size=8, augment=False)
    )
    assert len(history) == 15 and {"epoch", "lr", "loss", "ce", "val_accuracy"} <= set(history[0])
    assert history[-1]["loss"] < history[0]["loss"]
    assert history[-1]["val_accuracy"] >= max(before, 0.8)
    assert not model.training


def test_fit_adds_weighted_penalty_and_logs_it(tiny_dataset):
    model = _tiny_cnn()
    loss_fn = distill_loss_fn(make_kd_loss("none", 1.0, 0.0), [], [])
    calls = []

    def penalty(m):
        calls.append(1)
        return sum(p.abs().sum() for p in m.parameters()) * 0 + torch.tensor(2.0)

    history = fit(
        model, tiny_dataset, epochs=1, lr=0.01, loss_fn=loss_fn, train_cfg=TrainConfig(batch_size=8),
        penalty_fn=penalty, penalty_weight=0.5,
    )
    assert calls and history[0]["penalty"] == pytest.approx(2.0)


def test_distill_loss_fn_runs_teachers_without_grad(tiny_dataset):
    teacher = _tiny_cnn().eval()
    student = _tiny_cnn()
    fn = distill_loss_fn(make_kd_loss("hinton", 4.0, 0.5), [teacher], [1.0])
    xb, yb = tiny_dataset.sample("train", 4)
    out = fn(student, xb, yb)
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())
