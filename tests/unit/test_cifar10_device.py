"""The CIFAR-10 benchmark's ``--device``: where its own training loops run (the teacher script, the kd and
plateau steps) and what it hands to ``hwkd compress``; and the teacher script's resumption across sessions.
The CUDA test runs only where torch sees a GPU."""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import cifar10  # noqa: E402
import cifar10_kd as kd  # noqa: E402
import cifar10_teacher  # noqa: E402

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a GPU, so --device cuda is valid")


def test_hwkd_compress_gets_the_device_only_when_one_is_asked_for(tmp_path, monkeypatch):
    """Without --device the command is the one earlier runs were made (and are reused or resumed) with."""
    rep = {"teacher": {"accuracy": 0.9}, "final": {"accuracy": 0.8, "precision": "int8"}, "stages": []}
    cmds = []

    def fake_run(cmd, **k):
        cmds.append(cmd)
        return types.SimpleNamespace(returncode=0, stdout=json.dumps(rep), stderr="")

    monkeypatch.setattr(cifar10.subprocess, "run", fake_run)
    monkeypatch.setattr(cifar10, "source_state", lambda: "abc1234")
    for device in (None, "cuda:1"):
        args = argparse.Namespace(threads=1, reuse_runs=False, device=device)
        cifar10.hwkd_compress(args, cifar10.PROTOCOLS["full"], tmp_path, tmp_path / "t.pt", "rpi4", tmp_path / "run")
    assert "--device" not in cmds[0]
    assert cmds[1][cmds[1].index("--device") + 1] == "cuda:1"


def test_the_plateau_step_trains_on_the_chosen_device(tmp_path, monkeypatch):
    monkeypatch.setattr(cifar10, "load_sets", lambda split: {"train": [], "val": [], "test": []})
    monkeypatch.setattr(cifar10, "load_teacher", lambda pt: None)
    monkeypatch.setattr(cifar10, "save", lambda args, out: None)
    devices = []

    def fake_run_seed(*a, methods, device, **k):
        devices.append(device)
        return {n: {"test_accuracy": 0.8, "history": [{"val_accuracy": 0.5}], "augmentation_rng": "own", "wall_s": 1.0}
                for n in methods}  # fmt: skip

    monkeypatch.setattr(kd, "run_seed", fake_run_seed)
    args = argparse.Namespace(plateau_epochs=2, plateau_methods="dkd", runs=tmp_path, quick=False,
                              train_device=torch.device("meta"))  # fmt: skip
    cifar10.step_plateau(args, {**cifar10.PROTOCOLS["full"], "plateau_seeds": [0]}, tmp_path, tmp_path / "t.pt", {})
    assert devices == [torch.device("meta")]
    assert cifar10.training_device(argparse.Namespace()).type == ("cuda" if torch.cuda.is_available() else "cpu")


@no_cuda
def test_a_gpu_this_host_lacks_is_a_one_paragraph_error_with_exit_code_2(tmp_path, monkeypatch, capsys):
    for module, argv in ((cifar10, ["--data", str(tmp_path), "--work", str(tmp_path / "work")]),
                         (cifar10_teacher, ["--split", str(tmp_path), "--out", str(tmp_path / "t")])):  # fmt: skip
        monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv, "--device", "cuda"])
        with pytest.raises(SystemExit) as exit_:
            module.main()
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "--device cuda asks for a CUDA GPU but torch sees none" in err and "Traceback" not in err
    assert not (tmp_path / "work").exists() and not (tmp_path / "t").exists()  # checked before anything is made


def _images(folder: Path, per_class: int) -> None:
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(per_class):
            image = torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8)
            (folder / c / f"{i}.jpg").write_bytes(encode_jpeg(image).numpy().tobytes())


