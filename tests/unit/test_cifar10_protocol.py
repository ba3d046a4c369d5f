"""The CIFAR-10 benchmark's fixed pieces: the zoo ResNet-20 teacher and the committed seeded split."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from hwkd.models.loaders import load_teacher
from hwkd.models.zoo import ZOO

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCH))
import cifar10_split as split  # noqa: E402


def test_resnet20_is_the_cifar_resnet20():
    model = ZOO.get("resnet20")(10, 3).eval()
    assert sum(p.numel() for p in model.parameters()) == 272_474  # He et al.: 0.27M
    assert [len(stage) for stage in model.stages] == [3, 3, 3]
    assert model.stem[0].kernel_size == (3, 3) and model.stem[0].stride == (1, 1)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


def test_resnet20_state_dict_loads_with_teacher_arch(tmp_path):
    src = ZOO.get("resnet20")(10, 3)
    torch.save(src.state_dict(), tmp_path / "t.pt")
    model, spec = load_teacher(str(tmp_path / "t.pt"), "resnet20", 10, 3, trust_code=False)
    x = torch.randn(1, 3, 32, 32)
    assert torch.equal(model(x), src.eval()(x))
    assert spec["name"] == "resnet20"


def _folder(root: Path, classes: int = 3, per_class: int = 10) -> Path:
    for c in range(classes):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            (root / f"c{c}" / f"{i:04d}.jpg").write_bytes(b"x")
    return root


def test_split_is_seeded_stratified_and_disjoint(tmp_path, monkeypatch):
    monkeypatch.setattr(split, "PER_CLASS", {"val": 2, "test": 3})
    data = _folder(tmp_path / "data")
    a, b = split.make_split(data), split.make_split(data)
    assert a == b
    assert split.make_split(data, seed=1) != a
    assert {k: len(v) for k, v in a.items()} == {"train": 15, "val": 6, "test": 9}
    assert set(Counter(p.split("/")[0] for p in a["val"]).values()) == {2}
    assert not (set(a["train"]) & set(a["val"])) and not (set(a["val"]) & set(a["test"]))
    out = split.materialise(data, tmp_path / "split", a)
    assert len(list((out / "test").rglob("*.jpg"))) == 9
    assert (out / "val" / a["val"][0]).resolve() == (data / a["val"][0]).resolve()


def test_committed_split_lists_are_the_protocol():
    val = (split.RESULTS / "split_val.txt").read_text().split()
    test = (split.RESULTS / "split_test.txt").read_text().split()
    assert len(val) == len(test) == 2500 and not set(val) & set(test)
    assert set(Counter(p.split("/")[0] for p in val + test).values()) == {500}
    manifest = split.json.loads((split.RESULTS / "split.json").read_text())
    assert manifest["sha256_16"]["val"] == split.digest(val)
    assert manifest["sha256_16"]["test"] == split.digest(test)


@pytest.mark.skipif(not Path("/work/shared/data/cifar10/train").is_dir(), reason="CIFAR-10 folder not here")
def test_committed_split_applies_to_the_public_folder():
    lists = split.read_lists(Path("/work/shared/data/cifar10/train"))
    manifest = split.json.loads((split.RESULTS / "split.json").read_text())
    assert {k: split.digest(v) for k, v in lists.items()} == manifest["sha256_16"]


def test_kd_seeds_from_an_earlier_invocation_are_kept_and_summarised_together():
    import cifar10_kd as kd

    def seed_result(offset: float) -> dict:
        return {name: {"test_accuracy": 0.70 + offset + i / 100, "val_accuracy": 0.6 + offset,
                       "history": [{"epoch": 1, "val_accuracy": 0.6 + offset}]}
                for i, name in enumerate(("student_alone", "hinton_T4"))}  # fmt: skip

    first = kd.summarise([seed_result(0.0)])
    earlier = {**first, "seeds_done": [0], "epochs": 10,
               "histories": {n: [seed_result(0.0)[n]["history"]] for n in ("student_alone", "hinton_T4")}}  # fmt: skip
    done = kd.earlier_seeds(earlier, 10)
    assert done == {0: seed_result(0.0)}
    done[1] = seed_result(0.02)
    both = kd.summarise([done[s] for s in sorted(done)])
    assert both["methods"]["hinton_T4"]["seeds"] == [0.71, 0.73]
    assert both["methods"]["hinton_T4"]["vs_student_alone_points"] == 1.0
    # other epochs: nothing to merge
    assert kd.earlier_seeds(earlier, 40) == {}
    assert kd.earlier_seeds(None, 10) == {}


def test_kd_methods_added_later_join_the_table_once_they_ran_on_every_seed():
    import cifar10_kd as kd

    def run(acc):
        return {"test_accuracy": acc, "val_accuracy": acc, "history": [{"epoch": 1, "val_accuracy": acc}]}

    done = {0: {"student_alone": run(0.70), "hinton_T4": run(0.72)},
            1: {"student_alone": run(0.71), "hinton_T4": run(0.73)}}  # fmt: skip
    done[0]["rkd"] = run(0.74)  # a new method, seed 1 not run yet
    assert kd.table(done) == ([0, 1], ["student_alone", "hinton_T4"])
    done[1]["rkd"] = run(0.75)
    assert kd.table(done) == ([0, 1], ["student_alone", "hinton_T4", "rkd"])
    # the raw runs round-trip through the results file, so the next invocation resumes from them
    saved = {"epochs": 10, "runs": {str(s): r for s, r in done.items()}}
    assert kd.earlier_seeds(saved, 10) == done
    assert kd.earlier_seeds(saved, 40) == {}


def test_two_invocations_at_once_keep_each_others_steps():
    import cifar10

    disk = {"split": {"n": 1}, "kd": {"seeds_done": [0]}, "pipeline": {"jetson": {"acc": 1}},
            "meta": {"invocations": [{"command": "a", "started_utc": "10:00"}], "step_wall_s": {"kd": 5.0}}}  # fmt: skip
    mine = {"split": {"n": 1}, "pipeline": {"rpi4": {"acc": 2}}, "hw": {"budgets": {}},
            "meta": {"invocations": [{"command": "b", "started_utc": "10:01"}], "step_wall_s": {"pipeline": 9.0}}}  # fmt: skip
    merged = cifar10.merged_with_disk(disk, mine, ["pipeline", "hw"])
    assert merged["kd"] == {"seeds_done": [0]}  # not this invocation's step: kept from disk
    assert merged["pipeline"] == {"jetson": {"acc": 1}, "rpi4": {"acc": 2}}
    assert merged["hw"] == {"budgets": {}}
    assert [i["command"] for i in merged["meta"]["invocations"]] == ["b", "a"]
    assert merged["meta"]["step_wall_s"] == {"kd": 5.0, "pipeline": 9.0}
    # a step's wall read at this invocation's start is stale once another invocation re-ran the step
    stale = {**mine, "meta": {**mine["meta"], "step_wall_s": {"kd": 1.0, "pipeline": 9.0}}}
    assert cifar10.merged_with_disk(disk, stale, ["pipeline"])["meta"]["step_wall_s"] == {"kd": 5.0, "pipeline": 9.0}
    # a step this invocation runs replaces the disk's
    assert cifar10.merged_with_disk(disk, {**mine, "kd": {"seeds_done": [1]}}, ["kd"])["kd"] == {"seeds_done": [1]}
    # the small-student step, like the pipeline, is owned profile by profile
    both = cifar10.merged_with_disk({**disk, "small": {"jetson": {"acc": 3}}}, {**mine, "small": {"rpi4": {"acc": 4}}}, ["small"])
    assert both["small"] == {"jetson": {"acc": 3}, "rpi4": {"acc": 4}}


def test_peer_takes_the_least_pruning_that_reaches_the_target_else_the_fastest_grid_point():
    import cifar10_peer as peer

    grid = {0.0: 0.76, 0.5: 0.46, 0.8: 0.27, 0.9: 0.17, 0.95: 0.43}  # 0.95 times slower than 0.90 in INT8
    assert peer.match_ratio(grid, 0.30) == 0.8
    assert peer.match_ratio(grid, 0.46) == 0.5
    assert peer.match_ratio(grid, 0.06) == 0.9  # unreachable: the fastest, not the most pruned


def head_commit() -> str:
    import subprocess

    got = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH.parent, capture_output=True, text=True)
    if got.returncode != 0:
        pytest.skip("not a git checkout: a run's code cannot be compared with today's")
    return got.stdout.strip()


def test_an_earlier_hw_run_is_reused_only_for_the_same_command_with_its_model_on_disk(tmp_path):
    import cifar10

    model = tmp_path / "model.onnx"
    earlier = {"command": "hwkd compress --latency-budget 10%", "returncode": 0, "model": str(model),
               "code": [head_commit()]}  # fmt: skip
    assert not cifar10.reusable(earlier, earlier["command"])  # model gone
    model.write_bytes(b"onnx")
    assert cifar10.reusable(earlier, earlier["command"])
    assert not cifar10.reusable(earlier, "hwkd compress --latency-budget 20%")
    assert not cifar10.reusable({**earlier, "returncode": 1}, earlier["command"])
    assert not cifar10.reusable(None, earlier["command"])


def test_a_run_from_before_a_change_to_hwkds_defaults_is_not_reused(tmp_path):
    """The same command is another recipe once a default changes (stop 48: the KD schedule, adaptive -> T=4),
    so a run made before the change, or on unknown or uncommitted code, never stands in for it."""
    import cifar10

    model = tmp_path / "model.onnx"
    model.write_bytes(b"onnx")
    earlier = {"command": "hwkd compress --profile rpi4", "returncode": 0, "model": str(model)}
    assert cifar10.reusable({**earlier, "code": [head_commit()]}, earlier["command"])
    assert not cifar10.reusable({**earlier, "code": ["3453b88"]}, earlier["command"])  # adaptive T was the default
    assert not cifar10.reusable({**earlier, "code": [head_commit(), "3453b88"]}, earlier["command"])  # resumed across
    assert not cifar10.reusable({**earlier, "code": [f"{head_commit()}+dirty"]}, earlier["command"])
    assert not cifar10.reusable({**earlier, "code": ["unknown"]}, earlier["command"])
    assert not cifar10.reusable(earlier, earlier["command"])  # made before runs recorded their code


def test_reuse_runs_takes_a_complete_run_folder_of_the_same_command(tmp_path, monkeypatch):
    """An arm run by hand with the benchmark's very command is read from its folder, not trained again."""
    import argparse
    import json

    import cifar10

    git = cifar10.subprocess.run
    monkeypatch.setattr(cifar10.subprocess, "run",
                        lambda cmd, *a, **k: git(cmd, *a, **k) if cmd[0] == "git" else pytest.fail("trained again"))
    run = tmp_path / "penalty_0.75x_30_plan"
    run.mkdir()
    (tmp_path / f"{run.name}.code.log").write_text(f"2026-12-07T12:00:00 start {head_commit()}\n")
    args = argparse.Namespace(threads=1, reuse_runs=True)
    proto = cifar10.PROTOCOLS["full"]
    argv = ["compress", "--profile", "rpi4", "--data", str(tmp_path), "--teacher", str(tmp_path / "t.pt"),
            "--teacher-arch", cifar10.teacher_mod.ARCH, *cifar10.MEAN_STD, "--out", str(run), "--overwrite", "--json",
            "--latency-budget", "30%"]  # fmt: skip
    (run / "manifest.json").write_text(json.dumps({"command": ["/x/hwkd/__main__.py", *argv], "status": "complete",
                                                   "wall_seconds": 4321.0}))  # fmt: skip
    (run / "model.onnx").write_bytes(b"onnx")
    stage = {"name": "distill", "accuracy": 0.8, "seconds": 10.0, "history": [{"epoch": 1}, {"epoch": 2}]}
    rep = {"teacher": {"accuracy": 0.866}, "final": {"accuracy": 0.81, "precision": "int8"}, "stages": [stage]}
    (run / "report.json").write_text(json.dumps(rep))
    got = cifar10.hwkd_compress(args, proto, tmp_path, tmp_path / "t.pt", "rpi4", run, ["--latency-budget", "30%"])
    assert got["reused"] and got["final"]["accuracy"] == 0.81 and got["wall_s"] == 4321.0 and got["train_epochs"] == 2
    assert got["command"].startswith("hwkd compress --profile rpi4") and got["model"] == str(run / "model.onnx")
    assert cifar10.finished_run(run, [*argv[:-1], "20%"]) is None  # another command
    (tmp_path / f"{run.name}.code.log").write_text("2026-12-05T12:00:00 start 3453b88\n")  # before the T=4 default
    monkeypatch.setattr(cifar10.subprocess, "run",
                        lambda cmd, *a, **k: git(cmd, *a, **k) if cmd[0] == "git" else pytest.fail("trained again, rightly"))
    with pytest.raises(pytest.fail.Exception, match="rightly"):
        cifar10.hwkd_compress(args, proto, tmp_path, tmp_path / "t.pt", "rpi4", run, ["--latency-budget", "30%"])
    (run / "manifest.json").write_text(json.dumps({"command": ["/x", *argv], "status": "running"}))
    assert cifar10.finished_run(run, argv) is None  # not complete


