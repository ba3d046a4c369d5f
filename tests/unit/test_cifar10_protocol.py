"""The CIFAR-10 benchmark's fixed pieces: the zoo ResNet-20 teacher and the committed seeded split."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from hwkd.models.loaders import load_teacher
from hwkd.models.zoo import ZOO

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import cifar10_split as split  # noqa: E402


def test_resnet20_is_the_cifar_resnet20():
    model = ZOO.get("resnet20")(10, 3).eval()
    assert sum(p.numel() for p in model.parameters()) == 272_474  # He et al.: 0.27M
    assert [len(stage) for stage in model.stages] == [3, 3, 3]
    assert model.stem[0].kernel_size == (3, 3) and model.stem[0].stride == (1, 1)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_resnet20_state_dict_loads_with_teacher_arch(tmp_path):
    src = ZOO.get("resnet20")(10, 3)
    torch.save(src.state_dict(), tmp_path / "t.pt")
    model, spec = load_teacher(str(tmp_path / "t.pt"), "resnet20", 10, 3, trust_code=False)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(model(x), src.eval()(x))
    assert spec["name"] == "resnet20"


def _folder(root: Path, classes: int = 3, per_class: int = 10) -> Path:
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            (root / f"c{c}" / f"{i:04d}.jpg").write_bytes(b"x")
    return root


def test_split_is_seeded_stratified_and_disjoint(tmp_path, monkeypatch):
    monkeypatch.setattr(split, "PER_CLASS", {"val": 2, "test": 3})
    data = _folder(tmp_path / "data")
    a, b = split.make_split(data), split.make_split(data)
    assert a == b
    assert split.make_split(data, seed=1) != a
    assert {k: len(v) for k, v in a.items()} == {"train": 15, "val": 6, "test": 9}
    assert set(Counter(p.split("/")[0] for p in a["val"]).values()) == {2}
    assert not (set(a["train"]) & set(a["val"])) and not (set(a["val"]) & set(a["test"]))
    out = split.materialise(data, tmp_path / "split", a)
    assert len(list((out / "test").rglob("*.jpg"))) == 9
    assert (out / "val" / a["val"][0]).resolve() == (data / a["val"][0]).resolve()


def test_committed_split_lists_are_the_protocol():
    val = (split.RESULTS / "split_val.txt").read_text().split()
    test = (split.RESULTS / "split_test.txt").read_text().split()
    assert len(val) == len(test) == 2500 and not set(val) & set(test)
    assert set(Counter(p.split("/")[0] for p in val + test).values()) == {500}
    manifest = split.json.loads((split.RESULTS / "split.json").read_text())
    assert manifest["sha256_16"]["val"] == split.digest(val)
    assert manifest["sha256_16"]["test"] == split.digest(test)


@pytest.mark.skipif(not Path("/work/shared/data/cifar10/train").is_dir(), reason="CIFAR-10 folder not here")
def test_committed_split_applies_to_the_public_folder():
    lists = split.read_lists(Path("/work/shared/data/cifar10/train"))
    manifest = split.json.loads((split.RESULTS / "split.json").read_text())
    assert {k: split.digest(v) for k, v in lists.items()} == manifest["sha256_16"]