def test_the_teacher_script_trains_resumes_and_records_where_each_epoch_ran(tmp_path, monkeypatch):
    """The script the converged teacher resumes under: one epoch, then a resume that re-plans to two."""
    _images(tmp_path / "split" / "train", 64)  # one batch of 128
    _images(tmp_path / "split" / "val", 2)
    base = ["cifar10_teacher.py", "--split", str(tmp_path / "split"), "--out", str(tmp_path / "t"), "--device", "cpu"]
    monkeypatch.setattr(sys, "argv", [*base, "--epochs", "1"])
    cifar10_teacher.main()
    monkeypatch.setattr(sys, "argv", [*base, "--epochs", "2", "--resume", "--workers", "1"])  # a GPU's loader
    cifar10_teacher.main()
    state = torch.load(tmp_path / "t" / "last.pt", weights_only=True)
    assert [row["epoch"] for row in state["history"]] == [1, 2]
    assert [row["device"] for row in state["history"]] == ["cpu", "cpu"] and state["args"]["device"] == "cpu"
    assert state["replans"] == [{"at_epoch": 1, "from": 1, "to": 2, "why": "resume"}]
    rows = [json.loads(line) for line in (tmp_path / "t" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]


def test_a_teacher_trained_in_two_invocations_is_bit_identical_to_one_trained_in_one(tmp_path, monkeypatch):
    """The converged teacher spans sessions: stopping after an epoch and resuming must not change the model."""
    _images(tmp_path / "split" / "train", 64)
    _images(tmp_path / "split" / "val", 2)
    base = ["cifar10_teacher.py", "--split", str(tmp_path / "split"), "--device", "cpu", "--epochs", "2"]
    monkeypatch.setattr(sys, "argv", [*base, "--out", str(tmp_path / "whole")])
    cifar10_teacher.main()
    monkeypatch.setattr(sys, "argv", [*base, "--out", str(tmp_path / "parts"), "--stop-after", "1"])
    cifar10_teacher.main()
    assert torch.load(tmp_path / "parts" / "last.pt", weights_only=True)["epoch"] == 1
    torch.manual_seed(123)  # whatever ran between the sessions, the augmentation stream goes on as saved
    monkeypatch.setattr(sys, "argv", [*base, "--out", str(tmp_path / "parts"), "--resume"])
    cifar10_teacher.main()
    whole, parts = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("whole", "parts"))
    assert parts["epoch"] == 2 and parts["replans"] == []
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, parts["model"][name]), name


def test_a_stop_time_earlier_in_the_day_than_now_is_tomorrow():
    """--stop-by 00:14 given at 21:40 means after midnight, not a time already gone."""
    import time

    now = time.time()
    a_minute_ago = time.strftime("%H:%M", time.gmtime(now - 60))
    in_two_minutes = time.strftime("%H:%M", time.gmtime(now + 120))
    assert 23 * 3600 < cifar10_teacher.next_utc(a_minute_ago) - now <= 24 * 3600
    assert 0 < cifar10_teacher.next_utc(in_two_minutes) - now <= 120
    assert cifar10_teacher.next_utc(None) is None
    for bad in ("25:00", "7:61", "noon"):
        with pytest.raises(ValueError):
            cifar10_teacher.next_utc(bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_kd_loop_trains_on_cuda_and_its_checkpoint_resumes_on_the_cpu(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(3, 32, 32, generator=g), i % 10) for i in range(16)]
    teacher = kd.ZOO.get("resnet20")(10, 3)
    methods = {m: kd.METHODS[m] for m in ("student_alone", "hinton_T_adaptive", "fitnet", "rkd")}
    ckpt = tmp_path / "seed0.ckpt.pt"
    common = dict(seed=0, epochs=1, lr=0.05, methods=methods, batch_size=8, log=lambda m: None, checkpoint=ckpt)
    on_gpu = kd.run_seed(data, data[:8], data[:8], teacher, kd.student_factory("mobilenetv2", 0.25), device="cuda",
                         **common)  # fmt: skip
    assert next(teacher.parameters()).is_cuda and ckpt.is_file()
    assert set(on_gpu) == set(methods) and all(0.0 <= r["test_accuracy"] <= 1.0 for r in on_gpu.values())
    logs = []
    again = kd.run_seed(data, data[:8], data[:8], teacher.cpu(), kd.student_factory("mobilenetv2", 0.25),
                        device="cpu", **{**common, "log": logs.append})  # fmt: skip
    assert any("resumed" in m for m in logs)  # every epoch was done: the CPU only scores the loaded students
    assert {n: r["history"] for n, r in again.items()} == {n: r["history"] for n, r in on_gpu.items()}
    assert all(abs(again[n]["test_accuracy"] - on_gpu[n]["test_accuracy"]) <= 1 / 8 for n in methods)  # kernels differ
