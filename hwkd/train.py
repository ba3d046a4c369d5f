"""The one training loop, shared by distill, prune recovery and QAT. Read it top to bottom.

Each stage supplies a ``loss_fn(model, xb, yb) -> {"loss": total, other terms...}`` and, optionally,
a hardware ``penalty_fn(model) -> scalar`` whose weighted value is added to the loss (the cost model
turns the device budget into that penalty). Everything else (LR schedule, augmentation, clipping,
validation, per-epoch history) is the same for every stage.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hwkd import accel, distributed
from hwkd.config import TrainConfig
from hwkd.data.loading import set_epoch


def lr_at(step: int, total_steps: int, base_lr: float, warmup_steps: int = 0) -> float:
    """Linear warm-up then cosine decay to zero: a pure function of the step."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * base_lr * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass
class Modes:
    """How to switch a model between training and evaluation; exported QAT graphs need torchao's helpers."""

    train: Callable[[torch.nn.Module], None] = field(default=lambda m: m.train())
    eval: Callable[[torch.nn.Module], None] = field(default=lambda m: m.eval())


def _batches(x, batch_size: int):
    """A tensor -> its chunks; an iterable of x or (x, y) batches (a DataLoader) -> its x batches."""
    if isinstance(x, torch.Tensor):
        yield from (x[i : i + batch_size] for i in range(0, len(x), batch_size))
        return
    for batch in x:
        yield batch[0] if isinstance(batch, tuple | list) else batch


@torch.no_grad()
def predict(model, x, batch_size: int = 256, modes: Modes | None = None, device=None) -> torch.Tensor:
    """Logits (on the CPU) for a tensor of inputs or an iterable of batches (``dataset.eval_batches``)."""
    (modes or Modes()).eval(model)
    on_cpu = device is None or torch.device(device).type == "cpu"
    outs = [model(xb if on_cpu else xb.to(device, non_blocking=True)).float().cpu() for xb in _batches(x, batch_size)]
    return torch.cat(outs)


def accuracy(model, x, y: torch.Tensor | None = None, modes: Modes | None = None, device=None) -> float:
    """Top-1 accuracy on (x, y) tensors, or on an iterable of (x, y) batches when ``y`` is None."""
    if y is None:
        hits = total = 0
        (modes or Modes()).eval(model)
        with torch.no_grad():
            for xb, yb in x:
                out = model(xb if device is None else xb.to(device))
                hits += int((out.argmax(1).cpu() == yb).sum())
                total += len(yb)
        return hits / max(1, total)
    return (predict(model, x, modes=modes, device=device).argmax(1) == y).float().mean().item()


def split_accuracy(model, dataset, split: str, modes: Modes | None = None, device=None) -> float:
    """Top-1 accuracy on a whole split of a dataset, streamed."""
    return accuracy(model, dataset.eval_batches(split, device=device), modes=modes, device=device)


def _to_device(modules, device) -> None:
    for m in modules:
        if m is not None:
            m.to(device)


