"""Stage 1: distill the teacher(s) into the student with knowledge distillation.

The training loop is the shared one (hwkd.train); this stage only picks the KD loss and reports.
"""

from __future__ import annotations

import dataclasses

from hwkd.config import DistillConfig
from hwkd.hardware.penalty import BudgetPenalty
from hwkd.kd.losses import make_kd_loss
from hwkd.models.loaders import find_head
from hwkd.pipeline import PipelineState, RunContext, StageResult
from hwkd.stages.common import model_metrics
from hwkd.train import distill_loss_fn, fit


def run(state: PipelineState, cfg: DistillConfig, ctx: RunContext) -> tuple[PipelineState, StageResult]:
    kd = state.kd or make_kd_loss(cfg.kd, cfg.temperature, cfg.alpha)
    student = state.student
    penalty = None
    if cfg.penalty_weight > 0 and state.budget is not None:
        penalty = BudgetPenalty(student, state.example_input, state.profile, state.budget,
                                ignored_layers=[find_head(student)])  # fmt: skip
    history = fit(
        student,
        state.dataset,
        epochs=cfg.epochs,
        lr=cfg.lr,
        loss_fn=distill_loss_fn(kd, state.teachers, state.teacher_weights),
        train_cfg=ctx.train,
        seed=ctx.seed,
        progress=ctx.progress,
        description=f"distill ({cfg.kd}, T={cfg.temperature:g})",
        warmup_epochs=1,
        penalty_fn=penalty,
        penalty_weight=cfg.penalty_weight,
    )
    result = StageResult(
        name="distill",
        metrics={
            **model_metrics(student, state),
            "kd": cfg.kd,
            "temperature": cfg.temperature,
            "penalty_weight": cfg.penalty_weight,
        },
        history=history,
    )
    return dataclasses.replace(state, student=student, kd=kd), result
