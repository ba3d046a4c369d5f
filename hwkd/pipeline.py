"""Runs the chosen stages in order, checkpoints after each, and records what each did.

A stage is ``run(state, cfg, ctx) -> (state, StageResult)``. Stages never print: they report through
``ctx.progress`` and ``ctx.log``, and the CLI renders.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("hwkd")


@dataclass
class PipelineState:
    """What flows between stages. Stages return a new state (dataclasses.replace) rather than mutate."""

    student: Any  # nn.Module, the current FP32 student
    student_spec: dict[str, Any]  # how to rebuild its unpruned architecture (see artifacts.save_model)
    teachers: list[Any]  # nn.Modules in eval mode
    teacher_weights: list[float]
    dataset: Any  # hwkd.data.Dataset
    profile: Any  # hwkd.hardware.profiles.Profile
    budget: Any  # hwkd.hardware.profiles.Budget (resolved, absolute)
    kd: Any = None  # hwkd.kd.losses.KDLoss used by distill and by prune recovery
    quantized: Any = None  # torchao-converted INT8 GraphModule, after qat
    quant_method: str | None = None  # qat | ptq | auto, set by the qat stage; None = no INT8 requested
    reduce_range: bool = False  # 7-bit INT8 weights (hosts without VNNI); the PTQ peer follows it
    onnx: dict[str, Path] = field(default_factory=dict)  # "teacher", "<stage>", "fp32", "int8" -> file
    checkpoints: dict[str, Path] = field(default_factory=dict)  # stage -> hwkd model checkpoint
    channels: dict[str, dict[str, int]] = field(default_factory=dict)  # snapshot -> layer -> out channels

    @property
    def example_input(self):
        return self.dataset.example_input()


@dataclass
class StageResult:
    name: str
    metrics: dict[str, Any] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)  # label -> path relative to the run dir
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per epoch / step
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "seconds": round(self.seconds, 2),
            **self.metrics,
            "artifacts": self.artifacts,
            "history": self.history,
        }


class Progress:
    """Progress reporting interface; the default does nothing (library use), the CLI draws rich bars."""

    @contextlib.contextmanager
    def task(self, description: str, total: int) -> Iterator[Callable[..., None]]:
        """Yield ``advance(n=1, **fields)``; fields (loss, acc) may be shown beside the bar."""
        yield lambda n=1, **fields: None


@dataclass
class RunContext:
    run_dir: Path
    device: str = "cpu"  # where training runs (hwkd.accel.resolve_device); export and bench stay on the CPU
    amp: str = "off"
    seed: int = 0
    log: logging.Logger = log
    progress: Progress = field(default_factory=Progress)
    train: Any = None  # hwkd.config.TrainConfig shared by every training stage (None -> defaults)

    def stage_dir(self, stage: str) -> Path:
        path = self.run_dir / "stages" / stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def rel(self, path: Path) -> str:
        return str(Path(path).relative_to(self.run_dir))


StageFn = Callable[[PipelineState, Any, RunContext], tuple[PipelineState, StageResult]]


def run_stages(
    state: PipelineState,
    stages: list[tuple[str, StageFn, Any]],
    ctx: RunContext,
    on_stage_done: Callable[[StageResult, PipelineState], None] | None = None,
) -> tuple[PipelineState, list[StageResult]]:
    """Run ``(name, fn, cfg)`` stages in order; time each; call ``on_stage_done(result, state)`` after each."""
    results: list[StageResult] = []
    for name, fn, cfg in stages:
        ctx.log.info("stage %s: start", name)
        t0 = time.perf_counter()
        state, result = fn(state, cfg, ctx)
        result.seconds = time.perf_counter() - t0
        ctx.log.info("stage %s: done in %.1fs", name, result.seconds)
        results.append(result)
        if on_stage_done is not None:
            on_stage_done(result, state)
    return state, results