def test_a_killed_run_of_the_same_command_is_resumed_and_nothing_else_is(tmp_path):
    import json

    import cifar10

    argv = ["compress", "--profile", "rpi4", "--latency-budget", "10%"]
    manifest = {"command": ["/x/hwkd/__main__.py", *argv], "status": "running"}  # SIGKILLed: still "running"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert cifar10.unfinished_run(tmp_path, argv) is None  # no epoch finished: nothing to resume from
    (tmp_path / "stages" / "distill").mkdir(parents=True)
    (tmp_path / "stages" / "distill" / "last.pt").write_bytes(b"ckpt")
    assert cifar10.unfinished_run(tmp_path, argv) == "running"
    assert cifar10.unfinished_run(tmp_path, [*argv[:-1], "20%"]) is None  # another command: started afresh
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "status": "complete"}))
    assert cifar10.unfinished_run(tmp_path, argv) is None
    (tmp_path / "manifest.json").write_text("{not json")
    assert cifar10.unfinished_run(tmp_path, argv) is None
    assert cifar10.unfinished_run(tmp_path / "absent", argv) is None


def test_a_run_records_the_code_it_started_on_and_each_resume_onto_other_code(tmp_path, monkeypatch):
    """A run killed and resumed after the code changed is two code states; the row says so."""
    import argparse
    import json
    import re
    import types

    import cifar10

    assert re.fullmatch(r"[0-9a-f]{7,}(\+dirty)?|unknown", cifar10.source_state())
    rep = {"teacher": {"accuracy": 0.866}, "final": {"accuracy": 0.81, "precision": "int8"},
           "stages": [{"name": "distill", "accuracy": 0.8, "history": [{"epoch": 1}]}]}  # fmt: skip
    monkeypatch.setattr(cifar10.subprocess, "run", lambda cmd, **k: types.SimpleNamespace(returncode=0, stdout=json.dumps(rep), stderr=""))
    states = iter(["aaa1111", "bbb2222", "bbb2222", "ccc3333"])
    monkeypatch.setattr(cifar10, "source_state", lambda: next(states))
    args, proto = argparse.Namespace(threads=1, reuse_runs=False), cifar10.PROTOCOLS["full"]
    run = tmp_path / "penalty_0.75x_30_mask"

    def compress():
        return cifar10.hwkd_compress(args, proto, tmp_path, tmp_path / "t.pt", "rpi4", run, ["--latency-budget", "30%"])

    assert compress()["code"] == ["aaa1111"]
    monkeypatch.setattr(cifar10, "unfinished_run", lambda run_dir, argv: "interrupted")  # killed, then resumed twice
    assert compress()["code"] == ["aaa1111", "bbb2222"]
    got = compress()
    assert got["code"] == ["aaa1111", "bbb2222"] and got["resumed"] == "interrupted"  # the same code once
    monkeypatch.setattr(cifar10, "unfinished_run", lambda run_dir, argv: None)
    assert compress()["code"] == ["ccc3333"]  # started afresh (--overwrite): a new log
    assert cifar10.code_states(tmp_path / "absent.code.log") == {}


def test_a_resumed_runs_wall_says_it_is_the_last_launch_and_shows_its_stages_seconds():
    """A resumed run's subprocess wall is its last launch only: the pipeline table must not pass it off as the run's."""
    import cifar10_report as report

    m = {"accuracy": 0.8, "params": 1000, "macs": 2e6, "measured_latency_ms": 0.1, "estimated_latency_ms": 0.2,
         "precision": "int8"}  # fmt: skip
    run = {"command": "hwkd compress --profile jetson", "returncode": 0, "wall_s": 374.6, "teacher": m, "final": m,
           "stages": [{"name": "distill", "seconds": 1403.5}, {"name": "prune", "seconds": 90.2}, {"name": "export", "seconds": None}]}  # fmt: skip
    text = "\n".join(report.pipeline_section({"pipeline": {"jetson": run}}))
    assert "| 375 s |" in text
    text = "\n".join(report.pipeline_section({"pipeline": {"jetson": {**run, "resumed": "running"}}}))
    assert "| 375 s (resumed: this launch; stages 1494 s) |" in text and "| 375 s |" not in text


def todays_recipe(**changes) -> dict:
    """The resolved recipe (manifest ``config``) of a default run of the full protocol today, with ``changes``."""
    import cifar10

    from hwkd.api import resolve_config
    from hwkd.config import merge

    data = {"data": {"mean": list(cifar10.teacher_mod.MEAN), "std": list(cifar10.teacher_mod.STD)}}
    return resolve_config(None, merge(data, changes)).to_dict()


def test_the_default_pipeline_stands_in_only_where_the_budget_cannot_bind(tmp_path):
    import cifar10

    model = tmp_path / "model.onnx"
    model.write_bytes(b"onnx")
    run = {"command": "hwkd compress --profile rpi4 --out x --overwrite --json", "returncode": 0, "model": str(model),
           "teacher": {"estimated_latency_ms": 4.0}, "final": {"estimated_latency_ms": 0.78, "precision": "int8"},
           "stages": [{"name": "distill", "epochs": 14}, {"name": "prune", "epochs": 0}, {"name": "qat", "epochs": 3}],
           "config": todays_recipe()}  # fmt: skip
    out, proto = {"pipeline": {"rpi4": run}}, {"hw_profile": "rpi4", "hwkd_sets": []}
    assert cifar10.pipeline_stand_in(out, proto, 20)["stand_in"].startswith(
        "pipeline run `defaults` (rpi4, today's recipe): budget not binding")
    assert cifar10.pipeline_stand_in(out, proto, 20)["command"] == run["command"]  # says what really ran
    assert cifar10.pipeline_stand_in(out, proto, 19) is None  # 0.76 ms: the student is over it
    # judged on today's cost model when given: a student re-priced at 0.86 of a teacher at 4.3 ms is within 20%...
    assert cifar10.pipeline_stand_in(out, proto, 20, lambda m: (0.86, 4.3))["stand_in"].find("0.860 ms <= 0.860") > 0
    assert cifar10.pipeline_stand_in(out, proto, 20, lambda m: (0.87, 4.3)) is None  # ... and at 0.87 it is not
    pruned = {**run, "stages": [{"name": "prune", "epochs": 6}]}
    assert cifar10.pipeline_stand_in({"pipeline": {"rpi4": pruned}}, proto, 50) is None
    assert cifar10.pipeline_stand_in({"pipeline": {"jetson": run}}, proto, 50) is None
    copy = tmp_path / "rpi4_int8.onnx"  # the run folder gone, its committed copy kept: the copy stands in
    copy.write_bytes(b"onnx")
    model.unlink()
    kept = {"pipeline": {"rpi4": {**run, "committed_model": str(copy)}}}
    assert cifar10.pipeline_stand_in(kept, proto, 50)["model"] == str(copy)
    assert "committed copy" in cifar10.pipeline_stand_in(kept, proto, 50)["stand_in"]
    assert cifar10.pipeline_stand_in(out, proto, 50) is None  # neither on disk
    # stop 50: the row must have run today's recipe, not merely today's command (the KD schedule changed at stop 48)
    model.write_bytes(b"onnx")
    older = {**run, "config": todays_recipe(distill={"temperature_schedule": "adaptive"})}
    assert cifar10.pipeline_stand_in({"pipeline": {"rpi4": older}}, proto, 50) is None
    restating = {**run, "command": f"{run['command']} --set distill.temperature_schedule=constant"}
    both = {"pipeline": {"rpi4": older, "rpi4 distill.temperature_schedule=constant": restating,
                         "rpi4 seed=1": {**run, "config": todays_recipe(seed=1)}}}  # fmt: skip
    stand = cifar10.pipeline_stand_in(both, proto, 50)
    assert stand["command"] == restating["command"] and "`--set distill.temperature_schedule=constant`" in stand["stand_in"]
    assert cifar10.pipeline_stand_in({"pipeline": {"rpi4 seed=1": both["pipeline"]["rpi4 seed=1"]}}, proto, 50) is None
    unknown = {k: v for k, v in run.items() if k != "config"}  # recipe not recorded and no run folder to read it from
    assert cifar10.pipeline_stand_in({"pipeline": {"rpi4": unknown}}, proto, 50) is None
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "manifest.json").write_text(json.dumps({"config": todays_recipe()}))
    assert cifar10.pipeline_stand_in({"pipeline": {"rpi4": {**unknown, "run_dir": str(tmp_path / "run")}}}, proto, 50)


