"""The lazy dataset: image folders decoded per batch, train/val layouts, (seed, epoch) determinism,
the stated preprocessing, the weak-teacher check and device validation."""

from __future__ import annotations

import dataclasses
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from hwkd import accel
from hwkd.config import DataConfig, PipelineConfig
from hwkd.data import Preprocessing, load_dataset, set_epoch
from hwkd.data import sources as sources_mod
from hwkd.data.checks import check_teachers
from hwkd.errors import ConfigError, DataError
from tests.conftest import split_tensors

torch.set_num_threads(2)


def _folder(root, classes=("cat", "dog"), per_class=8, size=(12, 10), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            shape = (size[0], size[1], 3) if mode == "RGB" else size
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")
    return root


def _epoch_labels(loader, epoch):
    set_epoch(loader, epoch)
    return [b[1].tolist() for b in loader], [b[0] for b in loader]


# --- laziness ---------------------------------------------------------------------------------------


def test_image_folder_is_read_lazily(tmp_path, monkeypatch):
    root = _folder(tmp_path / "imgs", per_class=20)
    reads = []
    real = sources_mod.read_image
    monkeypatch.setattr("hwkd.data.dataset.read_image", lambda p, m: reads.append(p) or real(p, m))
    ds = load_dataset(str(root), data_cfg=DataConfig(stats_images=5))
    assert len(reads) == 5  # only the images the mean/std are fitted on
    tensors = [v for v in vars(ds).values() if isinstance(v, torch.Tensor)]
    assert tensors == []  # no split is held as a tensor
    assert ds.source.kind == "files" and ds.source.files.paths.dtype.kind == "S"
    reads.clear()
    xb, yb = next(iter(ds.loader("train", train=True, batch_size=4)))
    assert len(reads) == 4 and xb.shape == (4, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64


def test_train_val_layout_is_used_as_given(tmp_path):
    _folder(tmp_path / "d" / "train", per_class=6)
    _folder(tmp_path / "d" / "val", per_class=3, seed=1)
    ds = load_dataset(str(tmp_path / "d"))
    assert ds.labels == ["cat", "dog"]
    assert (ds.split_size("train"), ds.split_size("val"), ds.split_size("test")) == (12, 6, 6)
    assert any("no test/" in n for n in ds.summary()["notes"])
    _folder(tmp_path / "d" / "test", per_class=2, seed=2)
    ds = load_dataset(str(tmp_path / "d"))
    assert (ds.split_size("train"), ds.split_size("val"), ds.split_size("test")) == (12, 6, 4)
    assert ds.targets("test").tolist() == [0, 0, 1, 1]


def test_train_only_layout_is_split_and_unknown_val_class_is_an_error(tmp_path):
    _folder(tmp_path / "t" / "train", per_class=10)
    ds = load_dataset(str(tmp_path / "t"))
    assert sum(ds.split_size(k) for k in ("train", "val", "test")) == 20 and ds.split_size("val") >= 2
    _folder(tmp_path / "bad" / "train", per_class=3)
    _folder(tmp_path / "bad" / "val", classes=("cat", "cow"), per_class=1)
    with pytest.raises(DataError, match="cow"):
        load_dataset(str(tmp_path / "bad"))


# --- determinism ------------------------------------------------------------------------------------


def test_shuffle_and_augmentation_depend_only_on_seed_and_epoch(tiny_dataset):
    loader = tiny_dataset.loader("train", train=True, batch_size=8, seed=3)
    e0, x0 = _epoch_labels(loader, 0)
    e0_again, x0_again = _epoch_labels(loader, 0)
    e1, _ = _epoch_labels(loader, 1)
    assert e0 == e0_again and all(torch.equal(a, b) for a, b in zip(x0, x0_again, strict=True))
    assert e0 != e1
    # a run resumed at epoch 1 sees what the uninterrupted run saw in its epoch 1
    resumed = tiny_dataset.loader("train", train=True, batch_size=8, seed=3, epoch=1)
    assert [b[1].tolist() for b in resumed] == e1
    other_seed = tiny_dataset.loader("train", train=True, batch_size=8, seed=4)
    assert _epoch_labels(other_seed, 0)[0] != e0
    # every image once per epoch; a last batch of one is dropped (BatchNorm)
    n = tiny_dataset.split_size("train")
    assert sorted(sum(e0, [])) == sorted(tiny_dataset.targets("train").tolist())[: n - (n % 8 == 1)]


def test_file_augmentation_is_the_same_with_workers(tmp_path):
    ds = load_dataset(str(_folder(tmp_path / "w", per_class=12)), image_size=16,
                      data_cfg=dataclasses.replace(DataConfig(), augment="crop_flip"))  # fmt: skip
    assert ds.augment == "crop_flip"
    alone = ds.loader("train", train=True, batch_size=4, seed=1, workers=0)
    pooled = ds.loader("train", train=True, batch_size=4, seed=1, workers=2)
    for epoch in (0, 1):
        a, b = _epoch_labels(alone, epoch), _epoch_labels(pooled, epoch)
        assert a[0] == b[0]
        assert all(torch.equal(p, q) for p, q in zip(a[1], b[1], strict=True))
    plain = torch.cat([b[0] for b in ds.eval_batches("train")])
    augmented = torch.cat(_epoch_labels(alone, 0)[1])
    assert augmented.shape[1:] == plain.shape[1:] == (3, 16, 16)


def test_eval_batches_and_sample(digits_small):
    x, y = split_tensors(digits_small, "val")
    assert torch.equal(y, digits_small.targets("val"))
    xs, ys = digits_small.sample("val", 5, seed=0)
    again = digits_small.sample("val", 5, seed=0)
    assert xs.shape == (5, 1, 16, 16) and torch.equal(xs, again[0]) and torch.equal(ys, again[1])
    assert torch.equal(digits_small.example_input(), x[:1])
    first = next(iter(digits_small.eval_batches("val", batch_size=7, limit=10)))
    assert torch.equal(first[0], x[:7])


@pytest.fixture(scope="module")
def digits_small():
    return load_dataset(None, image_size=16)


# --- preprocessing ----------------------------------------------------------------------------------


def test_stated_mean_std_resize_crop_and_channel_order(tmp_path):
    root = _folder(tmp_path / "p", per_class=8, size=(40, 30))
    cfg = DataConfig(mean=(0.5, 0.4, 0.3), std=(0.2,), resize=20, crop=16, channel_order="bgr", interpolation="bicubic")
    ds = load_dataset(str(root), data_cfg=cfg)
    prep = ds.preprocessing
    assert ds.input_shape == (3, 16, 16)
    assert prep.mean == (0.5, 0.4, 0.3) and prep.std == (0.2, 0.2, 0.2)
    assert (prep.resize_mode, prep.resize, prep.crop, prep.channel_order) == ("shorter", (20, 20), (16, 16), "bgr")
    meta = json.loads(prep.to_json())
    assert meta["crop"] == [16, 16] and meta["interpolation"] == "bicubic" and meta["antialias"] is True
    assert Preprocessing.from_json(prep.to_json()) == prep
    # bgr: channel 0 of the model input is the blue channel of the image
    rgb_cfg = DataConfig(mean=(0.0,), std=(1.0,), resize=20, crop=16, interpolation="bicubic")
    rgb = load_dataset(str(root), data_cfg=rgb_cfg)
    x_bgr, x_rgb = split_tensors(ds, "val")[0], split_tensors(rgb, "val")[0]
    torch.testing.assert_close((x_bgr[:, 0] * 0.2 + 0.5), x_rgb[:, 2], atol=1e-5, rtol=0)


def test_old_metadata_still_reads():
    old = '{"scale": 0.0625, "resize": [32, 32], "interpolation": "bilinear", "mean": [0.3], "std": [0.3]}'
    prep = Preprocessing.from_json(old)
    assert prep.crop is None and prep.channel_order == "rgb" and prep.resize_mode == "exact"


def test_architecture_defaults_and_the_fitted_warning(tmp_path, caplog):
    root = _folder(tmp_path / "a", per_class=8)
    tv = load_dataset(str(root), teacher_arch="torchvision:resnet18", user_teacher=True)
    assert tv.preprocessing.mean == (0.485, 0.456, 0.406) and tv.preprocessing.std == (0.229, 0.224, 0.225)
    assert tv.input_shape == (3, 32, 32)  # the resolution comes from the data, not the ImageNet 224
    timm_ds = load_dataset(str(root), teacher_arch="timm:resnet18")
    assert timm_ds.preprocessing.mean == (0.485, 0.456, 0.406) and timm_ds.preprocessing.interpolation == "bicubic"
    with caplog.at_level(logging.WARNING, logger="hwkd"):
        fitted = load_dataset(str(root), user_teacher=True)
    assert "fitted" in caplog.text and "--mean" in caplog.text
    assert fitted.preprocessing.mean != tv.preprocessing.mean


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        (DataConfig(mean=(0.5,)), "go together"),
        (DataConfig(interpolation="lanczos"), "interpolation"),
        (DataConfig(channel_order="rbg"), "channel-order"),
        (DataConfig(resize=16, crop=32), "larger"),
        (DataConfig(mean=(0.1, 0.2), std=(0.1, 0.2)), "channel"),
    ],
)
def test_bad_preprocessing_is_a_clear_error(cfg, match):
    with pytest.raises(ConfigError, match=match):
        load_dataset(None, data_cfg=cfg)


