"""Per-epoch training checkpoints and the fingerprints that let a run be resumed safely.

Every training loop (distill, prune recovery, qat) saves ``stages/<stage>/last.pt`` atomically at the
end of each epoch: model weights, optimizer, step, RNG states, the epoch history (schedule state such as
the adaptive temperature is a function of it), the budget penalty's state, the stage's seconds so far and
whatever the stage adds (``stage_state``: e.g. the prune step and the rows before it). A killed run loses at
most one epoch.

Example::

    ckpt = StageCheckpoint(run_dir / "stages" / "distill" / "last.pt")
    fit(model, data, ..., checkpoint=ckpt, checkpoint_tag="distill")
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

from hwkd.artifacts import model_structure, torch_load, torch_save
from hwkd.errors import ModelError

FORMAT = "hwkd.epoch/1"


class StageCheckpoint:
    """``stages/<stage>/last.pt``: the state after the last complete epoch of one stage.

    ``saved`` is what a resumed run found on disk when the stage started (None on a fresh run); a fit
    call continues from it only when its ``checkpoint_tag`` matches (a prune stage runs one fit per step).
    """

    def __init__(self, path: str | os.PathLike, saved: dict[str, Any] | None = None):
        self.path = Path(path)
        self.saved = saved
        self.stage_state: dict[str, Any] = {}  # set by the stage; saved with every epoch
        self._opened = time.perf_counter()  # the stage's clock in this launch (opened as the stage starts)

    @classmethod
    def load(cls, path: str | os.PathLike) -> StageCheckpoint:
        """The checkpoint at ``path`` with what it holds (none yet: ``saved`` is None)."""
        path = Path(path)
        if not path.is_file():
            return cls(path)
        saved = torch_load(path, "epoch checkpoint")
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise ModelError(f"{str(path)!r} is not an hwkd epoch checkpoint.", "Delete it to restart that stage.")
        return cls(path, saved)

    @property
    def saved_stage_state(self) -> dict[str, Any]:
        return dict(self.saved.get("stage_state") or {}) if self.saved else {}

    @property
    def earlier_seconds(self) -> float:
        """The stage's time in the launches before this one (0 on a fresh run), saved with every epoch so
        that a resumed stage reports what it really took, not only its last launch's part."""
        return float(self.saved.get("stage_seconds", 0.0)) if self.saved else 0.0

    def resume_point(self, tag: str) -> dict[str, Any] | None:
        """The saved fit state for ``tag``, or None (fresh run, or the checkpoint is from another fit)."""
        if self.saved is not None and self.saved.get("tag") == tag:
            return self.saved
        return None

    def save(self, tag: str, **state: Any) -> Path:
        """Write one epoch's state atomically (a crash mid-write leaves the previous epoch's file)."""
        from hwkd.distributed import is_main

        if not is_main():  # under torchrun only rank 0 writes; every rank holds the same state
            return self.path
        seconds = self.earlier_seconds + time.perf_counter() - self._opened
        payload = {"format": FORMAT, "tag": tag, **state, "stage_state": self.stage_state, "stage_seconds": seconds}
        return torch_save(self.path, payload)


def model_payload(model) -> dict[str, Any]:
    """Structure (channel counts, so a pruned model can be rebuilt) and weights of ``model``."""
    return {
        "structure": model_structure(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }


def rng_state(generator=None) -> dict[str, Any]:
    """Every RNG training can touch, as plain tensors / lists (loadable with weights_only=True)."""
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "python": _to_lists(random.getstate()),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def set_rng_state(state: dict[str, Any], generator=None) -> None:
    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), *rest))
    random.setstate(_to_tuples(state["python"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def _to_lists(obj):
    return [_to_lists(v) for v in obj] if isinstance(obj, tuple | list) else obj


def _to_tuples(obj):
    return tuple(_to_tuples(v) for v in obj) if isinstance(obj, list) else obj


# --- fingerprints: what a resumed run must find unchanged -----------------------------------------------


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def folder_fingerprint(root: str | os.PathLike) -> str:
    """``<timed>:<untimed>``: hashes of every file's relative path and size, with and without its mtime.
    Cheap on big image folders (no file is read) and catches edits; the untimed half tells a folder copied
    or re-synced with new file times (same names and sizes) from one whose files changed."""
    root = Path(root)
    timed, untimed = hashlib.sha256(), hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        st = path.stat()
        entry = f"{path.relative_to(root)}\0{st.st_size}"
        timed.update(f"{entry}\0{st.st_mtime_ns}\n".encode())
        untimed.update(f"{entry}\n".encode())
    return f"{timed.hexdigest()}:{untimed.hexdigest()}"


def compare_fingerprints(saved: str | None, now: str | None) -> str:
    """``"same"``, ``"times"`` (a folder whose files kept their names and sizes but not their times) or
    ``"differs"``. A fingerprint saved before the untimed half existed compares on the timed half alone."""
    if saved == now:
        return "same"
    if not (saved and now and saved.startswith("tree:") and now.startswith("tree:")):
        return "differs"
    old, new = saved[5:].split(":"), now[5:].split(":")
    if old[0] == new[0]:
        return "same"
    return "times" if len(old) == len(new) == 2 and old[1] == new[1] else "differs"


def path_fingerprint(source: str | None) -> str | None:
    """Fingerprint of an input named on the command line, or None when it is not a local path."""
    if not source:
        return None
    path = Path(str(source)).expanduser()
    if path.is_file():
        return "sha256:" + file_sha256(path)
    if path.is_dir():
        return "tree:" + folder_fingerprint(path)
    return None  # zoo names, module:factory, "digits", width multipliers


def weights_fingerprint(models) -> str:
    """Hash of the teachers' weights (the built-in teacher has no file to hash)."""
    h = hashlib.sha256()
    for model in models:
        for key, tensor in sorted(model.state_dict().items()):
            h.update(key.encode())
            h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def config_sha256(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=list).encode()).hexdigest()