def test_an_earlier_peer_stands_unless_retrained_and_reuse_keeps_only_the_same_ratio_and_epochs(tmp_path):
    import cifar10

    model = tmp_path / "peer.onnx"
    earlier = {"ratio": 0.9, "epochs": 17, "model": str(model)}
    assert not cifar10.peer_kept(earlier, 0.9, 17, retrain=False, reuse=False)  # model gone
    model.write_bytes(b"onnx")
    assert cifar10.peer_kept(earlier, 0.5, 3, retrain=False, reuse=False)  # another invocation's budget
    assert not cifar10.peer_kept(earlier, 0.9, 17, retrain=True, reuse=False)
    assert cifar10.peer_kept(earlier, 0.9, 17, retrain=True, reuse=True)
    assert not cifar10.peer_kept(earlier, 0.85, 17, retrain=True, reuse=True)
    assert not cifar10.peer_kept(earlier, 0.9, 29, retrain=True, reuse=True)
    assert not cifar10.peer_kept(None, 0.9, 17, retrain=False, reuse=True)


def test_the_student_alone_trains_without_a_teacher_pass_and_its_plateau_is_reported():
    import cifar10_kd as kd
    import cifar10_report as report

    class NoTeacher(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("cross-entropy alone must not run the teacher")

    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(3, 32, 32, generator=g), i % 10) for i in range(16)]
    res = kd.run_seed(data, data[:8], data[:8], NoTeacher(), kd.student_factory("mobilenetv2", 0.25), seed=0,
                      epochs=2, lr=0.05, methods={"student_alone": kd.METHODS["student_alone"]}, batch_size=8,
                      log=lambda m: None)["student_alone"]  # fmt: skip
    assert [row["epoch"] for row in res["history"]] == [1, 2]
    import cifar10

    first = {"epochs": 40, "seed": 0, "student": ["mobilenetv2", 1.0], "test_accuracy": 0.8, "wall_s": 60.0,
             "val_curve": [0.5, 0.7, 0.8, 0.801, 0.802, 0.8], "plateau_epoch": 3}  # fmt: skip
    seeds = cifar10.plateau_seed_runs(first, 40)  # the first layout (student alone only) is read as seed 0
    assert seeds["0"]["student_alone"]["test_accuracy"] == 0.8 and cifar10.plateau_seed_runs(first, 10) == {}
    seeds["0"]["hinton_T_adaptive"] = {**seeds["0"]["student_alone"], "test_accuracy": 0.83, "plateau_epoch": None}
    one_seed = {"epochs": 40, "seed": 0, "student": first["student"], "runs": seeds["0"]}  # stops 24-29's layout
    assert cifar10.plateau_seed_runs(one_seed, 40) == seeds
    text = "\n".join(report.plateau_section({"plateau": one_seed}))
    assert "| student_alone | 0 | 80.00% | – | 80.00% | – | – | 3 | 60 s |" in text
    assert "| hinton_T_adaptive | 0 | 83.00% | +3.00 | 80.00% | +0.00 | +1.50 | not within 40 | 60 s |" in text
    assert ", mean**" not in text  # one seed has no mean row
    # a second seed, saved by another invocation at the same time, is merged, not overwritten
    alone1 = {**seeds["0"]["student_alone"], "test_accuracy": 0.81}
    mine = {"epochs": 40, "student": first["student"], "seeds": {"1": {"student_alone": alone1,
            "hinton_T_adaptive": {**alone1, "test_accuracy": 0.82, "val_curve": [0.7, 0.81]}}}}  # fmt: skip
    meta = {"invocations": [], "step_wall_s": {}}
    merged = cifar10.merged_with_disk({"plateau": one_seed, "meta": meta}, {"plateau": mine, "meta": meta}, ["plateau"])
    assert sorted(merged["plateau"]["seeds"]) == ["0", "1"]
    text = "\n".join(report.plateau_section(merged))
    assert ("| **hinton_T_adaptive, mean** | 2 seeds | 82.50% | +2.00 (per seed +3.00, +1.00) | 80.50% | "
            "+0.50 (per seed +0.00, +1.00) | +1.25 (per seed +1.50, +1.00) | | |") in text
    assert "| **student_alone, mean** | 2 seeds | 80.50% | – | 80.00% | – | – | | |" in text
    assert "adaptive T minus" not in text  # no other KD method ran
    merged["plateau"]["seeds"]["1"]["hinton_T4"] = {**alone1, "test_accuracy": 0.8250}
    merged["split"] = {"counts": {"test": 2500}}
    text = "\n".join(report.plateau_section(merged))
    assert ("paired by seed (points; positive: adaptive T ahead; hinton_T4 is hwkd's default recipe since stop 48). One test "
            "image is 0.04 point.") in text
    assert "| hinton_T4 | -0.50 (per seed -0.50) | +1.00 (per seed +1.00) | +0.25 (per seed +0.25) |" in text
    assert report.plateau_section({}) == []


