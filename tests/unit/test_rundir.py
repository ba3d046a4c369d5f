"""What a resumed run must find unchanged: config (learning rates may change), inputs, file contents."""

from __future__ import annotations

import pytest

from hwkd.config import PipelineConfig
from hwkd.errors import ConfigError
from hwkd.onnx.ptq import VARIANTS
from hwkd.rundir import check_resume_overrides, check_same_inputs, clear_run_dir, input_fingerprints

SAVED = PipelineConfig().to_dict()


def test_learning_rates_may_change_on_resume():
    check_resume_overrides(SAVED, {"distill": {"lr": 0.01}, "prune": {"lr": 0.001}, "qat": {"lr": 1e-4}})


@pytest.mark.parametrize(("over", "needle"), [({"distill": {"epochs": 99}}, "distill.epochs (14 -> 99)"),
                                              ({"seed": 1}, "seed (0 -> 1)"),
                                              ({"stages": ["distill"]}, "stages")])  # fmt: skip
def test_any_other_change_is_refused_by_name(over, needle):
    with pytest.raises(ConfigError, match="Only learning rates") as info:
        check_resume_overrides(SAVED, over)
    assert needle in str(info.value)


def test_inputs_given_again_must_match():
    manifest = {"inputs": {"profile": "rpi4", "profile_source": "/p/rpi4.toml", "data": "a.npz", "teacher": ["t.pt"]}}
    check_same_inputs(manifest, {"profile": "rpi4", "data": "a.npz", "teacher": ["t.pt"], "student": None})
    check_same_inputs(manifest, {"profile": "/p/rpi4.toml"})
    with pytest.raises(ConfigError, match="--data 'b.npz' differs"):
        check_same_inputs(manifest, {"data": "b.npz"})
    with pytest.raises(ConfigError, match="--teacher"):
        check_same_inputs(manifest, {"teacher": ["u.pt"]})


def test_fingerprints_follow_file_content(tmp_path):
    data = tmp_path / "d.npz"
    data.write_bytes(b"one")
    folder = tmp_path / "imgs"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "1.png").write_bytes(b"x")
    first = input_fingerprints({"data": str(data), "teacher": [str(folder)], "student": "0.5x"}, None)
    assert first["student"] is None and first["profile"] is None and first["data"].startswith("sha256:")
    data.write_bytes(b"two")
    (folder / "cat" / "2.png").write_bytes(b"y")
    second = input_fingerprints({"data": str(data), "teacher": [str(folder)]}, None)
    assert second["data"] != first["data"] and second["teacher[0]"] != first["teacher[0]"]


def test_clear_run_dir_removes_every_ptq_variant_and_the_stage_dirs(tmp_path):
    names = ["model.onnx", "model_fp32.onnx", "model_qat.onnx", *(f"model_{v}.onnx" for v in VARIANTS)]
    assert "model_ptq_u8s8.onnx" in names and "model_ptq_tuned.onnx" in names
    for name in names:
        (tmp_path / name).write_bytes(b"old run")
    (tmp_path / "stages" / "distill").mkdir(parents=True)
    (tmp_path / "notes.txt").write_text("the user's own file")
    clear_run_dir(tmp_path)
    assert [n for n in names if (tmp_path / n).exists()] == []
    assert not (tmp_path / "stages").exists()
    assert (tmp_path / "notes.txt").read_text() == "the user's own file"


def test_a_folder_copied_with_new_file_times_is_told_from_an_edited_one(tmp_path):
    """Data re-synced or restored from a backup keeps names and sizes but not times: resume may go on (with a
    warning); a file added, removed, renamed or resized is a changed input."""
    import os

    from hwkd.checkpoint import compare_fingerprints, path_fingerprint

    folder = tmp_path / "imgs"
    (folder / "cat").mkdir(parents=True)
    (folder / "cat" / "1.png").write_bytes(b"xx")
    first = path_fingerprint(str(folder))
    assert compare_fingerprints(first, path_fingerprint(str(folder))) == "same"
    os.utime(folder / "cat" / "1.png", ns=(1, 1))
    touched = path_fingerprint(str(folder))
    assert touched != first and compare_fingerprints(first, touched) == "times"
    (folder / "cat" / "1.png").write_bytes(b"xyz")
    assert compare_fingerprints(first, path_fingerprint(str(folder))) == "differs"
    (folder / "cat" / "1.png").write_bytes(b"xx")
    (folder / "cat" / "2.png").write_bytes(b"y")
    assert compare_fingerprints(first, path_fingerprint(str(folder))) == "differs"
    # A manifest written before the untimed half existed: its timed half alone decides.
    old = first.rsplit(":", 1)[0]
    assert compare_fingerprints(old, first) == "same" and compare_fingerprints(old, touched) == "differs"
    assert compare_fingerprints("sha256:a", "sha256:b") == "differs"
