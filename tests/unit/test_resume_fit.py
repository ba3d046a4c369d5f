"""fit's per-epoch checkpoint, exact continuation from it, and the divergence stop (issue 12)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from hwkd.checkpoint import StageCheckpoint
from hwkd.config import TrainConfig
from hwkd.errors import DivergedError
from hwkd.kd.losses import make_kd_loss
from hwkd.train import distill_loss_fn, fit

CFG = TrainConfig(batch_size=8)


def _cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 3))  # fmt: skip


LOSS = distill_loss_fn(make_kd_loss("none", 1.0, 0.0), [], [])


class _Penalty:
    """A stateful penalty: resume must restore ``scale`` rather than rebuild it from the current model."""

    def __init__(self, model):
        self.scale = float(sum(p.abs().sum() for p in model.parameters()))

    def __call__(self, model):
        return sum(p.abs().sum() for p in model.parameters()) / self.scale

    def state_dict(self):
        return {"scale": self.scale}

    def load_state_dict(self, state):
        self.scale = state["scale"]


def _train(model, dataset, epochs, checkpoint=None, seen=None, lr=0.05, on_end=None):
    extra = nn.Parameter(torch.ones(3))

    def loss_fn(m, xb, yb):
        return {"loss": nn.functional.cross_entropy(m(xb) * extra, yb)}

    history = fit(model, dataset, epochs=epochs, lr=lr, loss_fn=loss_fn, train_cfg=CFG, seed=3, extra_params=[extra],
                  penalty_fn=_Penalty(model), penalty_weight=0.1, warmup_epochs=1, checkpoint=checkpoint,
                  checkpoint_tag="t", on_epoch_end=on_end or (seen.append if seen is not None else None))  # fmt: skip
    return history, extra


def test_stopped_after_two_epochs_then_continued_equals_four_straight(tiny_dataset, tmp_path):
    ref = _cnn()
    ref_history, ref_extra = _train(ref, tiny_dataset, 4)

    path = tmp_path / "last.pt"

    def kill_in_epoch_3(row):
        if row["epoch"] == 3:  # raised before epoch 3 is saved, as a SIGKILL would stop it
            raise SystemExit("killed")

    with pytest.raises(SystemExit):
        _train(_cnn(), tiny_dataset, 4, StageCheckpoint(path), on_end=kill_in_epoch_3)
    saved = StageCheckpoint.load(path)
    assert saved.saved["epoch"] == 2 and len(saved.saved["history"]) == 2
    torch.manual_seed(123)  # the resumed process' global RNG starts elsewhere; the checkpoint restores it
    second, seen = _cnn(seed=7), []  # different initial weights: all of them come from the checkpoint
    history, extra = _train(second, tiny_dataset, 4, saved, seen)

    assert history == ref_history
    assert seen == history  # the restored rows are replayed to on_epoch_end (schedule state)
    for a, b in zip(ref.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(extra, ref_extra)
    assert StageCheckpoint.load(path).saved["epoch"] == 4


def test_a_checkpoint_of_another_fit_is_not_continued(tiny_dataset, tmp_path):
    path = tmp_path / "last.pt"
    _train(_cnn(), tiny_dataset, 1, StageCheckpoint(path))
    ckpt = StageCheckpoint.load(path)
    assert ckpt.resume_point("t") is not None and ckpt.resume_point("step 2") is None


def test_nan_loss_stops_at_once_and_keeps_the_last_good_epoch(tiny_dataset, tmp_path):
    path = tmp_path / "last.pt"
    calls = {"n": 0}
    batches_per_epoch = len(tiny_dataset.loader("train", train=True, batch_size=CFG.batch_size))

    def loss_fn(m, xb, yb):
        calls["n"] += 1
        loss = nn.functional.cross_entropy(m(xb), yb)
        return {"loss": loss * float("nan") if calls["n"] > batches_per_epoch + 1 else loss}

    model = _cnn()
    with pytest.raises(DivergedError) as info:
        fit(model, tiny_dataset, epochs=5, lr=0.05, loss_fn=loss_fn, train_cfg=CFG, description="distill",
            checkpoint=StageCheckpoint(path), checkpoint_tag="t")  # fmt: skip
    err = info.value
    assert err.exit_code == 3 and err.epoch == 1  # epoch 2 (index 1) blew up, epoch 1 was good
    assert "nan at epoch 2, step" in str(err) and "last good epoch (1)" in str(err)
    assert StageCheckpoint.load(path).saved["epoch"] == 1
    # continuing with a lower LR from the kept epoch works (the NaN never reached the saved weights)
    history = fit(_cnn(seed=5), tiny_dataset, epochs=3, lr=0.01, loss_fn=LOSS, train_cfg=CFG,
                  checkpoint=StageCheckpoint.load(path), checkpoint_tag="t")  # fmt: skip
    assert [r["epoch"] for r in history] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in history)


def test_inf_loss_in_the_first_epoch_says_the_stage_restarts(tiny_dataset):
    def loss_fn(m, xb, yb):
        return {"loss": m(xb).sum() * float("inf")}

    with pytest.raises(DivergedError, match="no epoch of this stage had finished"):
        fit(_cnn(), tiny_dataset, epochs=2, lr=0.05, loss_fn=loss_fn, train_cfg=CFG)


def test_qat_fake_quant_state_resumes_into_a_freshly_prepared_graph(tiny_dataset, tmp_path):
    """QAT replays by preparing the graph again and loading last.pt: scales and observer flags are buffers."""
    from torchao.quantization.pt2e import (
        disable_observer,
        move_exported_model_to_eval,
        move_exported_model_to_train,
    )

    from hwkd.stages import qat
    from hwkd.train import Modes

    fp32 = _cnn().eval()
    example = tiny_dataset.sample("train", 2)[0]
    modes = Modes(train=move_exported_model_to_train, eval=move_exported_model_to_eval)
    path = tmp_path / "last.pt"
    prepared, _ = qat.prepare_qat(fp32, example, "x86")
    fit(prepared, tiny_dataset, epochs=2, lr=0.01, loss_fn=LOSS, train_cfg=CFG, modes=modes,
        on_epoch_start=lambda e: (prepared.apply(disable_observer), None)[1] if e == 1 else None,
        checkpoint=StageCheckpoint(path), checkpoint_tag="qat")  # fmt: skip
    again, _ = qat.prepare_qat(fp32, example, "x86")
    fit(again, tiny_dataset, epochs=2, lr=0.01, loss_fn=LOSS, train_cfg=CFG, modes=modes,
        checkpoint=StageCheckpoint.load(path), checkpoint_tag="qat")  # fmt: skip  (nothing left to train)
    x = tiny_dataset.sample("val", 8)[0]
    with torch.no_grad():
        assert torch.equal(qat.convert(prepared)(x), qat.convert(again)(x))


def test_a_resumed_stage_reports_its_time_across_launches(tmp_path):
    """A stage killed after 40 s and resumed reports 40 s plus the resumed part, not only the last launch."""
    from hwkd.pipeline import RunContext, StageResult, run_stages

    first = RunContext(run_dir=tmp_path)
    first.checkpoint("distill").save("t", epoch=1)
    saved = StageCheckpoint.load(tmp_path / "stages" / "distill" / "last.pt")
    assert 0 < saved.earlier_seconds < 5  # the first launch's time so far
    saved.saved["stage_seconds"] = 40.0  # as if the first launch had trained 40 s before it was killed
    torch.save(saved.saved, saved.path)

    def stage(state, cfg, ctx):
        ctx.checkpoint("distill").save("t", epoch=2)
        return state, StageResult(name="distill")

    resumed = RunContext(run_dir=tmp_path, resume=True)
    _, (result,) = run_stages(None, [("distill", stage, None)], resumed)
    assert 40.0 <= result.seconds < 45.0
    assert 40.0 <= StageCheckpoint.load(saved.path).saved["stage_seconds"] < 45.0  # and a third launch counts both

    _, (fresh,) = run_stages(None, [("distill", stage, None)], RunContext(run_dir=tmp_path))  # not resuming
    assert fresh.seconds < 5.0
