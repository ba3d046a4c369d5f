"""Error tree. Every HwkdError is a user-facing problem: the CLI prints its message and exits 2.

A message says what is wrong and how to fix it, in one paragraph, so nobody needs a traceback.
"""

from __future__ import annotations


class HwkdError(Exception):
    """Bad input or usage: printed as one paragraph, exit code 2."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if not fix else f"{problem} {fix}")


class ConfigError(HwkdError):
    """A recipe, flag or config value is malformed."""


class ProfileError(HwkdError):
    """A device profile is unknown, unreadable or invalid."""


class BudgetError(HwkdError):
    """A latency or memory budget cannot be parsed or is not positive."""


class DataError(HwkdError):
    """A dataset is missing, empty, single-class or does not fit the model."""


class ModelError(HwkdError):
    """A model or checkpoint file is missing, corrupt or not the expected kind."""


class StageError(HwkdError):
    """A stage could not do its job on this input (e.g. ONNX parity broke); names the stage."""


class DivergedError(HwkdError):
    """A training loss became NaN or inf: the stage stopped, its last good epoch checkpoint is kept.

    Exit code 3 (not 2: the input was valid, the optimisation blew up), so scripts can retry with a
    lower learning rate via ``hwkd compress --resume RUN_DIR --set STAGE.lr=...``.
    """

    exit_code = 3

    def __init__(self, problem: str, fix: str | None = None, *, epoch: int = 0, step: int = 0, lr: float = 0.0):
        super().__init__(problem, fix)
        self.epoch, self.step, self.lr = epoch, step, lr
