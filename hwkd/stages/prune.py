"""Stage 2: structured channel pruning with torch-pruning (DepGraph), recovering with distillation.

DepGraph finds the layers that must shrink together (residual adds, depthwise convs, the BN after each
conv), so whole channels disappear and the model gets really smaller and faster, not just sparser.
Channel counts are rounded to the profile's multiple, since odd widths waste SIMD lanes.
"""

from __future__ import annotations

import dataclasses

import torch
import torch_pruning as tp

from hwkd.config import PruneConfig
from hwkd.kd.losses import make_kd_loss
from hwkd.models.loaders import find_head
from hwkd.pipeline import PipelineState, RunContext, StageResult
from hwkd.registry import Registry
from hwkd.stages.common import model_metrics, out_channels
from hwkd.train import distill_loss_fn, fit

IMPORTANCE: Registry = Registry("importance criterion")
IMPORTANCE.register("l2")(lambda: tp.importance.GroupMagnitudeImportance(p=2))
IMPORTANCE.register("bn_scale")(lambda: tp.importance.BNScaleImportance())
IMPORTANCE.register("taylor")(lambda: tp.importance.GroupTaylorImportance())


def _accumulate_gradients(model, loss_fn, dataset, batches: int = 4, batch_size: int = 64) -> None:
    """Taylor importance needs weight gradients of the task loss; a few batches are enough."""
    model.eval()
    model.zero_grad(set_to_none=True)
    for i in range(batches):
        xb = dataset.x_train[i * batch_size : (i + 1) * batch_size]
        yb = dataset.y_train[i * batch_size : (i + 1) * batch_size]
        if len(xb) == 0:
            break
        loss_fn(model, xb, yb)["loss"].backward()


def run(state: PipelineState, cfg: PruneConfig, ctx: RunContext) -> tuple[PipelineState, StageResult]:
    if not 0.0 < cfg.ratio < 1.0:
        from hwkd.errors import ConfigError

        raise ConfigError(f"prune.ratio must be between 0 and 1 (exclusive), got {cfg.ratio}.")
    model = state.student
    model.eval()
    round_to = cfg.round_to or state.profile.runtime.channel_multiple
    kd = state.kd or make_kd_loss("hinton", 4.0, 0.7)
    loss_fn = distill_loss_fn(kd, state.teachers, state.teacher_weights)
    example = state.example_input
    before = out_channels(model)
    pruner = tp.pruner.BasePruner(
        model,
        example,
        importance=IMPORTANCE.get(cfg.importance)(),
        pruning_ratio=cfg.ratio,
        iterative_steps=cfg.steps,
        ignored_layers=[find_head(model)],
        round_to=round_to if round_to > 1 else None,
    )
    history = []
    for step in range(cfg.steps):
        if cfg.importance == "taylor":
            _accumulate_gradients(model, loss_fn, state.dataset)
        pruner.step()
        model.zero_grad(set_to_none=True)
        macs, params = tp.utils.count_ops_and_params(model, example)
        row = {"step": step + 1, "params": int(params), "macs": int(macs)}
        if cfg.recovery_epochs > 0:
            epochs = fit(
                model,
                state.dataset,
                epochs=cfg.recovery_epochs,
                lr=cfg.lr,
                loss_fn=loss_fn,
                train_cfg=ctx.train,
                seed=ctx.seed + step + 1,
                progress=ctx.progress,
                description=f"prune step {step + 1}/{cfg.steps} recovery",
            )
            row.update({k: v for k, v in epochs[-1].items() if k != "epoch"})
            row["recovery"] = epochs
        history.append(row)
    model.eval()
    after = out_channels(model)
    with torch.no_grad():
        model(example)  # fail here, inside the stage, if pruning broke the graph
    result = StageResult(
        name="prune",
        metrics={
            **model_metrics(model, state),
            "importance": cfg.importance,
            "ratio": cfg.ratio,
            "round_to": round_to,
            "channels_before": before,
            "channels_after": after,
        },
        history=history,
    )
    channels = {**state.channels, "before_prune": before, "after_prune": after}
    return dataclasses.replace(state, student=model, channels=channels, kd=kd), result
