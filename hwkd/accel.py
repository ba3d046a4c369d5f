"""Where training runs: ``--device auto|cpu|cuda|cuda:N|mps`` checked up front, and ``--amp``.

Only training (teachers, student, penalty, QAT fake-quant) moves to the device; export, estimate and
bench stay on onnxruntime on the CPU, so models go back to the CPU after each training run.
"""

from __future__ import annotations

import contextlib

from hwkd.errors import ConfigError

AMP_MODES = ("off", "bf16", "fp16")


def resolve_device(spec: str | None):
    """``auto`` -> cuda if available, else cpu (mps only when asked: its operator coverage is partial).

    Any other device that is not usable here is a ConfigError naming what this host has.
    """
    import torch

    text = str(spec or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ConfigError(
            f"--device {spec!r} is not a device.", "Use auto, cpu, cuda, cuda:N (a GPU index) or mps."
        ) from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"--device {spec} asks for a CUDA GPU but torch sees none on this host "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}).",
                "Use --device cpu (or auto), or install a CUDA build of torch on a host with an NVIDIA GPU.",
            )
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"--device {spec} asks for GPU {device.index} but this host has {count} (cuda:0..cuda:{count - 1}).",
                "Pick an existing index, or check CUDA_VISIBLE_DEVICES.",
            )
        return device
    if device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError("--device mps asks for Apple's Metal GPU, which is not available here.", "Use --device cpu.")
        return device
    raise ConfigError(f"--device {spec!r} is not supported.", "Use auto, cpu, cuda, cuda:N or mps.")


def check_amp(amp: str, device) -> str:
    """``--amp`` must be off, bf16 or fp16, and mixed precision needs CUDA."""
    import torch

    if amp not in AMP_MODES:
        raise ConfigError(f"--amp {amp!r} is not one of {', '.join(AMP_MODES)}.")
    device = torch.device(device)
    if amp != "off" and device.type != "cuda":
        raise ConfigError(
            f"--amp {amp} needs a CUDA device, but training runs on {device}.",
            "Use --amp off on the CPU (it is the default), or --device cuda.",
        )
    if amp == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("--amp bf16 needs a GPU with bfloat16 support (Ampere or newer).", "Use --amp fp16.")
    return amp


def autocast(device, amp: str):
    """``torch.autocast`` for the forward pass and loss; a no-op context when amp is off."""
    import torch

    if amp == "off" or torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def grad_scaler(device, amp: str):
    """A GradScaler for fp16 (bf16 and fp32 need none); disabled otherwise, so one code path serves all."""
    import torch

    return torch.amp.GradScaler("cuda", enabled=amp == "fp16" and torch.device(device).type == "cuda")
