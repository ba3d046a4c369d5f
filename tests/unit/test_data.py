"""Datasets: splits, the one preprocessing recipe, image folders, .npz, errors, augmentation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from hwkd.data import Dataset, Preprocessing, check_compatible, load_dataset, random_affine
from hwkd.data.dataset import MIN_PER_CLASS, split_indices
from hwkd.data.digits import load_digits_raw
from hwkd.errors import DataError
from hwkd.models.zoo import ZOO
from tests.conftest import split_tensors

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return load_dataset(None, seed=0)


# --- digits -----------------------------------------------------------------------------------------


def test_digits_shapes_and_split_sizes(digits):
    assert digits.name == "digits"
    assert digits.input_shape == (1, 32, 32) and digits.num_classes == 10
    assert digits.labels == [str(i) for i in range(10)]
    sizes = tuple(digits.split_size(k) for k in ("train", "val", "test"))
    assert sum(sizes) == 1797 and sizes == (1257, 270, 270)
    for split in ("train", "val", "test"):
        x, y = split_tensors(digits, split)
        assert x.dtype == torch.float32 and x.shape[1:] == (1, 32, 32) and y.dtype == torch.int64
    assert {k: v for k, v in digits.summary().items() if k != "notes"} == {
        "name": "digits",
        "train": 1257,
        "val": 270,
        "test": 270,
        "input_shape": [1, 32, 32],
        "num_classes": 10,
        "augment": "affine",
    }
    # normalized with train statistics
    x_train = split_tensors(digits, "train")[0]
    assert abs(x_train.mean().item()) < 1e-3 and abs(x_train.std().item() - 1) < 1e-3


def test_digits_split_is_stratified(digits):
    total = np.bincount(load_digits_raw().y, minlength=10)
    for y, frac in ((digits.targets("train"), 0.70), (digits.targets("val"), 0.15), (digits.targets("test"), 0.15)):
        counts = np.bincount(y.numpy(), minlength=10)
        assert np.all(np.abs(counts - frac * total) <= 1.5)


def test_digits_split_is_deterministic_by_seed(digits):
    again = load_dataset("digits", seed=0)
    assert torch.equal(split_tensors(again, "val")[0], split_tensors(digits, "val")[0])
    assert torch.equal(again.targets("test"), digits.targets("test"))
    other = load_dataset("digits", seed=1)
    assert not torch.equal(other.targets("val"), digits.targets("val"))
    assert other.preprocessing.resize == digits.preprocessing.resize


def test_preprocessing_apply_reproduces_stored_tensors(digits):
    raw = load_digits_raw()
    train, val, test = split_indices(raw.y, 0, "digits")
    prep = Preprocessing.from_json(digits.preprocessing.to_json())
    assert prep == digits.preprocessing
    for idx, split in ((train, "train"), (val, "val"), (test, "test")):
        assert torch.equal(prep.apply(raw.images[idx]), split_tensors(digits, split)[0])
    # what an external script does with the JSON metadata alone, on NHW raw pixels
    meta = json.loads(digits.preprocessing.to_json())
    assert meta["scale"] == 1 / 16 and meta["resize"] == [32, 32] and meta["interpolation"] == "bilinear"
    x = torch.tensor(raw.images[val][:, 0]).unsqueeze(1) * meta["scale"]
    x = F.interpolate(x, size=meta["resize"], mode=meta["interpolation"], align_corners=False)
    x = (x - torch.tensor(meta["mean"]).view(1, -1, 1, 1)) / torch.tensor(meta["std"]).view(1, -1, 1, 1)
    assert torch.equal(x, split_tensors(digits, "val")[0])


def test_digits_image_size(digits):
    ds = load_dataset(None, image_size=16)
    assert ds.input_shape == (1, 16, 16) and ds.preprocessing.resize == (16, 16)
    assert torch.equal(ds.targets("val"), digits.targets("val"))


# --- image folders and npz --------------------------------------------------------------------------


def _write_images(root, classes=("cat", "dog"), per_class=MIN_PER_CLASS, mode="RGB", sizes=((12, 10),)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            w, h = sizes[i % len(sizes)]
            shape = (h, w, 3) if mode == "RGB" else (h, w)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")
    return root


def test_image_folder_rgb(tmp_path):
    root = _write_images(tmp_path / "imgs", sizes=((12, 10), (9, 14)))
    ds = load_dataset(str(root))
    assert ds.name == "imgs" and ds.labels == ["cat", "dog"]
    assert ds.input_shape == (3, 32, 32) and len(ds.preprocessing.mean) == 3
    assert sum(ds.split_size(k) for k in ("train", "val", "test")) == 2 * MIN_PER_CLASS
    assert set(ds.targets("val").tolist()) == {0, 1} and set(ds.targets("test").tolist()) == {0, 1}
    x, _ = split_tensors(ds, "train")
    assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32
    assert ds.preprocessing.scale == pytest.approx(1 / 255)


def test_image_folder_grayscale_and_mixed(tmp_path):
    gray = load_dataset(str(_write_images(tmp_path / "g", mode="L")), image_size=16)
    assert gray.input_shape == (1, 16, 16)
    # one RGB image among grayscale ones makes the whole dataset RGB
    root = _write_images(tmp_path / "m", mode="L")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(root / "cat" / "red.png")
    assert load_dataset(str(root), image_size=8).input_shape == (3, 8, 8)


def test_image_folder_preprocessing_matches_tensors(tmp_path):
    root = _write_images(tmp_path / "g", mode="L", per_class=10, sizes=((12, 12),))
    ds = load_dataset(str(root), image_size=16)
    labels = np.array([0] * 10 + [1] * 10)
    raw = np.stack(
        [
            np.asarray(Image.open(root / c / f"{i}.png"), dtype=np.float32)
            for c in ("cat", "dog")
            for i in range(10)
        ]
    )
    _, val, _ = split_indices(labels, 0, "g")
    # image files are resized per image as uint8 (antialiased, as PIL does), then normalised per batch
    assert ds.preprocessing.antialias
    expected = ds.preprocessing.apply(raw[val].astype(np.uint8))
    torch.testing.assert_close(split_tensors(ds, "val")[0], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layout", ["NHWC", "NCHW", "NHW"])
def test_npz_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    n, c = 30, 1 if layout == "NHW" else 3
    x = rng.integers(0, 256, (n, 6, 6, c) if layout == "NHWC" else (n, c, 6, 6), dtype=np.uint8)
    if layout == "NHW":
        x = x[:, 0]
    y = np.repeat([0, 1, 2], 10)
    path = tmp_path / "d.npz"
    np.savez(path, x=x, y=y, labels=np.array(["a", "b", "c"]))
    ds = load_dataset(str(path))
    assert ds.input_shape == (c, 6, 6)  # npz keeps its native size by default
    assert ds.labels == ["a", "b", "c"] and ds.num_classes == 3
    assert ds.preprocessing.scale == pytest.approx(1 / 255)
    assert load_dataset(str(path), image_size=12).input_shape == (c, 12, 12)


def test_npz_string_labels_and_float_pixels(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.random.rand(21, 5, 5).astype(np.float32), y=np.array(["z", "y", "x"] * 7))
    ds = load_dataset(str(path))
    assert ds.labels == ["x", "y", "z"] and ds.preprocessing.scale == 1.0


# --- errors -----------------------------------------------------------------------------------------


def _assert_data_error(source, *fragments, **kwargs):
    with pytest.raises(DataError) as info:
        load_dataset(str(source), **kwargs)
    msg = str(info.value)
    for fragment in (str(source), *fragments):
        assert fragment in msg, (fragment, msg)


def test_error_missing_path(tmp_path):
    _assert_data_error(tmp_path / "missing", "does not exist")


def test_error_empty_folder(tmp_path):
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    _assert_data_error(tmp_path / "empty", "no images")


def test_error_images_without_class_folders(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    Image.new("L", (4, 4)).save(root / "a.png")
    _assert_data_error(root, "no class subfolders")


def test_error_single_class(tmp_path):
    _assert_data_error(_write_images(tmp_path / "one", classes=("cat",)), "single class")


def test_error_unreadable_image(tmp_path):
    root = _write_images(tmp_path / "bad")
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    _assert_data_error(root, "broken.png", "Cannot read the image file")


def test_error_too_few_per_class(tmp_path):
    _assert_data_error(_write_images(tmp_path / "few", per_class=2), "only 2", f"at least {MIN_PER_CLASS}")


def test_error_unsupported_suffix(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("1,2\n")
    _assert_data_error(path, "unsupported", ".csv")


def test_error_npz_missing_key_and_mismatch(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=np.zeros((4, 3, 3)), y=np.zeros(4))
    _assert_data_error(path, "no array 'x'", "images")
    np.savez(path, x=np.zeros((4, 3, 3)), y=np.zeros(5))
    _assert_data_error(path, "4 examples")
    np.savez(path, x=np.zeros((4, 3, 3, 3, 3)), y=np.zeros(4))
    _assert_data_error(path, "shape")
    path.write_bytes(b"garbage")
    _assert_data_error(path, "Cannot read")


def test_error_npz_labels_out_of_range(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x=np.zeros((14, 3, 3)), y=np.repeat([0, 5], 7), labels=np.array(["a", "b"]))
    _assert_data_error(path, "0..5", "2 classes")


# --- compatibility ----------------------------------------------------------------------------------


def test_check_compatible(digits):
    model = ZOO.get("cnn")(10, 1)
    model.train()
    before = model.features[0][1].running_mean.clone()
    check_compatible(model, digits)
    assert model.training  # mode restored
    assert torch.equal(model.features[0][1].running_mean, before)  # BN statistics untouched

    with pytest.raises(DataError, match=r"\(1, 32, 32\).*--image-size"):
        check_compatible(ZOO.get("cnn")(10, 3), digits)
    with pytest.raises(DataError, match=r"\(2, 7\).*10 classes"):
        check_compatible(ZOO.get("cnn")(7, 1), digits)
    with pytest.raises(DataError, match="tuple"):
        check_compatible(_TupleModel(), digits)


class _TupleModel(nn.Module):
    def forward(self, x):
        return x.flatten(1)[:, :10], x


# --- augmentation and batching ----------------------------------------------------------------------


def test_random_affine(digits):
    x = digits.sample("train", 16)[0]
    out = random_affine(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.allclose(out, x)
    assert (out - x).abs().mean() < x.abs().mean()  # perturbs, does not destroy
    again = random_affine(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    # no-op settings give back the input (up to interpolation rounding)
    same = random_affine(x, torch.Generator(), degrees=0, translate=0, scale=(1.0, 1.0))
    torch.testing.assert_close(same, x, atol=1e-5, rtol=0)