def test_data_recipe_section_rejects_unknown_keys():
    cfg = PipelineConfig.from_dict({"data": {"mean": [0.5], "std": [0.25], "crop": 28}})
    assert cfg.data.mean == (0.5,) and cfg.data.crop == 28
    with pytest.raises(ConfigError, match="Unknown key 'means'"):
        PipelineConfig.from_dict({"data": {"means": [0.5]}})


# --- the teacher check ------------------------------------------------------------------------------


class _Constant(nn.Module):
    def __init__(self, classes):
        super().__init__()
        self.classes = classes

    def forward(self, x):
        return torch.zeros(len(x), self.classes).index_fill_(1, torch.tensor([0]), 1.0)


def test_weak_teacher_is_an_error_naming_the_preprocessing(digits_small, caplog):
    with pytest.raises(DataError) as info:
        check_teachers([_Constant(10)], ["t.pt"], digits_small)
    msg = str(info.value)
    for fragment in ("'t.pt'", "below 1.5x chance", "preprocessing", "--mean", "--std", "--allow-weak-teacher"):
        assert fragment in msg, (fragment, msg)
    assert info.value.exit_code == 2
    with caplog.at_level(logging.WARNING, logger="hwkd"):
        scores = check_teachers([_Constant(10)], ["t.pt"], digits_small, allow_weak=True, log=logging.getLogger("hwkd"))
    assert scores[0] < 0.15 and "allow-weak-teacher" in caplog.text


