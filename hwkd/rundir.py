"""The run dir as the state of a run: creating and clearing it, and what a resumed run must find unchanged.

``hwkd.pipeline`` calls these; a resumed run takes its config and inputs from ``manifest.json`` and is
refused, with the difference named, when an input file's content, the config (beyond learning rates)
or an input given again on the command line differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

RUN_ARTIFACTS = ("manifest.json", "report.json", "report.md", "report.html", "model.onnx", "model_fp32.onnx", "teacher.onnx")
RUN_ARTIFACTS += ("model_qat.onnx", "model_fp16.onnx")  # + one model_<variant>.onnx per ORT PTQ variant
# Inputs a resumed run takes from the manifest; given again, they must be the same.
INPUT_KEYS = (
    "profile", "teacher", "teacher_arch", "teacher_weights", "data", "student", "student_weights",
    "image_size", "latency_budget", "memory_budget", "config",
)  # fmt: skip
RESUMABLE = ("running", "interrupted", "failed", "diverged")  # a SIGKILLed run stays "running"


def check_run_dir(out, overwrite: bool) -> Path:
    """The run dir to use; refuse to mix a new run into an old one unless told to. Creates nothing."""
    import datetime as _dt

    from hwkd.errors import ConfigError

    run_dir = Path(out) if out else Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {str(run_dir)!r} exists and is not a directory.", "Choose another --out.")
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise ConfigError(
            f"Run directory {str(run_dir)!r} already exists and is not empty.",
            f"Choose another --out, pass --overwrite to replace its contents, or --resume {run_dir} to "
            "continue it.",
        )
    return run_dir


def clear_run_dir(run_dir: Path) -> None:
    """Create the run dir, removing a previous run's artifacts so none can pass for this run's."""
    import shutil

    from hwkd.onnx.ptq import VARIANTS  # the export stage writes model_<variant>.onnx for each

    run_dir.mkdir(parents=True, exist_ok=True)
    for name in (*RUN_ARTIFACTS, *(f"model_{label}.onnx" for label in VARIANTS)):
        (run_dir / name).unlink(missing_ok=True)
    shutil.rmtree(run_dir / "stages", ignore_errors=True)



def input_fingerprints(inputs: dict[str, Any], profile_source: str | None) -> dict[str, str | None]:
    """Content fingerprints of every file a run reads (profile, teachers, data, student, recipe)."""
    from hwkd.checkpoint import path_fingerprint

    teachers = inputs.get("teacher")
    teachers = [teachers] if isinstance(teachers, str) else list(teachers or [])
    prints = {"profile": path_fingerprint(profile_source)}
    for i, src in enumerate(teachers):
        prints[f"teacher[{i}]"] = path_fingerprint(src)
    for key in ("data", "student", "student_weights", "config"):
        prints[key] = path_fingerprint(inputs.get(key))
    return prints



def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = list(v) if isinstance(v, tuple) else v
    return out


def check_resume_overrides(saved: dict[str, Any], overrides: dict[str, Any]) -> None:
    """On resume only learning rates may change (to continue past a divergence); name any other key."""
    from hwkd.config import merge
    from hwkd.errors import ConfigError

    before, after = _flatten(saved), _flatten(merge(saved, overrides))
    for key in sorted(set(before) | set(after)):
        if before.get(key) != after.get(key) and not key.endswith(".lr"):
            raise ConfigError(
                f"--resume continues a run with the config it started with, but --set would change {key} "
                f"({before.get(key)!r} -> {after.get(key)!r}).",
                "Only learning rates (distill.lr, prune.lr, qat.lr) may change on resume; start a new run "
                "to change anything else.",
            )


def check_same_inputs(manifest: dict[str, Any], given: dict[str, Any]) -> None:
    from hwkd.errors import ConfigError

    saved = manifest["inputs"]
    for key, value in given.items():
        if value is None or key not in INPUT_KEYS:
            continue
        old = saved.get(key)
        same = str(value) == str(old) or (key == "profile" and str(value) == str(saved.get("profile_source")))
        if isinstance(old, list) and not isinstance(value, str):
            same = [str(v) for v in value] == [str(v) for v in old]
        if not same:
            raise ConfigError(
                f"--resume: --{key.replace('_', '-')} {value!r} differs from the run's ({old!r}).",
                "Leave it out: a resumed run uses the inputs recorded in its manifest.",
            )


