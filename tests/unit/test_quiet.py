"""The torchao KernelPreference pytree deprecation record is dropped; every other record still shows."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

from hwkd.quiet import PYTREE_LOGGER, quiet_torchao_import

ROOT = Path(__file__).resolve().parents[2]
MESSAGE = (
    "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type. Calling "
    "register_constant() on Enum subclasses is deprecated and will be an error in a future release."
)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_filter_drops_only_the_kernel_preference_record():
    quiet_torchao_import()
    quiet_torchao_import()  # idempotent
    logger = logging.getLogger(PYTREE_LOGGER)
    assert sum(type(f).__name__ == "_KernelPreferenceFilter" for f in logger.filters) == 1
    handler = _Collect()
    logger.addHandler(handler)
    try:
        logger.warning(MESSAGE, "<enum 'KernelPreference'>")
        logger.warning(MESSAGE, "<enum 'SomeoneElsesEnum'>")
        logger.warning("an unrelated pytree warning")
    finally:
        logger.removeHandler(handler)
    assert not any("KernelPreference" in m for m in handler.messages)
    assert any("SomeoneElsesEnum" in m for m in handler.messages)
    assert "an unrelated pytree warning" in handler.messages


def _import_torchao(quiet: bool) -> str:
    code = ("from hwkd.quiet import quiet_torchao_import; quiet_torchao_import()\n" if quiet else "") + (
        "import torch, torchao\nfrom torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def test_importing_torchao_after_the_filter_prints_no_kernel_preference_warning():
    import pytest

    if "KernelPreference" not in _import_torchao(quiet=False):
        pytest.skip("this torch/torchao pair does not log the KernelPreference deprecation")
    assert "KernelPreference" not in _import_torchao(quiet=True)