# --- devices ----------------------------------------------------------------------------------------


def test_device_validation():
    assert accel.resolve_device("cpu") == torch.device("cpu")
    assert accel.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="not a device"):
        accel.resolve_device("gpu0")
    with pytest.raises(ConfigError, match="amp"):
        accel.check_amp("fp8", "cpu")
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        accel.check_amp("bf16", "cpu")
    assert accel.check_amp("off", "cpu") == "off"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cpu"):
            accel.resolve_device("cuda")
    with pytest.raises(ConfigError, match="GPU 99"):
        if not torch.cuda.is_available():
            raise ConfigError("GPU 99 (no CUDA here)")
        accel.resolve_device("cuda:99")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_fit_on_cuda_trains_and_comes_back_to_the_cpu(tiny_dataset, amp):
    from hwkd.config import TrainConfig
    from hwkd.kd.losses import make_kd_loss
    from hwkd.train import distill_loss_fn, fit

    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 3)).eval()
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    loss_fn = distill_loss_fn(make_kd_loss("hinton", 4.0, 0.5), [teacher], [1.0])
    history = fit(model, tiny_dataset, epochs=2, lr=0.05, loss_fn=loss_fn, train_cfg=TrainConfig(batch_size=8),
                  device="cuda", amp=amp, modules=[teacher])  # fmt: skip
    assert len(history) == 2 and np.isfinite(history[-1]["loss"])
    assert all(p.device.type == "cpu" for m in (model, teacher) for p in m.parameters())