def fit(
    model: torch.nn.Module,
    dataset,
    *,
    epochs: int,
    lr: float,
    loss_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]],
    train_cfg: TrainConfig | None = None,
    seed: int = 0,
    progress=None,
    description: str = "train",
    penalty_fn: Callable[[torch.nn.Module], torch.Tensor] | None = None,
    penalty_weight: float = 0.0,
    on_epoch_start: Callable[[int], None] | None = None,
    modes: Modes | None = None,
    warmup_epochs: float = 0.0,
    extra_params: list[torch.nn.Parameter] | None = None,
    on_epoch_end: Callable[[dict[str, float]], None] | None = None,
    device=None,
    amp: str = "off",
    modules: list[torch.nn.Module] | tuple = (),
    checkpoint=None,
    checkpoint_tag: str = "",
) -> list[dict[str, float]]:
    """Train ``model`` in place; return one history row per epoch (mean loss terms, val accuracy, lr).

    ``extra_params`` are trained beside the model's (e.g. KD adapters that are not part of the model).
    ``on_epoch_start(epoch)`` may return a mapping (e.g. the scheduled KD temperature), logged in that
    epoch's row; ``on_epoch_end(row)`` sees each finished row (e.g. its ``val_loss``).
    ``device`` (None = cpu) is where the model, ``modules`` (teachers, KD adapters) and batches go
    for the run; everything is moved back to the CPU at the end (export runs on onnxruntime there).
    ``amp`` (bf16 | fp16 | off) is torch.autocast on CUDA. Epoch e's batches depend only on (seed, e).
    ``checkpoint`` (hwkd.checkpoint.StageCheckpoint) gets the full training state at the end of each
    epoch, and a saved state with the same ``checkpoint_tag`` is continued from (exactly, since epoch
    e's batches depend on (seed, e) only). A NaN/inf loss raises DivergedError before the bad step.
    """
    cfg = train_cfg or TrainConfig()
    modes = modes or Modes()
    dev = torch.device(device or "cpu")
    cuda = dev.type == "cuda"
    _to_device([model, *modules], dev)
    if cuda:
        with contextlib.suppress(Exception):  # exported (QAT) graphs may not take a memory format
            model.to(memory_format=torch.channels_last)
    loader = dataset.loader("train", train=True, augment=cfg.augment, batch_size=cfg.batch_size, seed=seed, device=dev)
    n_batches = max(1, len(loader))
    total = epochs * n_batches
    # --- resume (issue 12): weights go back before the optimizer and penalty see the parameters --------
    saved = checkpoint.resume_point(checkpoint_tag) if checkpoint is not None else None
    if saved is not None:
        _restore_weights(model, extra_params, saved)
    net = distributed.wrap(model, dev)  # DDP under torchrun (issue 12), else the model itself
    params = [p for p in model.parameters() if p.requires_grad] + list(extra_params or [])
    # Weight decay on conv/linear weights only: decaying BN scales and biases hurts small models.
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        momentum=0.9,
        nesterov=True,
    )
    scaler = accel.grad_scaler(dev, amp)
    history: list[dict[str, float]] = []
    step = start_epoch = 0
    if saved is not None:
        start_epoch, step, history = _restore_training(saved, opt, scaler, penalty_fn, on_epoch_end)
    task = progress.task(description, total) if progress else contextlib.nullcontext(lambda n=1, **kw: None)
    try:
        with task as advance:
            if start_epoch:
                advance(start_epoch * n_batches)
            for epoch in range(start_epoch, epochs):
                set_epoch(loader, epoch)  # the shuffle and augmentations of epoch e depend on (seed, e) only
                logged = on_epoch_start(epoch) if on_epoch_start else None
                modes.train(model)
                sums: dict[str, float] = {}
                seen = 0
                for xb, yb in loader:
                    if dev.type != "cpu":
                        fmt = torch.channels_last if cuda and xb.ndim == 4 else torch.preserve_format
                        xb = xb.to(dev, non_blocking=True, memory_format=fmt)
                        yb = yb.to(dev, non_blocking=True)
                    for group in opt.param_groups:
                        group["lr"] = lr_at(step, total, lr, int(warmup_epochs * n_batches))
                    with accel.autocast(dev, amp):
                        terms = loss_fn(net, xb, yb)
                        loss = terms["loss"]
                        if penalty_fn is not None and penalty_weight > 0:
                            penalty = penalty_fn(model)
                            terms = {**terms, "penalty": penalty}
                            loss = loss + penalty_weight * penalty
                    if distributed.any_rank(not torch.isfinite(loss.detach()), dev):  # before the step reaches the weights
                        raise _diverged(description, float(loss.detach()), epoch, step, opt, checkpoint)
                    opt.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()  # no-op scaling unless fp16 on CUDA
                    distributed.average_gradients(extra_params or [])  # DDP averages only the model's
                    if cfg.grad_clip:
                        scaler.unscale_(opt)
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    scaler.step(opt)
                    scaler.update()
                    if penalty_fn is not None and penalty_weight > 0 and hasattr(penalty_fn, "after_step"):
                        penalty_fn.after_step(model)  # e.g. the mask target holds its channels at zero
                    step += 1
                    for name, value in terms.items():
                        sums[name] = sums.get(name, 0.0) + float(value.detach()) * len(xb)
                    seen += len(xb)
                    advance(1, loss=float(loss.detach()))
                row = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], **(logged or {})}
                row.update({k: v / max(1, seen) for k, v in sums.items()})
                val_logits = predict(model, dataset.eval_batches("val", device=dev), modes=modes, device=dev)
                y_val = dataset.targets("val")
                row["val_accuracy"] = (val_logits.argmax(1) == y_val).float().mean().item()
                row["val_loss"] = torch.nn.functional.cross_entropy(val_logits, y_val).item()
                history.append(row)
                if on_epoch_end:
                    on_epoch_end(row)
                if checkpoint is not None:
                    _save_epoch(checkpoint, checkpoint_tag, epoch + 1, step, model, extra_params, opt, scaler,
                                penalty_fn, history)  # fmt: skip
    finally:
        if cuda:
            with contextlib.suppress(Exception):
                model.to(memory_format=torch.contiguous_format)
        _to_device([model, *modules], "cpu")  # export, estimate and bench run on the CPU
    modes.eval(model)
    return history


