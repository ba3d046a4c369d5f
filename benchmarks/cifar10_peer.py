"""The peer pipeline a user would assemble from the libraries, called as their docs show.

1. torch-pruning's uniform magnitude pruning of the user's model (the teacher): ``MagnitudePruner`` with
   ``MagnitudeImportance()`` (L2), one ``pruning_ratio`` for every layer (``global_pruning=False``), the
   classifier ignored, everything else at its documented default;
2. the ratio is the smallest on a grid (steps of 0.05) whose INT8 model is no slower, *measured* on this
   host in the same interleaved onnxruntime rounds, than hwkd's final model at that budget;
3. fine-tuned with plain cross-entropy for as many epochs as hwkd trained (distill + prune recovery +
   QAT), with hwkd.train.fit's optimizer (SGD nesterov, weight decay on weights) and a cosine LR;
4. ``torch.onnx.export`` (dynamo), onnxruntime ``quant_pre_process`` then ``quantize_static`` with its
   defaults (QDQ, per-tensor INT8 weights and activations, MinMax) on 256 training images.
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from hwkd.train import lr_at

GRID = tuple(round(0.05 * i, 2) for i in range(20))  # 0.0 .. 0.95 (the full protocol's grid)
CALIBRATION_IMAGES = 256


def prune_uniform(model: torch.nn.Module, ratio: float, example: torch.Tensor) -> torch.nn.Module:
    """A pruned copy of ``model``: torch-pruning MagnitudePruner, the same ratio in every layer."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    if ratio <= 0:
        return model
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    pruner = tp.pruner.MagnitudePruner(model, example, importance=tp.importance.MagnitudeImportance(),
                                       pruning_ratio=ratio, ignored_layers=head)  # fmt: skip
    pruner.step()
    return model


def export_int8(model: torch.nn.Module, example: torch.Tensor, calibration: np.ndarray, out: Path) -> Path:
    """FP32 ONNX via torch.onnx.export, then onnxruntime's quant_pre_process + quantize_static defaults."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    out.parent.mkdir(parents=True, exist_ok=True)
    fp32, pre = out.with_suffix(".fp32.onnx"), out.with_suffix(".pre.onnx")
    model.eval()
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
        torch.onnx.export(model, (example,), str(fp32), dynamo=True, input_names=["input"],
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}})  # fmt: skip
    quant_pre_process(str(fp32), str(pre))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter({"input": calibration[i : i + 32]} for i in range(0, len(calibration), 32))

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(pre), str(out), Reader())
    pre.unlink(missing_ok=True)
    return out


def onnx_accuracy(path: Path, data, batch_size: int = 500) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    correct = n = 0
    for x, y in DataLoader(data, batch_size=batch_size):
        pred = sess.run(None, {name: x.numpy()})[0].argmax(1)
        correct += int((pred == y.numpy()).sum())
        n += len(y)
    return correct / n


def latency_grid(teacher, example, calibration, work: Path, targets: dict[str, Path], rounds: int = 5,
                 grid: tuple[float, ...] = GRID, runs_per_round: int = 500, threads: int = 1) -> dict:
    """Export the uniformly pruned teacher at every ``grid`` ratio (INT8) and time them with the targets,
    interleaved, at ``threads``; return ``{"grid": {ratio: p50}, "targets": {name: p50}}`` in ms (batch 1, this
    host). Until stop 40: 20 runs a round at every core, enough to rank 0.2 ms from 0.9 ms, not for the grid's
    neighbours (its 0.20 and 0.25 points swapped places between timings)."""
    from hwkd.onnx import bench

    paths = {}
    for r in grid:
        paths[r] = export_int8(prune_uniform(teacher, r, example), example, calibration[:32], work / f"grid_{r:.2f}.onnx")
    stats = bench.measure([*paths.values(), *targets.values()], iterations=runs_per_round * rounds, warmup=10,
                          rounds=rounds, threads=threads)  # fmt: skip
    return {"grid": {r: stats[p].p50 for r, p in paths.items()},
            "targets": {k: stats[p].p50 for k, p in targets.items()}}  # fmt: skip


def match_ratio(grid: dict[float, float], target_ms: float) -> float:
    """The least pruning whose measured INT8 latency is at or below ``target_ms``; when no grid point
    reaches it, the fastest one (not the most pruned: a few-channel ResNet can time slower in INT8)."""
    ok = [r for r, ms in sorted(grid.items()) if ms <= target_ms]
    return ok[0] if ok else min(grid, key=grid.get)


def fine_tune(model, train_set, *, epochs: int, lr: float = 0.02, batch_size: int = 128, seed: int = 0,
              weight_decay: float = 5e-4) -> list[dict]:  # fmt: skip
    """Plain cross-entropy fine-tuning (what a user does after pruning); returns per-epoch losses.

    ``seed`` fixes the shuffle and the augmentation (the train transforms draw from torch's global RNG;
    before stop 19 only the shuffle was seeded, and three runs of the same recipe scored 50.4-54.2%)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(train_set, batch_size=batch_size, shuffle=True, drop_last=True, generator=gen)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD([{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
                           {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}],
                          lr=lr, momentum=0.9, nesterov=True)  # fmt: skip
    total, step, history = epochs * len(loader), 0, []
    for epoch in range(epochs):
        model.train()
        t0, loss_sum, seen = time.time(), 0.0, 0
        for x, y in loader:
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, lr)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += loss.item() * len(y)
            seen += len(y)
        history.append({"epoch": epoch + 1, "loss": loss_sum / max(1, seen), "seconds": round(time.time() - t0, 1)})
    model.eval()
    return history


def calibration_images(train_set, count: int = CALIBRATION_IMAGES, seed: int = 0) -> np.ndarray:
    """``count`` fixed training images, preprocessed without augmentation (float32 NCHW)."""
    idx = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(seed))[:count]
    return np.stack([train_set[int(i)][0].numpy() for i in idx]).astype(np.float32)


def params_and_macs(model, example) -> tuple[int, int]:
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model.eval(), example)
    return int(params), int(macs)


__all__ = ["GRID", "prune_uniform", "export_int8", "onnx_accuracy", "latency_grid", "match_ratio", "fine_tune",
           "calibration_images", "params_and_macs"]