class Jittered(torch.utils.data.Dataset):
    """n fixed random images that augment from torch's global generator, as transforms.v2 does."""

    def __init__(self, n):
        g = torch.Generator().manual_seed(1)
        self.items = [(torch.randn(3, 32, 32, generator=g), i % 10) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        x, y = self.items[i]
        return x + 0.5 * torch.randn_like(x), y


def test_a_methods_run_does_not_depend_on_which_methods_ran_beside_it():
    """Stop 23: the student alone scored 2.5 points apart at the same seed in two invocations, because the
    augmentation drew from the global generator after every method's student (and FitNets' adapters) was
    built. The augmentation now has a stream of its own."""
    import cifar10_kd as kd

    data, teacher = Jittered(16), ZOO.get("resnet20")(10, 3).eval()

    def alone(methods):
        res = kd.run_seed(data, data.items[:8], data.items[:8], teacher, kd.student_factory("mobilenetv2", 0.25),
                          seed=0, epochs=2, lr=0.05, methods={n: kd.METHODS[n] for n in methods}, batch_size=8,
                          log=lambda m: None)  # fmt: skip
        return [row["loss"] for row in res["student_alone"]["history"]]

    assert alone(["student_alone"]) == alone(["student_alone", "fitnet"])


def test_a_kd_run_stopped_between_epochs_goes_on_from_its_checkpoint_as_if_never_stopped(tmp_path):
    """A 40-epoch KD table takes longer than a session's processes live: the run keeps a checkpoint after
    each epoch, and the resumed run must train exactly as the uninterrupted one (the adaptive schedule's
    validation losses, FitNets' adapters, the shuffle and augmentation streams all carried over)."""
    import cifar10_kd as kd

    class Stop(Exception):
        pass

    def stop_at_epoch_3(message):
        if "epoch 3/4" in message:
            raise Stop

    data, teacher = Jittered(16), ZOO.get("resnet20")(10, 3).eval()
    val = [(x, (y + 3) % 10) for x, y in data.items[:8]]  # its loss rises as the students fit: adaptive T reacts
    methods = {n: kd.METHODS[n] for n in ("student_alone", "hinton_T_adaptive", "fitnet")}
    ckpt = kd.checkpoint_path(tmp_path, "plateau", 0, 4, methods)

    def train(log, checkpoint=None):
        return kd.run_seed(data, val, val, teacher, kd.student_factory("mobilenetv2", 0.25), seed=0, epochs=4,
                           lr=0.05, methods=methods, batch_size=8, log=log, checkpoint=checkpoint)  # fmt: skip

    whole = train(lambda m: None)
    with pytest.raises(Stop):
        train(stop_at_epoch_3, ckpt)  # killed in epoch 3: the checkpoint holds epoch 2
    assert ckpt.is_file()
    logs = []
    resumed = train(logs.append, ckpt)
    assert any("resumed from" in m and "after epoch 2" in m for m in logs)
    assert sum("epoch" in m and "/4" in m for m in logs) == 2  # epochs 3 and 4 only
    temperatures = [r["temperature"] for r in whole["hinton_T_adaptive"]["history"]]
    assert temperatures[2] > 4.0 + (1.0 - 4.0) * (2 / 4 - 0.3) / 0.7  # pulled back by a rise the resumed run must see
    for name in methods:
        assert [r["epoch"] for r in resumed[name]["history"]] == [1, 2, 3, 4]
        assert resumed[name]["history"] == whole[name]["history"], name
        assert resumed[name]["test_accuracy"] == whole[name]["test_accuracy"]
    # another method set has a checkpoint of its own; a checkpoint of another run is not resumed
    assert kd.checkpoint_path(tmp_path, "plateau", 0, 4, {"rkd": kd.METHODS["rkd"]}) != ckpt
    logs.clear()
    other = kd.run_seed(data, val, val, teacher, kd.student_factory("mobilenetv2", 0.25), seed=0, epochs=4, lr=0.1,
                        methods=methods, batch_size=8, log=logs.append, checkpoint=ckpt)  # fmt: skip
    assert any("another run" in m for m in logs) and sum("/4" in m for m in logs) == 4  # every epoch, afresh
    assert [r["epoch"] for r in other["fitnet"]["history"]] == [1, 2, 3, 4]


def test_the_plateau_step_trains_with_a_checkpoint_beside_the_runs_and_drops_it_once_saved(tmp_path, monkeypatch):
    """The step's side of resuming: one checkpoint per seed and method set under the runs folder, handed to
    run_seed, removed only after the results are saved; a resumed run's wall time counts every invocation."""
    import argparse

    import cifar10
    import cifar10_kd as kd

    monkeypatch.setattr(cifar10, "load_sets", lambda split: {"train": [], "val": [], "test": []})
    monkeypatch.setattr(cifar10, "load_teacher", lambda pt: None)
    seen, saved = [], []

    def fake_run_seed(*a, methods, checkpoint, seed, **k):
        seen.append((seed, sorted(methods), checkpoint))
        checkpoint.write_bytes(b"epochs so far")
        hist = [{"val_accuracy": 0.5}]
        return {n: {"test_accuracy": 0.8, "history": hist, "augmentation_rng": "own", "wall_s": 5000.0} for n in methods}

    monkeypatch.setattr(kd, "run_seed", fake_run_seed)
    monkeypatch.setattr(cifar10, "save", lambda args, out: saved.append([c.is_file() for _, _, c in seen]))
    args = argparse.Namespace(plateau_epochs=None, plateau_methods="dkd,rkd", runs=tmp_path, quick=False)
    earlier = {"epochs": 40, "student": ["mobilenetv2", 1.0], "seeds": {"0": {"student_alone": {"test_accuracy": 0.7}}}}
    out = {"plateau": earlier}
    cifar10.step_plateau(args, {**cifar10.PROTOCOLS["full"], "plateau_seeds": [0]}, tmp_path, tmp_path / "t.pt", out)
    (seed, methods, ckpt), = seen
    assert seed == 0 and methods == ["dkd", "rkd"]  # the student alone of seed 0 is kept, not trained again
    assert ckpt == kd.checkpoint_path(tmp_path, "plateau", 0, 40, {m: kd.METHODS[m] for m in methods})
    assert saved == [[True]] and not ckpt.exists()  # still there while saving, gone after
    assert out["plateau"]["seeds"]["0"]["dkd"]["wall_s"] == 5000.0  # the run's own, resumed parts included
    assert out["plateau"]["seeds"]["0"]["student_alone"] == {"test_accuracy": 0.7}


def test_the_plateau_step_keeps_the_temperature_a_moving_schedule_trained_at(tmp_path, monkeypatch):
    """Against a near-one-hot teacher the adaptive schedule's cooling is the suspect (stop 47): the results
    keep the temperature each epoch really used where the schedule moves, and the report prints it."""
    import argparse

    import cifar10
    import cifar10_kd as kd
    import cifar10_report as report

    monkeypatch.setattr(cifar10, "load_sets", lambda split: {"train": [], "val": [], "test": []})
    monkeypatch.setattr(cifar10, "load_teacher", lambda pt: None)
    temps = {"hinton_T_adaptive": [4.0, 4.0, 2.5], "hinton_T4": [4.0, 4.0, 4.0]}  # the student alone logs none

    def history(name):
        return [{"val_accuracy": 0.5, **({"temperature": temps[name][e]} if name in temps else {})} for e in range(3)]

    def fake_run_seed(*a, methods, checkpoint, **k):
        return {n: {"test_accuracy": 0.8, "history": history(n), "augmentation_rng": "own", "wall_s": 1.0} for n in methods}

    monkeypatch.setattr(kd, "run_seed", fake_run_seed)
    monkeypatch.setattr(cifar10, "save", lambda args, out: None)
    args = argparse.Namespace(plateau_epochs=3, plateau_methods="hinton_T_adaptive,hinton_T4", runs=tmp_path, quick=False)
    out = {}
    cifar10.step_plateau(args, {**cifar10.PROTOCOLS["full"], "plateau_seeds": [0]}, tmp_path, tmp_path / "t.pt", out)
    runs = out["plateau"]["seeds"]["0"]
    assert runs["hinton_T_adaptive"]["temperature_curve"] == [4.0, 4.0, 2.5]
    assert "temperature_curve" not in runs["hinton_T4"] and "temperature_curve" not in runs["student_alone"]
    lines = report.plateau_section({"plateau": out["plateau"]})
    assert "Temperature per epoch, hinton_T_adaptive, seed 0: [4.0, 4.0, 2.5]." in lines


def test_two_kd_invocations_at_once_add_their_seeds_to_each_other():
    import cifar10
    import cifar10_kd as kd

    def run(acc):
        return {"test_accuracy": acc, "val_accuracy": acc, "history": [{"epoch": 1, "val_accuracy": acc}]}

    fixed = {"epochs": 10, "student": ["mobilenetv2", 1.0], "student_params": 1, "teacher_test_accuracy": 0.8,
             "base_recipe": {}, "recipes": {"student_alone": {}, "rkd": {"kd": "rkd"}}, "wall_s": 1.0}  # fmt: skip
    meta = {"invocations": [], "step_wall_s": {}}
    disk = {"kd": kd.rebuild(fixed, {0: {"student_alone": run(0.70), "rkd": run(0.72)}}), "meta": meta}
    mine = {"kd": kd.rebuild(fixed, {1: {"student_alone": run(0.71), "rkd": run(0.75)}}), "meta": meta}
    merged = cifar10.merged_with_disk(disk, mine, ["kd"])["kd"]
    assert merged["seeds_done"] == [0, 1]
    assert merged["methods"]["rkd"]["seeds"] == [0.72, 0.75]
    assert merged["methods"]["rkd"]["vs_student_alone_points"] == 3.0


def test_plateau_is_where_the_best_so_far_reaches_the_runs_best_and_holds():
    import cifar10_kd as kd

    def hist(accs):
        return [{"val_accuracy": a} for a in accs]

    # a mid-run dip and flat stretch (epochs 4-6) is not the plateau; epoch 8 reaches the level, 3 epochs follow
    assert kd.plateau_epoch(hist([0.5, 0.6, 0.7, 0.69, 0.70, 0.70, 0.75, 0.80, 0.80, 0.802, 0.801])) == 8
    assert kd.plateau_epoch(hist([0.5, 0.6, 0.7, 0.75, 0.78])) is None  # still climbing at the end
    assert kd.plateau_epoch(hist([])) is None


def test_a_tagged_teacher_has_files_results_and_run_dirs_of_its_own(tmp_path):
    import argparse

    import cifar10
    import cifar10_teacher

    assert cifar10_teacher.teacher_stem(None) == "teacher_resnet20"  # the first committed teacher, unchanged
    assert cifar10_teacher.teacher_stem("e30") == "teacher_resnet20_e30"
    stems = {(quick, tag): cifar10.results_stem(argparse.Namespace(quick=quick, teacher_tag=tag))
             for quick in (False, True) for tag in (None, "e30")}  # fmt: skip
    assert stems == {(False, None): "cifar10", (True, None): "cifar10_quick",
                     (False, "e30"): "cifar10_e30", (True, "e30"): "cifar10_quick_e30"}  # fmt: skip
    assert cifar10.teacher_cached("no-such-tag") is None
    args = argparse.Namespace(teacher_tag="no-such-tag", quick=False, work=tmp_path, threads=1)
    with pytest.raises(SystemExit, match="cifar10_teacher.py and --finalise --tag no-such-tag"):
        cifar10.step_teacher(args, {}, tmp_path, {})


def test_small_width_names_its_run_and_passes_the_width_as_the_student_not_as_a_set(tmp_path, monkeypatch):
    import argparse

    import cifar10

    calls = []

    def fake_compress(args, proto, split_dir, teacher_pt, profile, run_dir, extra=(), earlier=None):
        calls.append((profile, run_dir.name, list(extra)))
        return {"returncode": 1}  # not committed

    monkeypatch.setattr(cifar10, "hwkd_compress", fake_compress)
    monkeypatch.setattr(cifar10, "save", lambda args, out: None)
    proto = {**cifar10.PROTOCOLS["full"], "profiles": ["rpi4"]}
    args = argparse.Namespace(small_sets="distill.epochs=70", small_width=0.32, runs=tmp_path, jobs=1, quick=False,
                              teacher_tag=None)  # fmt: skip
    out = {}
    cifar10.step_small(args, proto, tmp_path, tmp_path / "t.pt", out)
    assert calls == [("rpi4", "small_rpi4_0.32x_distill.epochs70",
                      ["--student", "0.32x", "--set", "prune.round_to=1", "--set", "distill.epochs=70"])]  # fmt: skip
    assert list(out["small"]) == ["rpi4 0.32x distill.epochs=70"]
    calls.clear()
    cifar10.step_small(argparse.Namespace(**{**vars(args), "small_width": None, "small_sets": None}), proto, tmp_path,
                       tmp_path / "t.pt", out)  # fmt: skip
    assert calls == [("rpi4", "small_rpi4", ["--student", "0.3x", "--set", "prune.round_to=1"])]  # the default keeps its key


def test_pipeline_sets_run_a_candidate_default_beside_the_default_run_never_over_it(tmp_path, monkeypatch):
    """A candidate default (stop 48: fixed T=4) is measured through the pipeline step as a user would type it,
    with ``--set``; its run has its own key, folder and model, so the cited default run stays as it was."""
    import argparse

    import cifar10

    calls = []

    def fake_compress(args, proto, split_dir, teacher_pt, profile, run_dir, extra=(), earlier=None):
        calls.append((profile, run_dir.name, list(extra)))
        return {"returncode": 1, "run": run_dir.name}  # not committed

    monkeypatch.setattr(cifar10, "hwkd_compress", fake_compress)
    monkeypatch.setattr(cifar10, "save", lambda args, out: None)
    proto = {**cifar10.PROTOCOLS["full"], "profiles": ["rpi4"]}
    out = {"pipeline": {"rpi4": {"returncode": 0, "run": "the default run"}}}
    args = argparse.Namespace(pipeline_sets="distill.temperature_schedule=constant", runs=tmp_path, quick=False,
                              teacher_tag=None)  # fmt: skip
    cifar10.step_pipeline(args, proto, tmp_path, tmp_path / "t.pt", out)
    assert calls == [("rpi4", "pipeline_rpi4_distill.temperature_scheduleconstant",
                      ["--set", "distill.temperature_schedule=constant"])]  # fmt: skip
    assert out["pipeline"]["rpi4"] == {"returncode": 0, "run": "the default run"}
    assert out["pipeline"]["rpi4 distill.temperature_schedule=constant"]["run"] == calls[0][1]
    calls.clear()
    cifar10.step_pipeline(argparse.Namespace(**{**vars(args), "pipeline_sets": None}), proto, tmp_path,
                          tmp_path / "t.pt", out)  # fmt: skip
    assert calls == [("rpi4", "pipeline_rpi4", [])]  # the default keeps its key and folder


def test_penalty_step_runs_every_arm_with_the_over_budget_student_and_reports_each_minus_off(tmp_path, monkeypatch):
    import argparse

    import cifar10
    import cifar10_report as report

    calls = []

    def fake_compress(args, proto, split_dir, teacher_pt, profile, run_dir, extra=(), earlier=None):
        calls.append((run_dir.name, list(extra)))
        arm = run_dir.name.split("_")[3]  # penalty_<student>_<budget>_<arm>[_seedN]
        if "30%" in extra and arm == "off":
            return {"returncode": 1, "command": "off 30", "wall_s": 1.0}
        acc = {"on": 0.815, "off": 0.80, "plan": 0.8275}[arm] + (0.005 if "--seed" in extra and arm == "off" else 0)
        code = {"code": ["aaa1111", "bbb2222"]} if arm == "plan" else {}  # resumed onto other code
        return {**code, "returncode": 0, "command": f"hwkd compress {' '.join(extra)}", "model": str(tmp_path / "missing.onnx"),
                "budget": {"latency_ms": 0.809}, "final": {"accuracy": acc, "params": 40_000, "macs": 6e6,
                "estimated_latency_ms": 0.80}, "stages": [{"name": "distill", "accuracy": 0.83}, {"name": "prune", "accuracy": 0.79, "epochs": 9}]}  # fmt: skip

    monkeypatch.setattr(cifar10, "hwkd_compress", fake_compress)
    monkeypatch.setattr(cifar10, "save", lambda args, out: None)
    assert cifar10.DEFAULT_PENALTY_ARMS == ("mask", "on", "off")  # hwkd's default target, the former one (cost), off
    args = argparse.Namespace(penalty_student=None, budgets=None, runs=tmp_path, jobs=1, penalty_seeds="0",
                              penalty_arms="on,off,plan")  # fmt: skip
    out = {"penalty": {"student": "0.75x", "profile": "rpi4", "budgets": {"50": {"on": {"returncode": 2, "command": "x"}}}}}
    cifar10.step_penalty(args, {**cifar10.PROTOCOLS["full"], "penalty_budgets": [20, 30]}, tmp_path, tmp_path / "t.pt", out)
    off = ["--set", "distill.penalty_weight=0", "--set", "prune.penalty_weight=0"]
    plan = ["--set", "distill.penalty_target=plan", "--set", "distill.penalty_start=0.3", "--set", "prune.penalty_target=plan"]
    cost = ["--set", "distill.penalty_target=cost", "--set", "distill.penalty_start=0", "--set", "prune.penalty_target=cost"]
    assert calls == [("penalty_0.75x_20_on", ["--student", "0.75x", "--latency-budget", "20%", *cost]),
                     ("penalty_0.75x_20_off", ["--student", "0.75x", "--latency-budget", "20%", *off]),
                     ("penalty_0.75x_20_plan", ["--student", "0.75x", "--latency-budget", "20%", *plan]),
                     ("penalty_0.75x_30_on", ["--student", "0.75x", "--latency-budget", "30%", *cost]),
                     ("penalty_0.75x_30_off", ["--student", "0.75x", "--latency-budget", "30%", *off]),
                     ("penalty_0.75x_30_plan", ["--student", "0.75x", "--latency-budget", "30%", *plan])]  # fmt: skip
    assert list(out["penalty"]) == ["0.75x"]  # the layout before stop 34 (one student's entry) is read as its student's
    assert list(out["penalty"]["0.75x"]["budgets"]) == ["50", "20", "30"]  # a budget run earlier is kept
    text = "\n".join(report.penalty_section(out))
    assert "| 20% (0.809 ms) | 0 | on | 81.50% | 40.0k | 6.00M | 0.800 | – | 83.00% | 79.00% | 9 | +1.50 |  |" in text
    assert "| 20% (0.809 ms) | 0 | plan | 82.75% | 40.0k | 6.00M | 0.800 | – | 83.00% | 79.00% | 9 | +2.75 | aaa1111 → bbb2222 |" in text
    assert "| 20% (0.809 ms) | 0 | off | 80.00% | 40.0k | 6.00M | 0.800 | – | 83.00% | 79.00% | 9 |  |" in text
    assert "| 30% | 0 | off | failed (exit 1) |" in text and "| 30% (0.809 ms) | 0 | plan | 82.75% |" in text
    assert "| 30% (0.809 ms) | 0 | plan | 82.75% | 40.0k | 6.00M | 0.800 | – | 83.00% | 79.00% | 9 |  |" in text  # no off
    assert "Paired by seed" not in text  # one seed each
    # a second seed of two arms: `--seed 1` in the command and the run folder; seed 0's runs are kept beside it
    calls.clear()
    seed1 = argparse.Namespace(**{**vars(args), "budgets": "20", "penalty_seeds": "1", "penalty_arms": "off,plan"})
    cifar10.step_penalty(seed1, cifar10.PROTOCOLS["full"], tmp_path, tmp_path / "t.pt", out)
    assert calls == [("penalty_0.75x_20_off_seed1", ["--student", "0.75x", "--latency-budget", "20%", *off, "--seed", "1"]),
                     ("penalty_0.75x_20_plan_seed1", ["--student", "0.75x", "--latency-budget", "20%", *plan, "--seed", "1"])]  # fmt: skip
    assert sorted(out["penalty"]["0.75x"]["budgets"]["20"]) == ["off", "off_seed1", "on", "plan", "plan_seed1"]
    text = "\n".join(report.penalty_section(out))
    assert "| 20% (0.809 ms) | 1 | plan | 82.75% | 40.0k | 6.00M | 0.800 | – | 83.00% | 79.00% | 9 | +2.25 |" in text
    assert "Paired by seed: 20% plan − off: mean +2.50 over 2 seeds (+2.75, +2.25)." in text  # on: one seed, no mean
    other = argparse.Namespace(**{**vars(args), "penalty_student": "0.6x", "budgets": "20"})
    calls.clear()
    cifar10.step_penalty(other, cifar10.PROTOCOLS["full"], tmp_path, tmp_path / "t.pt", out)
    assert list(out["penalty"]) == ["0.75x", "0.6x"] and list(out["penalty"]["0.6x"]["budgets"]) == ["20"]  # beside
    assert "## Penalty on vs off where the budget binds: student 0.6x" in "\n".join(report.penalty_section(out))
    assert report.penalty_section({}) == []
    # p50s from two timings (an earlier invocation's finals are gone, so they were not re-timed with the new ones)
    row = out["penalty"]["0.6x"]["budgets"]["20"]
    row["on"].update(paired_p50_ms=0.222)  # timed before the time was recorded
    row["off"].update(paired_p50_ms=0.235, paired_p50_timed_at="2026-12-06T04:41")
    text = "\n".join(report.penalty_section(out))
    assert "| 0.800 | 0.222 (a) |" in text and "| 0.800 | 0.235 (b) |" in text
    assert "p50 timings: (a) an earlier invocation (time not recorded); (b) 2026-12-06T04:41." in text


def test_penalty_reprune_redoes_the_later_stages_from_the_distilled_student_and_marks_the_row(tmp_path, monkeypatch):
    """Stop 39: a prune-stage change left the 15% mask rows of older code in the table, and its paired mean mixed
    them with new runs; --penalty-reprune redoes prune, QAT, export and bench from each run's distilled student."""
    import argparse

    import cifar10
    import cifar10_report as report

    calls = []

    def fake_compress(args, proto, split_dir, teacher_pt, profile, run_dir, extra=(), earlier=None):
        calls.append((run_dir.name, list(extra)))
        return {"returncode": 0, "command": f"hwkd compress {' '.join(extra)}", "model": str(tmp_path / "m.onnx"),
                "code": ["ccc3333"], "budget": {"latency_ms": 0.646}, "final": {"accuracy": 0.7832, "params": 43_346,
                "macs": 7.8e5, "estimated_latency_ms": 0.640}, "stages": [{"name": "prune", "accuracy": 0.7736, "epochs": 6},
                {"name": "qat", "accuracy": 0.7828, "epochs": 3}, {"name": "export", "accuracy": 0.7832, "epochs": 0}]}  # fmt: skip

    monkeypatch.setattr(cifar10, "hwkd_compress", fake_compress)
    monkeypatch.setattr(cifar10, "save", lambda args, out: None)
    mask = ["--set", "distill.penalty_target=mask", "--set", "distill.penalty_start=0.3", "--set", "prune.penalty_target=mask"]
    old = {"returncode": 0, "command": "hwkd compress <mask arm> --seed 1", "code": ["aaa1111"], "budget": {"latency_ms": 0.646},
           "final": {"accuracy": 0.7708, "params": 43_114, "macs": 7.9e5, "estimated_latency_ms": 0.636},
           "stages": [{"name": "distill", "accuracy": 0.7644, "epochs": 14}, {"name": "prune", "accuracy": 0.7676, "epochs": 9},
                      {"name": "qat", "accuracy": 0.7708, "epochs": 3}], "arm": "mask", "seed": 1}  # fmt: skip
    off = {**old, "command": "off", "final": {**old["final"], "accuracy": 0.7672}, "arm": "off"}
    out = {"penalty": {"mobilenetv2": {"student": "mobilenetv2", "profile": "rpi4",
                                       "budgets": {"15": {"mask_seed1": old, "off_seed1": off}}}}}  # fmt: skip
    args = argparse.Namespace(penalty_student="mobilenetv2", budgets="15", runs=tmp_path, jobs=1, penalty_seeds="1",
                              penalty_arms="mask", penalty_reprune=True)  # fmt: skip
    with pytest.raises(SystemExit, match="no complete earlier run with a distilled student"):
        cifar10.step_penalty(args, cifar10.PROTOCOLS["full"], tmp_path, tmp_path / "t.pt", out)  # no model.pt yet
    assert calls == []
    out["penalty"]["mobilenetv2"]["budgets"]["15"]["mask_seed1"] = old  # the failed attempt had taken it out
    distilled = tmp_path / "penalty_mobilenetv2_15_mask_seed1" / "stages" / "distill" / "model.pt"
    distilled.parent.mkdir(parents=True)
    distilled.write_bytes(b"")
    cifar10.step_penalty(args, cifar10.PROTOCOLS["full"], tmp_path, tmp_path / "t.pt", out)
    assert calls == [("penalty_mobilenetv2_15_mask_seed1_reprune",
                      ["--student", "mobilenetv2", "--latency-budget", "15%", *mask, "--seed", "1",
                       "--student-weights", str(distilled), "--stages", "prune,qat,export,bench"])]  # fmt: skip
    row = out["penalty"]["mobilenetv2"]["budgets"]["15"]["mask_seed1"]
    assert row["command"] == old["command"] and row["final"]["accuracy"] == 0.7832  # the arm's command, the new result
    assert [s["name"] for s in row["stages"]] == ["distill", "prune", "qat", "export"] and row["train_epochs"] == 23
    assert row["code"] == ["aaa1111", "ccc3333 (prune on)"] and row["reprune"]["before"]["accuracy"] == 0.7708
    text = "\n".join(report.penalty_section(out))
    assert "| 15% (0.646 ms) | 1 | mask (r) | 78.32% | 43.3k | 0.78M | 0.640 | – | 76.44% | 77.36% | 6 | +1.60 | aaa1111 → ccc3333 (prune on) |" in text
    assert "15% seed 1 mask was 77.08% (aaa1111): `hwkd compress --student mobilenetv2" in text
    failed = {**old, "reprune": {"command": "hwkd compress x", "returncode": 1}}  # what reprune() keeps on a failure
    text = "\n".join(report.penalty_section({"penalty": {"m": {"student": "m", "profile": "rpi4", "budgets": {"15": {"mask_seed1": failed}}}}}))
    assert "| 1 | mask | 77.08% |" in text and "15% seed 1 mask: the re-prune failed (exit 1), the row is the arm's own run" in text
    cifar10.step_penalty(args, cifar10.PROTOCOLS["full"], tmp_path, tmp_path / "t.pt", out)  # re-pruned again
    again = out["penalty"]["mobilenetv2"]["budgets"]["15"]["mask_seed1"]
    assert again["reprune"]["before"]["accuracy"] == 0.7708 and again["code"] == ["aaa1111", "ccc3333 (prune on)"]


def test_the_hw_step_runs_on_and_off_and_a_plan_arm_only_when_asked(tmp_path):
    """Stop 34: the hw step took every PENALTY_ARMS entry, so adding the plan arm made each budget one run dearer
    without a place in its table; now on and off, plus what --penalty-arms names, and the table shows plan."""
    import argparse

    import cifar10
    import cifar10_report as report

    assert cifar10.hw_arms(argparse.Namespace(penalty_arms=None)) == [  # on: hwkd's defaults, as a user runs it
        ("on", []), ("off", ["--set", "distill.penalty_weight=0", "--set", "prune.penalty_weight=0"])]
    assert [a for a, _ in cifar10.hw_arms(argparse.Namespace(penalty_arms="plan"))] == ["on", "off", "plan"]

    def run(acc):
        return {"returncode": 0, "final": {"accuracy": acc}, "paired_p50_ms": 0.2}

    row = {"hwkd_penalty_on": run(0.81), "hwkd_penalty_off": run(0.80), "hwkd_penalty_plan": run(0.8225)}
    text = "\n".join(report.hw_section({"hw": {"profile": "rpi4", "budgets": {"15": row}}}, tmp_path / "none.png"))
    assert "| 15% | 81.00% / 0.200 | 80.00% / 0.200 | – | – | +1.00 | 82.25% / 0.200 | +2.25 |" in text
    assert "prune.penalty_target=plan" in text
    del row["hwkd_penalty_plan"]
    text = "\n".join(report.hw_section({"hw": {"profile": "rpi4", "budgets": {"15": row}}}, tmp_path / "none.png"))
    assert "plan" not in text and "| 15% | 81.00% / 0.200 | 80.00% / 0.200 | – | – | +1.00 |" in text


def test_two_penalty_invocations_at_once_keep_each_others_runs():
    """Stop 34: a second student (or seed) in another invocation saved over the first's penalty results. Stop 39:
    an invocation also saved its stale copies of rows another one redid meanwhile (a re-prune) over the new ones."""
    import cifar10

    def pen(student, budgets):
        return {"student": student, "profile": "rpi4", "budgets": budgets}

    def run(acc, **more):
        return {"returncode": 0, "final": {"accuracy": acc}, **more}

    disk = {"penalty": {"0.75x": pen("0.75x", {"30": {"on": run(0.1), "off": run(0.2), "plan_seed1": run(0.3)}})}, "meta": {}}
    mine = {"penalty": {"0.75x": pen("0.75x", {"30": {"off": run(0.25), "off_seed1": run(0.4)}}),
                        "mobilenetv2": pen("mobilenetv2", {"15": {"on": run(0.5)}})}, "meta": {}}  # fmt: skip
    owned = {("0.75x", "30", "off"), ("0.75x", "30", "off_seed1"), ("mobilenetv2", "15", "on")}
    merged = cifar10.merged_with_disk(disk, mine, ["penalty"], owned)["penalty"]
    assert merged["0.75x"]["budgets"]["30"] == {"off": run(0.25), "off_seed1": run(0.4), "on": run(0.1), "plan_seed1": run(0.3)}
    assert merged["mobilenetv2"]["budgets"] == {"15": {"on": run(0.5)}}
    old_layout = {"penalty": pen("0.75x", {"30": {"on": run(0.1)}}), "meta": {}}  # a file written before stop 34
    merged = cifar10.merged_with_disk(old_layout, mine, ["penalty"], owned)["penalty"]
    assert merged["0.75x"]["budgets"]["30"] == {"off": run(0.25), "off_seed1": run(0.4), "on": run(0.1)}
    # this invocation read "on" at 0.1 when it started; another re-pruned it since: the new row stays, while a copy
    # of the same run that only carries this invocation's newer re-timing replaces the disk's
    disk["penalty"]["0.75x"]["budgets"]["30"]["on"] = run(0.15, reprune={"command": "x"})
    mine["penalty"]["0.75x"]["budgets"]["30"].update(on=run(0.1, paired_p50_ms=0.2), plan_seed1=run(0.3, paired_p50_ms=0.3))
    merged = cifar10.merged_with_disk(disk, mine, ["penalty"], owned)["penalty"]["0.75x"]["budgets"]["30"]
    assert merged["on"] == run(0.15, reprune={"command": "x"}) and merged["plan_seed1"] == run(0.3, paired_p50_ms=0.3)


def test_the_hw_step_shares_one_peer_between_budgets_of_one_ratio_and_skips_budgets_whose_models_are_gone(
    tmp_path, monkeypatch
):
    """Stop 40: 20/30/50% against one stand-in model matched the peer to one ratio three times and trained it three
    times; and an earlier invocation's 10% budget, whose hwkd model had left /tmp, stopped the step (KeyError)."""
    import argparse

    import cifar10
    import cifar10_report as report

    model = tmp_path / "hwkd.onnx"
    model.write_bytes(b"x")
    trained = []
    monkeypatch.setattr(cifar10, "save", lambda args, out: None)
    monkeypatch.setattr(cifar10, "load_sets", lambda split_dir: {"train": [], "val": "val", "test": "test"})
    monkeypatch.setattr(cifar10, "load_teacher", lambda pt: torch.nn.Identity())
    monkeypatch.setattr(cifar10.teacher_mod, "DecodedFolder", lambda root, tf: "val" if root.name == "val" else [])
    monkeypatch.setattr(cifar10.peer, "calibration_images", lambda data: [])
    monkeypatch.setattr(cifar10.peer, "latency_grid", lambda teacher, ex, cal, work, targets, rounds, ratios, runs_per_round, threads: {
        "grid": {0.0: 1.0, 0.5: 0.5, 0.9: 0.2}, "targets": {k: 0.05 for k in targets}})  # fmt: skip
    monkeypatch.setattr(cifar10.peer, "prune_uniform", lambda teacher, ratio, ex: ratio)
    monkeypatch.setattr(cifar10.peer, "fine_tune", lambda m, data, epochs: trained.append(m) or [])
    monkeypatch.setattr(cifar10.peer, "export_int8", lambda m, ex, cal, path: (path.write_bytes(b"p"), path)[1])
    monkeypatch.setattr(cifar10.peer, "params_and_macs", lambda m, ex: (100, 1000))
    monkeypatch.setattr(cifar10.peer, "onnx_accuracy", lambda path, data: {"test": 0.5, "val": 0.45}[data])
    monkeypatch.setattr(cifar10, "time_together", lambda budgets, finals, rounds: None)
    run = {"returncode": 0, "model": str(model), "train_epochs": 17, "final": {"accuracy": 0.8}}
    monkeypatch.setattr(cifar10, "hwkd_compress", lambda *a, **k: {**run, "final": dict(run["final"])})
    gone = {"returncode": 0, "model": str(tmp_path / "gone.onnx"), "train_epochs": 29}
    earlier_peer = {"ratio": 0.9, "epochs": 29, "accuracy": 0.55, "model": str(tmp_path / "gone_peer.onnx")}
    out = {"hw": {"profile": "rpi4", "budgets": {"10": {"hwkd_penalty_on": gone, "hwkd_penalty_off": gone,
                                                        "peer": earlier_peer}}}}  # fmt: skip
    args = argparse.Namespace(runs=tmp_path, jobs=1, stand_in_pipeline=False, peer_at_budget=True, reuse_runs=False,
                              penalty_arms=None)  # fmt: skip
    cifar10.step_hw(args, {**cifar10.PROTOCOLS["full"], "budgets": [20, 30, 50]}, tmp_path, tmp_path / "t.pt", out)
    budgets = out["hw"]["budgets"]
    assert budgets["10"]["peer"] == earlier_peer  # stands as measured
    assert trained == [0.9, 0.5]  # the matched peer once, the 50% budget's own peer once (30% and 20% match 0.9)
    assert budgets["20"]["peer"]["model"] == budgets["30"]["peer"]["model"] == budgets["50"]["peer"]["model"]
    assert "same_as" not in budgets["20"]["peer"] and budgets["30"]["peer"]["same_as"] == "peer_20"
    assert budgets["50"]["peer_at_budget"]["ratio"] == 0.5 and "peer_at_budget" not in budgets["30"]
    # --reuse-runs keeps 20%'s peer, and the budgets after it share the kept one instead of training it again
    trained.clear()
    del budgets["30"]["peer"]  # e.g. a budget run for the first time beside one run before
    cifar10.step_hw(argparse.Namespace(**{**vars(args), "reuse_runs": True, "peer_at_budget": False}),
                    {**cifar10.PROTOCOLS["full"], "budgets": [20, 30]}, tmp_path, tmp_path / "t.pt", out)  # fmt: skip
    assert trained == [] and budgets["30"]["peer"]["model"] == budgets["20"]["peer"]["model"]
    # --hw-student: the student hwkd's out-of-reach message advises; its own run folders, named in the table
    calls = []
    monkeypatch.setattr(cifar10, "hwkd_compress", lambda *a, **k: calls.append((a[5].name, a[6])) or {**run, "final": dict(run["final"])})
    cifar10.step_hw(argparse.Namespace(**{**vars(args), "hw_student": "cnn", "stand_in_pipeline": True}),
                    {**cifar10.PROTOCOLS["full"], "budgets": [10]}, tmp_path, tmp_path / "t.pt", out)  # fmt: skip
    off = ["--set", "distill.penalty_weight=0", "--set", "prune.penalty_weight=0"]
    assert calls == [("hw_10_on_cnn", ["--latency-budget", "10%", "--student", "cnn"]),
                     ("hw_10_off_cnn", ["--latency-budget", "10%", *off, "--student", "cnn"])]  # fmt: skip
    assert budgets["10"]["hwkd_penalty_on"]["student"] == "cnn"
    text = "\n".join(report.hw_section(out, tmp_path / "p.png"))
    # every hwkd run and trained peer read on the validation split too (stop 50), the margins on both splits
    assert ("| 10% (`--student cnn`) | 80.00% (val 45.00%) / – | 80.00% (val 45.00%) / – | 0.90 / 50.00% (val 45.00%) / – "
            "| +30.00 (val +0.00) | +0.00 (val +0.00) |") in text  # fmt: skip
    assert "| 20% | 80.00% (val 45.00%) / – |" in text  # the default student's budgets name none
    out["hw"]["budgets"] = dict(reversed(budgets.items()))  # as invocations added them: 50, 30, 20, 10
    text = "\n".join(report.hw_section(out, tmp_path / "p.png"))
    assert text.index("| 10% (") < text.index("| 20% |") < text.index("| 50% |")  # by budget, not by when run
    # --stand-in-penalty: the penalty step's default-student runs at 15% are the two arms (mask = hwkd's defaults)
    calls.clear()
    pen_run = {**run, "command": "hwkd compress --student mobilenetv2 --latency-budget 15% ...", "config": todays_recipe()}
    off_run = {**pen_run, "final": {"accuracy": 0.77}, "config": todays_recipe(distill={"penalty_weight": 0}, prune={"penalty_weight": 0})}
    out["penalty"] = {"mobilenetv2": {"student": "mobilenetv2", "profile": "rpi4", "budgets": {"15": {
        "mask": pen_run, "off": off_run, "mask_seed1": pen_run}}}}  # fmt: skip
    stand = argparse.Namespace(**{**vars(args), "stand_in_penalty": True, "hw_student": None})
    cifar10.step_hw(stand, {**cifar10.PROTOCOLS["full"], "budgets": [15]}, tmp_path, tmp_path / "t.pt", out)
    assert calls == []  # nothing trained
    on15, off15 = out["hw"]["budgets"]["15"]["hwkd_penalty_on"], out["hw"]["budgets"]["15"]["hwkd_penalty_off"]
    assert "`mask` run of `--student mobilenetv2`" in on15["stand_in"] and off15["final"]["accuracy"] == 0.77
    assert "| 15% | 80.00% / – (stand-in †) | 77.00% / – (stand-in †) |" in "\n".join(report.hw_section(out, tmp_path / "p.png"))
    assert cifar10.restates_defaults(dict(cifar10.PENALTY_ARMS)["mask"])  # what lets the mask run stand in
    assert not cifar10.restates_defaults(cifar10.COST_TARGET) and not cifar10.restates_defaults(["--set", "distill.epochs=3"])
    # a re-pruned row is not the same computation, and another student's step is not the default student's
    out["penalty"]["mobilenetv2"]["budgets"]["15"]["mask"] = {**pen_run, "reprune": {"before": {}}}
    cifar10.step_hw(stand, {**cifar10.PROTOCOLS["full"], "budgets": [15]}, tmp_path, tmp_path / "t.pt", out)
    assert [c[0] for c in calls] == ["hw_15_on"]
    calls.clear()  # stop 50: a mask run on the defaults before stop 48 (adaptive T) is another computation
    out["penalty"]["mobilenetv2"]["budgets"]["15"]["mask"] = {**pen_run, "config": todays_recipe(distill={"temperature_schedule": "adaptive"})}
    cifar10.step_hw(stand, {**cifar10.PROTOCOLS["full"], "budgets": [15]}, tmp_path, tmp_path / "t.pt", out)
    assert [c[0] for c in calls] == ["hw_15_on"]
    pts = [(0.061, 81.6, "50%"), (0.061, 81.6, "20%"), (0.049, 68.9, "10%"), (0.0612, 81.6, "30%"), (0.2, 60.0, "5%")]
    assert report.point_labels(pts) == {(0.061, 81.6): "20/30/50%", (0.049, 68.9): "10%", (0.2, 60.0): "5%"}


def test_final_models_are_timed_together_at_one_thread_with_thousands_of_runs_a_round(tmp_path, monkeypatch):
    """Stop 40: 1,000 runs in all (200 a round) at every core timed two byte-identical finals 0.042 and 0.051 ms."""
    import cifar10
    import cifar10_report as report

    from hwkd.onnx import bench

    seen = {}

    def fake_measure(paths, **kw):
        seen.update(kw, paths=list(paths))
        return {Path(p): type("S", (), {"p50": 0.05})() for p in paths}

    monkeypatch.setattr(bench, "measure", fake_measure)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    budgets = {"10": {"on": {}, "off": {}, "peer": {}}}
    cifar10.time_together(budgets, {("10", "on"): a, ("10", "off"): b, ("10", "peer"): a}, rounds=5)
    assert seen["paths"] == [a, b] and seen["threads"] == 1 and seen["rounds"] == 5
    assert seen["iterations"] / seen["rounds"] >= 2000  # runs a round, after measure splits them
    assert budgets["10"]["peer"]["paired_p50_ms"] == 0.05 and budgets["10"]["peer"]["paired_threads"] == 1
    assert report.timing_threads({1}) == "1 thread" and report.timing_threads({2}) == "2 threads"  # the plot's x-label
    assert report.timing_threads({1, None}) == "thread counts differ or not recorded"  # a pre-stop-40 row beside


def test_teacher_softness_reads_a_uniform_and_a_certain_teacher_right():
    """The softness figures at their two ends: equal logits are uniform (entropy ln 10, 0.9 off the true class)
    and a one-hot-confident teacher has no mass off it."""
    import math

    import teacher_softness

    class Fixed(torch.nn.Module):
        def __init__(self, scale):
            super().__init__()
            self.scale = scale

        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0, 0, 0].long(), 10).float() * self.scale

    data = [(torch.full((3, 2, 2), float(i % 10)), torch.tensor(i % 10)) for i in range(20)]
    flat = teacher_softness.softness(Fixed(0.0), data)
    assert math.isclose(flat["entropy_T1"], math.log(10), rel_tol=1e-5) and math.isclose(flat["off_target_mass_T4"], 0.9, rel_tol=1e-5)
    sure = teacher_softness.softness(Fixed(1000.0), data)
    assert sure["accuracy"] == 1.0 and sure["entropy_T4"] < 1e-6 and sure["off_target_mass_T4"] < 1e-6