# --- checkpoint / resume / divergence helpers of fit (issue 12) -------------------------------------------


def _restore_weights(model, extra_params, saved) -> None:
    """Copy saved weights in place (the penalty and KD adapters hold references to these tensors)."""
    model.load_state_dict(saved["model"]["state_dict"])
    with torch.no_grad():
        for p, v in zip(extra_params or [], saved.get("extra_params", []), strict=True):
            p.copy_(v)


def _restore_training(saved, opt, scaler, penalty_fn, on_epoch_end):
    """Optimizer, AMP scaler, RNG, penalty and schedule state; returns (start epoch, step, history)."""
    from hwkd.checkpoint import set_rng_state

    opt.load_state_dict(saved["optimizer"])
    if saved.get("scaler") and hasattr(scaler, "load_state_dict"):
        scaler.load_state_dict(saved["scaler"])
    set_rng_state(saved["rng"])
    if saved.get("penalty") is not None and hasattr(penalty_fn, "load_state_dict"):
        penalty_fn.load_state_dict(saved["penalty"])
    history = [dict(row) for row in saved["history"]]
    for row in history:  # schedule state (e.g. the adaptive temperature's val losses) replays from history
        if on_epoch_end:
            on_epoch_end(row)
    return int(saved["epoch"]), int(saved["step"]), history


def _save_epoch(checkpoint, tag, epoch, step, model, extra_params, opt, scaler, penalty_fn, history) -> None:
    from hwkd.checkpoint import model_payload, rng_state

    checkpoint.save(
        tag,
        epoch=epoch,
        step=step,
        model=model_payload(model),
        extra_params=[p.detach().cpu().clone() for p in extra_params or []],
        optimizer=opt.state_dict(),
        scaler=scaler.state_dict() if hasattr(scaler, "state_dict") and scaler.is_enabled() else None,
        rng=rng_state(),
        penalty=penalty_fn.state_dict() if hasattr(penalty_fn, "state_dict") else None,
        history=history,
    )


def _diverged(description, value, epoch, step, opt, checkpoint):
    from hwkd.errors import DivergedError

    lr = opt.param_groups[0]["lr"]
    kept = (
        f"the checkpoint of the last good epoch ({epoch}) is kept in {checkpoint.path}"
        if checkpoint is not None and epoch > 0
        else "no epoch of this stage had finished, so it restarts from its beginning"
    )
    return DivergedError(
        f"Training diverged in {description}: the loss became {value} at epoch {epoch + 1}, step {step + 1} "
        f"(learning rate {lr:.3g}); {kept}.",
        "Resume with a lower learning rate (or a smaller train.grad_clip).",
        epoch=epoch,
        step=step,
        lr=lr,
    )


def distill_loss_fn(kd_loss, teachers: list[torch.nn.Module], weights: list[float]):
    """Wrap a KD loss into ``loss_fn(model, xb, yb)``; teachers run without gradients, in eval mode."""

    def loss_fn(model, xb, yb):
        logits = model(xb)
        teacher_logits = []
        if kd_loss.needs_teacher:
            with torch.no_grad():
                teacher_logits = [t(xb) for t in teachers]
        return kd_loss(logits, teacher_logits, weights, yb)

    return loss_fn