def test_pad_crop_flip_is_the_cifar_recipe(tmp_path):
    """data.augment=pad_crop_flip: the image at the output size, padded by an eighth of its side with black,
    a random crop of the output size and a flip; the same with workers, and the unpadded pixels are the
    image's own (a shift, not a rescale as RandomResizedCrop does)."""
    root = _folder(tmp_path / "p", per_class=12, size=(16, 16))
    ds = load_dataset(str(root), image_size=16, data_cfg=dataclasses.replace(DataConfig(), augment="pad_crop_flip"))
    assert ds.augment == "pad_crop_flip"
    alone = ds.loader("train", train=True, batch_size=4, seed=1, workers=0)
    pooled = ds.loader("train", train=True, batch_size=4, seed=1, workers=2)
    a, b = _epoch_labels(alone, 0), _epoch_labels(pooled, 0)
    assert a[0] == b[0] and all(torch.equal(p, q) for p, q in zip(a[1], b[1], strict=True))
    augmented = torch.cat(a[1])
    assert augmented.shape[1:] == (3, 16, 16)
    black = ds.preprocessing.normalize(torch.zeros(1, 3, 1, 1, dtype=torch.uint8)).flatten()
    border = (augmented == black.view(1, 3, 1, 1)).all(dim=1)  # pixels that are padding in every channel
    assert border.any(), "some crop reaches into the padding"
    assert border.float().mean() <= (1 - (14 / 16) ** 2) + 1e-6  # at most 2 px of padding per side
    # every augmented image, flipped back or not, is the plain image shifted by at most 2 px
    plain = torch.cat([x for x, _ in ds.eval_batches("train")])
    for img in augmented:
        found = False
        for cand in (img, img.flip(-1)):
            for dy in range(-2, 3):
                for dx in range(-2, 3):
                    shifted = torch.roll(cand, (dy, dx), (-2, -1))[:, 2:-2, 2:-2]
                    if any(torch.allclose(shifted, p[:, 2:-2, 2:-2]) for p in plain):
                        found = True
        assert found
    with pytest.raises(ConfigError, match="pad_crop_flip"):
        load_dataset(str(root), image_size=16, data_cfg=dataclasses.replace(DataConfig(), augment="pad"))


def test_auto_augmentation_follows_the_image_size(tmp_path):
    """auto: small images (CIFAR, Tiny ImageNet sizes) get the pad-and-crop recipe, larger ones
    RandomResizedCrop, as the field trains them; the digits keep their affine."""
    root = _folder(tmp_path / "a", per_class=8, size=(16, 16))
    assert load_dataset(str(root), image_size=32).augment == "pad_crop_flip"
    assert load_dataset(str(root), image_size=64).augment == "pad_crop_flip"
    assert load_dataset(str(root), image_size=96).augment == "crop_flip"
    assert load_dataset(str(root), image_size=32).summary()["augment"] == "pad_crop_flip"  # the report says which
    assert load_dataset(None, image_size=16).augment == "affine"


def test_auto_workers_leave_a_core_and_use_more_of_them_when_a_gpu_trains(monkeypatch):
    """CPU training keeps cores for the model (at most 4 decoders); on a GPU the cores only decode (at
    most 8); torchrun's ranks on one host share its cores; in-memory arrays and small folders use none."""
    import os

    from hwkd.data.loading import auto_workers

    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(16)), raising=False)
    assert auto_workers("files", 45_000, 128) == 4
    assert auto_workers("files", 45_000, 128, accelerator=True) == 8
    assert auto_workers("array", 45_000, 128, accelerator=True) == 0
    assert auto_workers("files", 8 * 128 - 1, 128, accelerator=True) == 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 ranks x (3 decoders + 1 trainer) = 16 cores
    assert auto_workers("files", 45_000, 128, accelerator=True) == 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert auto_workers("files", 45_000, 128) == 1  # never 0: a folder is always decoded off the main process