def test_each_pipeline_run_names_the_kd_recipe_its_report_states():
    """The same command is another recipe once hwkd's default changes, so a row names the one it ran."""
    import cifar10

    def rep(**details):
        return {"stages": [{"name": "distill", "details": {"kd": "hinton", "temperature": 4.0, **details}}, {"name": "qat"}]}

    assert cifar10.distill_recipe(rep(temperature_schedule="constant")) == "hinton, T=4"
    assert cifar10.distill_recipe(rep(temperature_schedule="adaptive")) == "hinton, adaptive T from 4"
    assert cifar10.distill_recipe(rep(temperature_schedule="multi")) == "hinton, multi-T"
    assert cifar10.distill_recipe({"stages": [{"name": "qat", "details": {}}]}) is None  # --skip distill


def test_a_runs_teacher_and_final_model_are_scored_on_the_validation_split(tmp_path, monkeypatch):
    import cifar10

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "model.onnx").write_bytes(b"final")
    scored, loaded = [], []
    monkeypatch.setattr(cifar10.teacher_mod, "DecodedFolder", lambda root, tf: loaded.append(root) or "val-set")
    monkeypatch.setattr(cifar10.peer, "onnx_accuracy", lambda path, data: scored.append((path.name, data)) or 0.81234)
    res = {"returncode": 0, "run_dir": str(run_dir), "model": str(run_dir / "model.onnx"), "teacher": {}, "final": {}}
    cifar10.score_on_val(res, tmp_path / "split")
    assert res["final"] == {"val_accuracy": 0.8123} and res["teacher"] == {}  # no teacher.onnx: left without
    assert scored == [("model.onnx", "val-set")] and loaded == [tmp_path / "split" / "val"]
    (run_dir / "teacher.onnx").write_bytes(b"teacher")
    cifar10.score_on_val(res, tmp_path / "split")
    assert res["teacher"] == {"val_accuracy": 0.8123} and len(loaded) == 2  # the split decoded once per run
    failed = {"returncode": 1, "run_dir": str(run_dir), "model": str(run_dir / "model.onnx"), "teacher": {}, "final": {}}
    cifar10.score_on_val(failed, tmp_path / "split")
    assert failed["final"] == {} and len(scored) == 3
    committed = tmp_path / "committed.onnx"
    committed.write_bytes(b"final")
    monkeypatch.setattr(cifar10, "ROOT", tmp_path)
    gone = {"returncode": 0, "run_dir": str(tmp_path / "gone"), "model": str(tmp_path / "gone" / "model.onnx"),
            "committed_model": "committed.onnx", "teacher": {}, "final": {}}  # fmt: skip
    cifar10.score_on_val(gone, tmp_path / "split")  # the run folder is gone: its committed copy is the same bytes
    assert gone["final"] == {"val_accuracy": 0.8123} and scored[-1][0] == "committed.onnx" and gone["teacher"] == {}


