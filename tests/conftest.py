"""Shared fixtures: tiny in-memory datasets and models, an isolated teacher cache."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "2")
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's ~/.cache/hwkd; one cache per test session so a teacher trains once."""
    cache = os.environ.get("HWKD_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "hwkd-cache")
    monkeypatch.setenv("HWKD_CACHE", cache)


def make_tiny_dataset(n_per_class: int = 12, classes: int = 3, size: int = 8, channels: int = 1, seed: int = 0):
    """A learnable toy dataset: each class is a different stripe pattern (position-free), plus noise."""
    g = torch.Generator().manual_seed(seed)
    i = torch.arange(size)
    patterns = [
        (i[:, None] % 2 == 0).float().expand(size, size),  # horizontal stripes
        (i[None, :] % 2 == 0).float().expand(size, size),  # vertical stripes
        ((i[:, None] + i[None, :]) % 2 == 0).float(),  # checkerboard
        torch.ones(size, size),
    ]
    xs, ys = [], []
    for c in range(classes):
        x = torch.randn(n_per_class, channels, size, size, generator=g) * 0.3 + 2.0 * patterns[c % len(patterns)]
        xs.append(x)
        ys.append(torch.full((n_per_class,), c, dtype=torch.long))
    x, y = torch.cat(xs), torch.cat(ys)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    n = len(x)
    a, b = int(0.6 * n), int(0.8 * n)
    from hwkd.data import Dataset

    splits = {"train": (x[:a], y[:a]), "val": (x[a:b], y[a:b]), "test": (x[b:], y[b:])}
    return Dataset.from_tensors("tiny", splits, [str(i) for i in range(classes)])


def split_tensors(dataset, split: str):
    """(x, y) of a whole (small) split, for assertions; hwkd itself never materialises a split."""
    batches = list(dataset.eval_batches(split))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


@pytest.fixture
def tiny_dataset():
    return make_tiny_dataset()


def calibrated_int8(model, shape, family="arm", tmp_path=None, batches=3, filename="int8.onnx"):
    """``model`` (inputs of ``shape`` without the batch) quantized as the qat stage does, observers fed random
    batches instead of training, and exported as the export stage does: (converted model, ONNX path)."""
    from hwkd.onnx import export as ox
    from hwkd.stages import qat

    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(8, *shape))
    model.eval()
    prepared, _ = qat.prepare_qat(model, torch.randn(2, *shape), family)
    with torch.no_grad():
        for _ in range(batches):
            prepared(torch.randn(8, *shape))
    converted = qat.convert(prepared)
    path = ox.export_onnx(converted, torch.randn(2, *shape), tmp_path / filename, {})
    return converted, path
