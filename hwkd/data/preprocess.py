"""The one preprocessing that makes every tensor hwkd trains, evaluates and calibrates on.

``Preprocessing`` is the contract with deployment: it is written into the exported ONNX model's
metadata (``hwkd.preprocessing``), and a deployer reproduces the inputs from it alone:

    raw pixels -> resize -> center crop -> x * scale -> channel order -> (x - mean) / std

``resolve_preprocessing`` decides it from the user's flags / ``[data]`` recipe section, the teacher's
architecture (torchvision / timm document their normalisation) and, failing both, statistics fitted on
the training split (said loudly: a user's own teacher was probably trained with other values).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hwkd.errors import ConfigError

log = logging.getLogger("hwkd")

INTERPOLATIONS = ("nearest", "bilinear", "bicubic")
CHANNEL_ORDERS = ("rgb", "bgr")
RESIZE_MODES = ("exact", "shorter")
# data.augment: auto = affine for digits / .npz, crop_flip for image folders (docs/decisions-issue10-data.md)
AUGMENTATIONS = ("auto", "affine", "crop_flip", "pad_crop_flip", "none")
_ALIGN_MODES = ("linear", "bilinear", "bicubic", "trilinear")
# torchvision's documented normalisation for every ImageNet classification weight
# (https://pytorch.org/vision/stable/models.html): resize 256 (232 for some), center crop 224, these.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """raw pixels -> resize -> center crop -> ``x * scale`` -> channel order -> ``(x - mean) / std``.

    ``resize_mode`` "exact" resizes to ``resize`` = (H, W); "shorter" resizes the shorter side to
    ``resize[0]`` keeping the aspect ratio (torchvision's ``Resize(int)``), then ``crop`` (H, W) is cut
    from the center. ``antialias`` says whether downscaling low-pass filters first (PIL-like; image
    files) or not (``torch.nn.functional.interpolate``, the in-memory arrays). ``channel_order`` "bgr"
    reverses the (RGB) channels before normalising, for teachers trained on OpenCV-loaded images.
    """

    scale: float
    resize: tuple[int, int]  # (H, W); with resize_mode "shorter" both hold the shorter side
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_mode: str = "exact"
    crop: tuple[int, int] | None = None  # (H, W) center crop after the resize
    channel_order: str = "rgb"
    antialias: bool = False

    @property
    def output_size(self) -> tuple[int, int]:
        return self.crop if self.crop is not None else self.resize

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return d | {"resize": list(self.resize), "crop": list(self.crop) if self.crop else None}

    def to_json(self) -> str:
        return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in self.to_dict().items()})

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        d = json.loads(text)
        crop = d.get("crop")
        return cls(
            scale=float(d["scale"]),
            resize=(int(d["resize"][0]), int(d["resize"][1])),
            interpolation=str(d["interpolation"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            resize_mode=str(d.get("resize_mode", "exact")),
            crop=(int(crop[0]), int(crop[1])) if crop else None,
            channel_order=str(d.get("channel_order", "rgb")),
            antialias=bool(d.get("antialias", False)),
        )

    def summary(self) -> str:
        """One line for messages: what the teacher was fed."""
        size = f"resize {self.resize[0]}x{self.resize[1]}" if self.resize_mode == "exact" else f"resize {self.resize[0]}"
        crop = f", crop {self.crop[0]}x{self.crop[1]}" if self.crop else ""
        mean = ",".join(f"{v:.4g}" for v in self.mean)
        std = ",".join(f"{v:.4g}" for v in self.std)
        return f"{size}{crop} ({self.interpolation}), x*{self.scale:.4g}, {self.channel_order}, mean {mean}, std {std}"

    # --- geometry --------------------------------------------------------------------------------

    def resized_hw(self, h: int, w: int) -> tuple[int, int]:
        if self.resize_mode == "exact":
            return self.resize
        short = self.resize[0]
        if h <= w:
            return short, max(1, int(short * w / h))
        return max(1, int(short * h / w)), short

    def geometry(self, img: torch.Tensor) -> torch.Tensor:
        """Resize + center crop one CHW image (uint8 or float), as torchvision.transforms.v2 does."""
        InterpolationMode, TF = vision()

        mode = InterpolationMode(self.interpolation)
        hw = self.resized_hw(int(img.shape[-2]), int(img.shape[-1]))
        if tuple(img.shape[-2:]) != tuple(hw):
            img = TF.resize(img, list(hw), interpolation=mode, antialias=self.antialias)
        if self.crop is not None:
            img = TF.center_crop(img, list(self.crop))
        return img

    # --- values ----------------------------------------------------------------------------------

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """A batch at the output size (any dtype, NCHW) -> float32 ``(x * scale - mean) / std``."""
        x = x.to(torch.float32) * self.scale
        if self.channel_order == "bgr":
            x = x.flip(1)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return ((x - mean) / std).contiguous()

    def apply(self, raw: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Preprocess a batch of same-size raw images, NCHW or NHW (one channel), into float32 NCHW.

        Without antialias / crop (digits, .npz): one float ``interpolate`` of the whole batch; else
        ``geometry`` per image in the input's dtype (uint8 for image files, as the loader does it).
        """
        x = torch.as_tensor(np.asarray(raw) if not isinstance(raw, torch.Tensor) else raw)
        if x.dtype != torch.uint8:
            x = x.to(torch.float32)
        if x.ndim == 3:
            x = x[:, None]
        if x.ndim != 4:
            raise ValueError(f"expected NCHW or NHW raw images, got shape {tuple(x.shape)}")
        if x.shape[1] != len(self.mean):
            raise ValueError(f"expected {len(self.mean)} channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        hw = self.resized_hw(int(x.shape[2]), int(x.shape[3]))
        if self.antialias or self.resize_mode != "exact" or self.crop is not None:
            x = torch.stack([self.geometry(im) for im in x]) if len(x) else x
        elif tuple(x.shape[2:]) != tuple(hw) or x.dtype != torch.uint8:
            kwargs = {"align_corners": False} if self.interpolation in _ALIGN_MODES else {}
            x = F.interpolate(x.float(), size=tuple(hw), mode=self.interpolation, antialias=False, **kwargs)
        # scale is linear, so applying it after the resize equals the documented order
        return self.normalize(x)


def vision():
    """(InterpolationMode, transforms.v2.functional), or a DataError naming the optional extra."""
    try:
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF
    except Exception as exc:  # ImportError, or a torchvision built for another torch
        from hwkd.errors import DataError

        raise DataError(
            f"Image folders, resizing with --crop and natural-image augmentation need torchvision, which "
            f"cannot be imported here ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}).",
            "Install the vision extra: pip install hwkd[vision] (the embedded digits and .npz data work without it).",
        ) from exc
    return InterpolationMode, TF


# --- defaults from the teacher's architecture ----------------------------------------------------


def arch_normalization(arch: str | None) -> dict[str, Any] | None:
    """Documented normalisation of a ``torchvision:NAME`` / ``timm:NAME`` architecture, else None.

    Only mean/std (and timm's interpolation) are taken, never the 224 px input size: the user's
    weights were trained on their own data at their own resolution (a 32 px CIFAR ResNet-18 must not
    be resized to 224). Resolution comes from the data or ``--resize`` / ``--crop``.
    """
    if not arch or ":" not in arch:
        return None
    kind, name = arch.split(":", 1)
    kind = kind.strip().lower()
    if kind == "torchvision":
        return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "source": f"torchvision's ImageNet normalisation ({name})"}
    if kind == "timm":
        try:
            import timm
        except ImportError:
            return None  # the model loader names the missing extra
        cfg = None
        try:
            cfg = timm.models.get_pretrained_cfg(name)
        except Exception:  # unknown name: the model loader reports it
            cfg = None
        if cfg is None:
            try:
                from timm.data import resolve_data_config

                cfg_dict = resolve_data_config({}, model=timm.create_model(name, pretrained=False))
            except Exception:
                return None
        else:
            cfg_dict = cfg.to_dict()
        return {
            "mean": tuple(float(v) for v in cfg_dict["mean"]),
            "std": tuple(float(v) for v in cfg_dict["std"]),
            "interpolation": cfg_dict.get("interpolation") or "bilinear",
            "source": f"timm's pretrained_cfg of {name}",
        }
    return None


def parse_floats(text: str | tuple | list | None, flag: str) -> tuple[float, ...]:
    """``"0.485,0.456,0.406"`` (or a list) -> floats; None/empty -> ()."""
    if text is None or text == "" or text == ():
        return ()
    try:
        values = tuple(float(v) for v in (text.split(",") if isinstance(text, str) else text))
    except (TypeError, ValueError):
        raise ConfigError(
            f"{flag} {text!r} is not a comma-separated list of numbers.",
            f"Example: {flag} 0.485,0.456,0.406 (one value per channel, or one for all).",
        ) from None
    return values


def check_data_config(cfg) -> None:
    """Reject bad ``[data]`` values before anything is loaded."""
    if cfg.interpolation and cfg.interpolation not in INTERPOLATIONS:
        raise ConfigError(
            f"--interpolation {cfg.interpolation!r} is not one of {', '.join(INTERPOLATIONS)}.",
            "Use the interpolation the teacher was trained with (torchvision's default is bilinear).",
        )
    if cfg.channel_order not in CHANNEL_ORDERS:
        raise ConfigError(
            f"--channel-order {cfg.channel_order!r} is not rgb or bgr.",
            "bgr is for teachers trained on images loaded with OpenCV.",
        )
    for name, value in (("--resize", cfg.resize), ("--crop", cfg.crop)):
        if value < 0:
            raise ConfigError(f"{name} must be a positive number of pixels, got {value}.")
    if cfg.resize and cfg.crop and cfg.crop > cfg.resize:
        raise ConfigError(
            f"--crop {cfg.crop} is larger than --resize {cfg.resize}.",
            "The center crop is cut from the resized image: e.g. --resize 256 --crop 224.",
        )
    if bool(cfg.mean) != bool(cfg.std):
        raise ConfigError(
            "--mean and --std go together: give both or neither.",
            "Example: --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225",
        )
    if any(s <= 0 for s in cfg.std):
        raise ConfigError(f"--std values must be positive, got {','.join(map(str, cfg.std))}.")
    if cfg.augment not in AUGMENTATIONS:
        raise ConfigError(f"data.augment {cfg.augment!r} is not one of {', '.join(AUGMENTATIONS)}.")


def geometry_from(cfg, image_size: int | None, default: tuple[int, int]) -> dict[str, Any]:
    """resize / resize_mode / crop from ``--resize`` / ``--crop`` / ``--image-size`` and the source default."""
    if image_size is not None and cfg.resize and int(image_size) != cfg.resize:
        raise ConfigError(
            f"--image-size {image_size} and --resize {cfg.resize} disagree.",
            "--image-size N is the same as --resize N; give one of them.",
        )
    resize = cfg.resize or (int(image_size) if image_size is not None else 0)
    if cfg.crop:
        # torchvision's eval recipe: shorter side to `resize`, then a center crop (a square crop alone
        # when no resize is given).
        short = resize or cfg.crop
        return {"resize": (short, short), "resize_mode": "shorter", "crop": (cfg.crop, cfg.crop)}
    if resize:
        return {"resize": (resize, resize), "resize_mode": "exact", "crop": None}
    return {"resize": tuple(default), "resize_mode": "exact", "crop": None}


def stated_normalization(cfg, channels: int, arch: str | None) -> tuple[tuple, tuple, str, str | None] | None:
    """(mean, std, where, interpolation) from the flags or the teacher's architecture; None = fit them."""
    if cfg.mean:
        mean, std = _per_channel(cfg.mean, channels, "--mean"), _per_channel(cfg.std, channels, "--std")
        return mean, std, "stated (--mean/--std or [data])", None
    norm = arch_normalization(arch)
    if norm is None:
        return None
    if len(norm["mean"]) != channels:
        log.warning(
            "the teacher architecture %s documents %d-channel normalisation but the data has %d channel(s); "
            "fitting mean/std on the training split instead",
            arch,
            len(norm["mean"]),
            channels,
        )
        return None
    return tuple(norm["mean"]), tuple(norm["std"]), norm["source"], norm.get("interpolation")


def _per_channel(values: tuple[float, ...], channels: int, flag: str) -> tuple[float, ...]:
    if len(values) == 1:
        return values * channels
    if len(values) != channels:
        raise ConfigError(
            f"{flag} has {len(values)} values but the data has {channels} channel(s).",
            f"Give one value per channel ({channels}), or one value for all.",
        )
    return tuple(values)


def rounded(values) -> tuple[float, ...]:
    """Rounded so the JSON metadata is readable; the rounded values are the ones actually applied."""
    return tuple(float(f"{float(v):.6g}") for v in values)