def test_the_pipeline_table_shows_the_kd_recipe_and_the_validation_split():
    import cifar10_report as report

    m = {"accuracy": 0.8, "params": 1000, "macs": 2e6, "measured_latency_ms": 0.1, "estimated_latency_ms": 0.2,
         "precision": "int8"}  # fmt: skip
    run = {"command": "hwkd compress --profile rpi4", "returncode": 0, "wall_s": 10.0, "kd": "hinton, T=4",
           "teacher": {**m, "val_accuracy": 0.9}, "final": {**m, "val_accuracy": 0.7936}}  # fmt: skip
    rows = [line for line in report.pipeline_section({"pipeline": {"rpi4": run}}) if line.startswith("| rpi4 |")]
    assert rows[0].startswith("| rpi4 |  | teacher | 80.00% | 90.00% |")  # the teacher is not distilled
    assert rows[1].startswith("| rpi4 | hinton, T=4 | final (int8) | 80.00% | 79.36% |")
    goal = [line for line in report.pipeline_section({"pipeline": {"rpi4": run}}) if line.startswith("- rpi4:")][0]
    assert "100.0% of the teacher's accuracy on test (goal >= 95%: met), 88.2% on validation (NOT met)." in goal
    without_teacher_val = {**run, "teacher": m}  # the run folder was gone: the cached teacher's score stands in
    lines = report.pipeline_section({"pipeline": {"rpi4": without_teacher_val}, "teacher": {"val_acc": 0.8}})
    assert "99.2% on validation (met)." in [line for line in lines if line.startswith("- rpi4:")][0]
    old = {**run, "teacher": m, "final": m}
    del old["kd"]  # a run recorded before either field existed
    rows = [line for line in report.pipeline_section({"pipeline": {"rpi4": old}}) if line.startswith("| rpi4 |")]
    assert rows[1].startswith("| rpi4 | – | final (int8) | 80.00% | – |")


