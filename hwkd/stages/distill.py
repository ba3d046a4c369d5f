"""Stage 1: distill the teacher(s) into the student with knowledge distillation.

The training loop is the shared one (hwkd.train); this stage picks the KD loss, hooks the layers that
feature/relation KD needs (and trains their 1x1 adapters beside the student), steps the temperature and
alpha schedules each epoch, and reports the per-epoch loss terms.
"""

from __future__ import annotations

import dataclasses

from hwkd.config import DistillConfig
from hwkd.hardware.penalty import BudgetPenalty
from hwkd.kd.losses import make_kd_loss
from hwkd.kd.schedules import KDSchedule
from hwkd.models.loaders import find_head
from hwkd.pipeline import PipelineState, RunContext, StageResult
from hwkd.stages.common import channel_rounding, model_metrics
from hwkd.train import distill_loss_fn, fit


def schedule_hooks(kd, schedule: KDSchedule, epochs: int):
    """``(on_epoch_start, on_epoch_end)`` for fit: set T and alpha from progress and validation losses."""
    val_losses: list[float] = []

    def on_epoch_start(epoch: int) -> dict[str, float]:
        progress = epoch / max(1, epochs)
        kd.temperatures = schedule.temperatures_at(progress, val_losses)
        kd.alpha = schedule.alpha_at(progress)
        return {"temperature": kd.temperature, "alpha": kd.alpha}

    def on_epoch_end(row: dict[str, float]) -> None:
        val_losses.append(row["val_loss"])

    return on_epoch_start, on_epoch_end


def _start_penalty_at(penalty: BudgetPenalty, start: float, epochs: int, on_start):
    """Hold the penalty off for the first ``start`` of the epochs: the plan target then ranks channels
    the student has learned to use, not the equal BN scales of a fresh initialisation."""

    def on_epoch_start(epoch: int) -> dict[str, float]:
        penalty.enabled = epoch / max(1, epochs) >= start
        return on_start(epoch)

    return on_epoch_start


def run(state: PipelineState, cfg: DistillConfig, ctx: RunContext) -> tuple[PipelineState, StageResult]:
    kd = make_kd_loss(cfg.kd, cfg.temperature, cfg.alpha)
    schedule = KDSchedule.from_config(cfg)
    student = state.student
    penalty = None
    # A budget pruning cannot reach (prune.budget_reach) is left alone: the penalty would only cost accuracy.
    reachable = state.budget_reach is None or state.budget_reach["reachable"]
    if cfg.penalty_weight > 0 and state.budget is not None and reachable:
        penalty = BudgetPenalty(student, state.example_input, state.profile, state.budget,
                                ignored_layers=[find_head(student)], target=cfg.penalty_target,
                                round_to=channel_rounding(state.round_to, state.profile))  # fmt: skip
    extra = kd.attach(student, state.teachers, state.example_input, cfg.student_layers, cfg.teacher_layers)
    on_start, on_end = schedule_hooks(kd, schedule, cfg.epochs)
    if penalty is not None and cfg.penalty_start > 0:
        on_start = _start_penalty_at(penalty, cfg.penalty_start, cfg.epochs, on_start)
    try:
        history = fit(
            student,
            state.dataset,
            epochs=cfg.epochs,
            lr=cfg.lr,
            loss_fn=distill_loss_fn(kd, state.teachers, state.teacher_weights),
            train_cfg=ctx.train,
            seed=ctx.seed,
            progress=ctx.progress,
            description=f"distill ({cfg.kd}, T={cfg.temperature:g} {cfg.temperature_schedule})",
            warmup_epochs=1,
            extra_params=extra,
            on_epoch_start=on_start,
            on_epoch_end=on_end,
            penalty_fn=penalty,
            penalty_weight=cfg.penalty_weight,
            device=ctx.device,
            amp=ctx.amp,
            modules=[*state.teachers, kd.adapters],
            checkpoint=ctx.checkpoint("distill"),
            checkpoint_tag="distill",
        )
    finally:
        kd.detach()  # no hooks may stay on the student: pruning and export trace it next
    result = StageResult(
        name="distill",
        metrics={
            **model_metrics(student, state),
            "kd": cfg.kd,
            "temperature": cfg.temperature,
            "penalty_weight": cfg.penalty_weight if reachable else 0.0,
            "penalty_target": cfg.penalty_target,
            "penalty_start": cfg.penalty_start,
            **({} if reachable else {"penalty_note": "off: the budget is out of reach of channel pruning"}),
            "temperature_schedule": cfg.temperature_schedule,
            "alpha": cfg.alpha,
            "alpha_schedule": cfg.alpha_schedule,
            "teacher_weights": [round(w, 4) for w in state.teacher_weights],
        },
        history=history,
    )
    # Later stages (prune recovery) distill on logits: the feature terms' adapters fit this student's
    # channels, which pruning changes. A student trained alone stays alone.
    recovery = make_kd_loss(cfg.kd, cfg.temperature, cfg.alpha).logits_only()
    return dataclasses.replace(state, student=student, kd=recovery), result
