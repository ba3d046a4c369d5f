"""The five stages, in pipeline order. Each is a module with ``run(state, cfg, ctx)``."""

from __future__ import annotations

import importlib

from hwkd.config import STAGE_ORDER


def get_stage(name: str):
    """Import a stage's ``run`` lazily, so the CLI stays fast and unused stages cost nothing."""
    if name not in STAGE_ORDER:
        from hwkd.errors import ConfigError

        raise ConfigError(f"Unknown stage {name!r}.", f"Stages are: {', '.join(STAGE_ORDER)}.")
    return importlib.import_module(f"hwkd.stages.{name}").run