def test_penalty_runs_are_read_on_the_validation_split_and_their_margins_on_both(tmp_path, monkeypatch):
    """Stop 50: the penalty and hw rows had test scores only, so a margin of a point could not be checked against
    the validation split as the pipeline rows are; each run is now scored there and each − off shown on both."""
    import argparse

    import cifar10
    import cifar10_report as report

    scored = []
    acc = {("mask", 0): (0.815, 0.80), ("off", 0): (0.80, 0.805), ("mask", 1): (0.82, 0.81), ("off", 1): (0.80, 0.80)}

    def fake_compress(args, proto, split_dir, teacher_pt, profile, run_dir, extra=(), earlier=None):
        arm, seed = run_dir.name.split("_")[3], int(run_dir.name.partition("_seed")[2] or 0)
        return {"returncode": 0, "command": run_dir.name, "run_dir": str(run_dir), "model": str(run_dir / "model.onnx"),
                "final": {"accuracy": acc[arm, seed][0], "params": 1000, "macs": 1e6, "estimated_latency_ms": 0.5},
                "stages": [], "budget": {"latency_ms": 0.6}}  # fmt: skip

    def fake_val(res, split_dir):
        scored.append(Path(res["run_dir"]).name)
        arm, seed = Path(res["run_dir"]).name.split("_")[3], int(res["run_dir"].partition("_seed")[2] or 0)
        res["final"]["val_accuracy"] = acc[arm, seed][1]

    monkeypatch.setattr(cifar10, "hwkd_compress", fake_compress)
    monkeypatch.setattr(cifar10, "score_on_val", fake_val)
    monkeypatch.setattr(cifar10, "save", lambda args, out: None)
    args = argparse.Namespace(penalty_student="0.75x", budgets="20", runs=tmp_path, jobs=1, penalty_seeds="0,1",
                              penalty_arms="mask,off")  # fmt: skip
    out: dict = {}
    cifar10.step_penalty(args, cifar10.PROTOCOLS["full"], tmp_path, tmp_path / "t.pt", out)
    assert sorted(scored) == ["penalty_0.75x_20_mask", "penalty_0.75x_20_mask_seed1", "penalty_0.75x_20_off",
                              "penalty_0.75x_20_off_seed1"]  # fmt: skip
    text = "\n".join(report.penalty_section(out))
    assert "| 20% (0.600 ms) | 0 | mask | 81.50% (val 80.00%) |" in text and "| +1.50 (val -0.50) |" in text
    assert "| 20% (0.600 ms) | 1 | mask | 82.00% (val 81.00%) |" in text and "| +2.00 (val +1.00) |" in text
    assert "20% mask − off: mean +1.75 over 2 seeds (+1.50, +2.00), on validation +0.25 (-0.50, +1.00)." in text
    # a row read on test only (before stop 50) keeps its cell and takes the paired mean on test alone
    del out["penalty"]["0.75x"]["budgets"]["20"]["off_seed1"]["final"]["val_accuracy"]
    text = "\n".join(report.penalty_section(out))
    assert "| 20% (0.600 ms) | 1 | off | 80.00% |" in text and "| +2.00 |" in text
    assert "mean +1.75 over 2 seeds (+1.50, +2.00)." in text


