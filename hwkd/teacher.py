"""The built-in teacher: trained on first use, cached on disk keyed by everything that shapes it.

A second run with the same data and settings loads the cached weights instead of training again.
The cache lives in ``$HWKD_CACHE`` (default ``~/.cache/hwkd``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from hwkd.artifacts import load_model, save_model
from hwkd.config import TeacherConfig, TrainConfig
from hwkd.kd.losses import make_kd_loss
from hwkd.models.loaders import build_from_spec
from hwkd.train import distill_loss_fn, fit, split_accuracy


def cache_dir() -> Path:
    return Path(os.environ.get("HWKD_CACHE") or Path.home() / ".cache" / "hwkd")


def dataset_fingerprint(dataset) -> str:
    return dataset.fingerprint()


def zoo_code_fingerprint() -> str:
    """Hash of the zoo's source: a change to an architecture must not reuse weights trained on the old one."""
    from hwkd.models import zoo

    return hashlib.sha256(Path(zoo.__file__).read_bytes()).hexdigest()[:16]


def teacher_key(spec: dict, dataset, seed: int, cfg: TeacherConfig, train_cfg: TrainConfig) -> str:
    payload = {
        "spec": spec,
        "zoo_code": zoo_code_fingerprint(),
        "data": dataset_fingerprint(dataset),
        "epochs": cfg.epochs,
        "lr": cfg.lr,
        "seed": seed,
        "train": train_cfg.__dict__,
        "torch": torch.__version__.split("+")[0],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:20]


def builtin_teacher(
    dataset, seed: int, cfg: TeacherConfig, train_cfg: TrainConfig, progress=None, log=None, device=None, amp="off"
):
    """Return (teacher, spec, info); trains and caches it the first time for this data and config."""
    c, _, _ = dataset.input_shape
    spec = {
        "kind": "zoo",
        "name": cfg.arch,
        "kwargs": {"num_classes": dataset.num_classes, "in_channels": c, "width": 1.0},
    }
    key = teacher_key(spec, dataset, seed, cfg, train_cfg)
    path = cache_dir() / "teachers" / f"{cfg.arch}-{key}.pt"
    if path.is_file():
        model, spec, extra = load_model(path, build_from_spec)
        model.eval()
        return model, spec, {"cached": True, "cache_path": str(path), **extra}
    torch.manual_seed(seed)
    model = build_from_spec(spec)
    history = fit(
        model,
        dataset,
        epochs=cfg.epochs,
        lr=cfg.lr,
        loss_fn=distill_loss_fn(make_kd_loss("none", 1.0, 0.0), [], []),
        train_cfg=train_cfg,
        seed=seed,
        progress=progress,
        description="train built-in teacher (first use, then cached)",
        warmup_epochs=1,
        device=device,
        amp=amp,
    )
    extra = {"val_accuracy": split_accuracy(model, dataset, "val"), "epochs": cfg.epochs}
    save_model(path, model, spec, extra={**extra, "history": history})
    if log:
        log.info("built-in teacher cached at %s", path)
    return model.eval(), spec, {"cached": False, "cache_path": str(path), **extra}
