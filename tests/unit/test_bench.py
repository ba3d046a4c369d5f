"""`hwkd bench` on third-party-style graphs: several inputs, named dynamic dims, int64 ids, batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from onnx_graphs import detector, fixed_cnn, text_classifier
from typer.testing import CliRunner

from hwkd import api
from hwkd.cli import app
from hwkd.errors import ConfigError
from hwkd.onnx import bench as ortbench
from hwkd.onnx import inputs as ortinputs

runner = CliRunner()
FAST = ["--warmup", "2", "--iterations", "12", "--rounds", "3", "--threads", "1"]


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    d = tmp_path_factory.mktemp("graphs")
    return {
        "det": detector(d / "det.onnx"),
        "det_big": detector(d / "det_big.onnx", channels=32, seed=1),
        "text": text_classifier(d / "text.onnx", vocab=50),
        "fixed": fixed_cnn(d / "fixed.onnx"),
    }


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_dynamic_dimension_error_names_input_and_flag(graphs):
    code, _, err = invoke("bench", graphs["det"], *FAST)
    assert code == 2
    assert "Traceback" not in err
    text = " ".join(err.split())
    assert "Input 'images' of det.onnx" in text and "height, width" in text
    assert "--shape images=1,3,<height>,<width>" in text
    assert "[batch, 3, height, width]" in text  # shapes are printed, not eaten as rich markup


def test_json_has_ordered_percentiles_and_shapes(graphs):
    code, out, err = invoke("bench", graphs["det"], "--shape", "images=1,3,24,32", "--json", *FAST)
    assert code == 0, err
    rec = json.loads(out)
    lat = rec["latency_ms"]
    assert set(lat) >= {"p50", "p90", "p99", "mean", "std"}
    assert 0 < lat["min"] <= lat["p50"] <= lat["p90"] <= lat["p99"]
    assert lat["std"] >= 0 and lat["mean"] >= lat["min"]
    (row,) = rec["results"]
    assert row["shapes"] == {"images": [1, 3, 24, 32], "scale": [1, 2]}  # batch symbol shared
    assert row["iterations"] == 12 and row["rounds"] == 3
    assert row["throughput_per_s"] == pytest.approx(1000 / lat["mean"], rel=0.01)
    (model,) = rec["models"]
    assert model["file_size_mb"] == pytest.approx(graphs["det"].stat().st_size / 1e6, abs=1e-4)
    # measured in a fresh process (this one's peak was set by its imports), as the pipeline and calibration do
    assert model["peak_memory_mb"] > 0
    assert "fresh process" in model["memory_method"]
    assert len(row["round_p50"]) == 3 and row["round_spread_pct"] >= 0
    assert rec["warnings"] == [] or "timing rounds" in rec["warnings"][0]  # this host may move; the rule is tested below


def test_a_p50_from_rounds_that_moved_is_warned_about_on_stderr_and_in_json(graphs, monkeypatch):
    monkeypatch.setattr(ortbench, "ROUND_SPREAD_WARN_PCT", -1.0)  # every spread counts as moved
    code, out, err = invoke("bench", graphs["fixed"], *FAST)
    assert code == 0, err
    text = " ".join(err.split())
    assert f"warning: {graphs['fixed']}: the p50s of its 3 timing rounds range from" in text  # the path as given
    code, out, _ = invoke("bench", graphs["fixed"], "--json", *FAST)
    (warning,) = json.loads(out)["warnings"]
    assert warning.startswith(f"{graphs['fixed']}: ")


def test_named_dimensions_batches_and_int64_ids(graphs):
    rec = api.benchmark(
        [graphs["text"], graphs["det"]],
        shapes=ortinputs.parse_shape_flags(["seq=16", "height=20", "width=20"]),
        batches=[1, 3],
        warmup=1, iterations=6, rounds=2, threads=1,
    )
    rows = {(r["model"], r["batch"]): r for r in rec["results"]}
    text, det = str(graphs["text"]), str(graphs["det"])
    assert rows[(text, 3)]["shapes"] == {"input_ids": [3, 16], "attention_mask": [3, 16]}
    assert rows[(det, 3)]["shapes"] == {"images": [3, 3, 20, 20], "scale": [3, 2]}
    assert rows[(text, 1)]["p50_ratio"] == 1.0
    assert rows[(det, 1)]["p50_ratio"] == pytest.approx(
        rows[(det, 1)]["latency_ms"]["p50"] / rows[(text, 1)]["latency_ms"]["p50"], rel=0.01
    )
    fills = {i["name"]: i["fill"] for i in rec["models"][0]["inputs"]}
    assert fills == {"input_ids": "uniform integers in [0, 50)", "attention_mask": "ones"}


def test_token_ids_stay_inside_the_embedding_table(graphs):
    session, _ = ortbench.make_session(graphs["text"], ["CPUExecutionProvider"], 1)
    specs = ortinputs.input_specs(session)
    assert [s.type for s in specs] == ["tensor(int64)", "tensor(int64)"]
    shapes = ortinputs.resolve_shapes(specs, 2, {"seq": (500,)})
    feed, _ = ortinputs.make_feed_arrays(specs, shapes, np.random.default_rng(0), ranges=ortinputs.index_ranges(graphs["text"]))
    ids = feed["input_ids"]
    assert ids.dtype == np.int64 and ids.shape == (2, 500)
    assert ids.min() >= 0 and ids.max() < 50 and len(np.unique(ids)) > 10  # random, and valid for Gather


def test_full_shape_checks_rank_and_fixed_dims(graphs):
    session, _ = ortbench.make_session(graphs["det"], ["CPUExecutionProvider"], 1)
    specs = ortinputs.input_specs(session)
    with pytest.raises(ConfigError, match="has 3 dimensions"):
        ortinputs.resolve_shapes(specs, None, {"images": (1, 24, 32)})
    with pytest.raises(ConfigError, match="fixes it at 3"):
        ortinputs.resolve_shapes(specs, None, {"images": (1, 4, 24, 32)})
    with pytest.raises(ConfigError, match="no input .*'imgs'"):
        ortinputs.resolve_shapes(specs, None, {"imgs": (1, 3, 24, 32)})
    # Without --batch the batch comes from the full shape, for every input sharing it.
    assert ortinputs.resolve_shapes(specs, None, {"images": (2, 3, 8, 8)}) == {"images": (2, 3, 8, 8), "scale": (2, 2)}
    # With --batch, the batch replaces the shape's first dimension.
    assert ortinputs.resolve_shapes(specs, 5, {"images": (2, 3, 8, 8)})["images"] == (5, 3, 8, 8)
    # The batch's own name sets it too.
    assert ortinputs.resolve_shapes(specs, None, {"batch": (3,), "height": (8,), "width": (9,)}) == {
        "images": (3, 3, 8, 9),
        "scale": (3, 2),
    }


@pytest.mark.parametrize(
    "flag", ["images", "images=", "images=1,3,x", "images=0,3,8,8", "=1,2"]
)
def test_malformed_shape_flag(flag):
    with pytest.raises(ConfigError, match="--shape"):
        ortinputs.parse_shape_flags([flag])


def test_fixed_batch_model_refuses_another_batch(graphs):
    code, _, err = invoke("bench", graphs["fixed"], "--batch", "2", *FAST)
    assert code == 2 and "fixed batch of 1" in err
    code, out, err = invoke("bench", graphs["fixed"], "--json", *FAST)
    assert code == 0, err
    assert json.loads(out)["results"][0]["batch"] == 1


def test_unknown_shape_key_with_several_models(graphs):
    code, _, err = invoke("bench", graphs["text"], graphs["fixed"], "--shape", "seq=8", "--shape", "heigth=8", *FAST)
    assert code == 2 and "heigth" in err and "no model" in " ".join(err.split())


def test_duration_bounds_the_timed_time(graphs):
    rec = api.benchmark([graphs["fixed"]], duration="150ms", warmup=3, rounds=2, threads=1)
    row = rec["results"][0]
    assert rec["settings"]["duration_s"] == pytest.approx(0.15) and rec["settings"]["iterations"] is None
    assert row["rounds"] == 2 and row["iterations"] >= 2
    timed_s = row["iterations"] * row["latency_ms"]["mean"] / 1e3
    # Each round runs until its share of the duration is over: the timed total is the duration, less
    # the loop's own time, plus at most one call per round past the deadline.
    assert 0.5 * 0.15 <= timed_s < 0.15 + 0.5


def test_iterations_and_duration_exclude_each_other(graphs):
    code, _, err = invoke("bench", graphs["fixed"], "--iterations", "5", "--duration", "1s")
    assert code == 2 and "not both" in err


@pytest.mark.parametrize("text", ["0s", "-1s", "fast", "10h"])
def test_bad_duration(text):
    with pytest.raises(ConfigError, match="duration"):
        api.parse_duration(text)


def test_profile_providers_fall_back_and_are_noted(graphs):
    code, out, err = invoke("bench", graphs["fixed"], "--profile", "jetson", "--json", *FAST)
    assert code == 0, err
    rec = json.loads(out)
    m = rec["models"][0]
    assert m["providers"] == ["CPUExecutionProvider"]
    assert "TensorrtExecutionProvider" in m["providers_missing"]
    assert rec["budget"]["latency_ms"] == 15.0 and rec["note"].endswith("not on jetson-orin-nano")
    code, out, err = invoke("bench", graphs["fixed"], "--profile", "jetson", *FAST)
    assert code == 0 and "fell back" in " ".join(out.split())


def test_input_file_feeds_real_data(graphs, tmp_path):
    ids = np.full((2, 7), 49, dtype=np.int32)  # cast to the model's int64
    np.save(tmp_path / "ids.npy", ids)
    rec = api.benchmark(
        [graphs["text"]], inputs={"input_ids": tmp_path / "ids.npy"}, warmup=0, iterations=2, rounds=1, threads=1
    )
    assert rec["results"][0]["shapes"] == {"input_ids": [2, 7], "attention_mask": [2, 7]}
    bad = tmp_path / "bad.npy"
    np.save(bad, np.full((2, 7), 50, dtype=np.int64))  # out of the table: onnxruntime fails, cleanly
    code, _, err = invoke("bench", graphs["text"], "--input", f"input_ids={bad}", *FAST)
    assert code == 2 and "ONNX Runtime failed to run text.onnx" in " ".join(err.split())


def test_missing_model_is_exit_2(tmp_path):
    code, _, err = invoke("bench", tmp_path / "nope.onnx")
    assert code == 2 and "nope.onnx" in err


def _anonymous_dims_model(path, dim_param):
    """Like PP-OCR's text classifier: input x [?, 3, ?, ?] (the same anonymous dim_param on N, H, W)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [dim_param, 3, dim_param, dim_param])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [dim_param, 3])
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["x"], ["y"], axes=[2, 3], keepdims=0)], "cls", [x], [y]
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("dim_param", ["?", ""])
def test_anonymous_dims_are_not_one_shared_symbol(tmp_path, dim_param):
    path = _anonymous_dims_model(tmp_path / "cls.onnx", dim_param)
    session, _ = ortbench.make_session(path, ["CPUExecutionProvider"], 1)
    specs = ortinputs.input_specs(session)
    assert specs[0].dims == (None, 3, None, None)
    # H=48 and W=192 differ: two anonymous dims, not one symbol "?"
    assert ortinputs.resolve_shapes(specs, None, {"x": (1, 3, 48, 192)}) == {"x": (1, 3, 48, 192)}
    with pytest.raises(ConfigError) as err:
        ortinputs.resolve_shapes(specs, None, {})
    assert "--shape x=1,3,<dim2>,<dim3>" in str(err.value) and "<?>" not in str(err.value)
    assert "named dimension" not in str(err.value)  # there is no name to set
    rec = api.benchmark([path], shapes={"x": (1, 3, 48, 192)}, batches=[2], warmup=1, iterations=3, rounds=1, threads=1)
    assert rec["results"][0]["shapes"] == {"x": [2, 3, 48, 192]}