def test_the_cost_line_sums_every_run_the_results_hold():
    """The protocol's cost as run: hwkd runs by their stages (a resumed one's every launch, not its last wall),
    one plateau loop counted once per seed whatever number of methods it trained, stand-ins and a peer shared by
    budgets not counted twice; the newest invocation's walls beside it."""
    import cifar10_report as report

    def run(stages, wall=1.0, **extra):
        return {"stages": [{"name": n, "seconds": s} for n, s in stages], "wall_s": wall, **extra}

    resumed = run([("distill", 3000.0), ("prune", 600.0)], wall=100.0, resumed=True, run_dir="/r/pen_mask")
    peer = {"model": "/r/peer_20.onnx", "wall_s": 360.0}
    r = {
        "meta": {"step_wall_s": {"penalty": 100.0}, "wall_s_so_far": 101.0},
        "teacher": {"train_s": 7200.0},
        "pipeline": {"rpi4": run([("distill", 1000.0), ("qat", 200.0)], run_dir="/r/p")},
        "plateau": {"epochs": 40, "seeds": {  # seed 0: two loops (two invocations); seed 1: one loop of two methods
            "0": {"student_alone": {"wall_s": 3600.0}, "hinton_T4": {"wall_s": 3600.5}, "dkd": {"wall_s": 1800.0}},
            "1": {"student_alone": {"wall_s": 3000.0}, "hinton_T4": {"wall_s": 3001.0}}}},
        "hw": {"budgets": {
            "15": {"hwkd_penalty_on": {**resumed, "stand_in": "the penalty step's"}, "peer": {**peer, "model": "/r/peer_15.onnx"}},
            "20": {"hwkd_penalty_on": run([("distill", 50.0)], run_dir="/r/hw20"), "peer": peer},
            "30": {"hwkd_penalty_on": run([("distill", 50.0)], run_dir="/r/hw20"), "peer": peer,
                   "peer_at_budget": {"model": "/r/peer_30_budget.onnx", "wall_s": 240.0}}}},
        "penalty": {"mobilenetv2": {"profile": "rpi4", "budgets": {"15": {
            "mask": resumed, "off": {"returncode": 1, "wall_s": 30.0}}}}},
    }
    costs = report.run_costs(r)
    assert costs == {"teacher": (1, 7200.0), "pipeline": (1, 1200.0), "plateau": (5, 3600.5 + 1800.0 + 3001.0),
                     "hw": (4, 50.0 + 360.0 + 360.0 + 240.0), "penalty": (2, 3600.0 + 30.0)}  # fmt: skip
    total = sum(s for _, s in costs.values())
    line = report.cost_lines(r)[0]
    assert f"**{total / 3600:.2f} h in all**" in line
    assert "teacher 2.00 h (1 run), pipeline 0.33 h (1 run)" in line and "penalty 1.01 h (2 runs)" in line
    assert line.endswith("The newest invocation of each step took: penalty 100 s; this invocation 101 s.")
    assert report.run_costs({"meta": {}}) == {}
