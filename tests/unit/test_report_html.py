"""report.md / report.html from a synthetic report.json: self-contained, every plot present, regenerable."""

from __future__ import annotations

import base64
import html
import json
import re
import xml.etree.ElementTree as ET

import pytest
from report_fixtures import BASE, report
from typer.testing import CliRunner

from hwkd.cli import app
from hwkd.report import plots
from hwkd.report.html import render_html

runner = CliRunner()
SVG = "{http://www.w3.org/2000/svg}"


def _images(page: str) -> dict[str, ET.Element]:
    """figure id -> parsed SVG of its embedded image."""
    out = {}
    for fig_id, data in re.findall(r'<figure id="([\w-]+)"><img alt="[^"]*" src="data:image/svg\+xml;base64,([^"]+)"', page):
        out[fig_id] = ET.fromstring(base64.b64decode(data))
    return out


def _gids(svg: ET.Element) -> set[str]:
    return {el.get("id") for el in svg.iter(f"{SVG}g") if el.get("id")}


def test_html_is_self_contained_with_every_plot():
    page = render_html(BASE)
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page
    # Nothing is fetched: no URL in any src/href, no @import or url() in the CSS.
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "@import" not in page and "url(" not in page
    images = _images(page)
    assert set(images) == {"accuracy-latency", "estimated-measured", "channels", "size-memory"}
    assert {"latency-budget", "point-teacher", "point-distill", "point-prune"} <= _gids(images["accuracy-latency"])
    assert {"before", "after"} <= _gids(images["channels"])
    gids = _gids(images["size-memory"])
    assert {"bars-model_size_mb", "bars-estimated_memory_mb", "bars-measured_memory_mb", "memory-budget"} <= gids
    for name in ("teacher", "after distill", "after prune", "final (int8, model.onnx)"):
        assert name in page


def test_channel_bars_match_the_report():
    svg = ET.fromstring(plots.channels_per_layer(BASE))
    widths: dict[str, list[float]] = {"before": [], "after": []}
    for group in svg.iter(f"{SVG}g"):
        if group.get("id") in widths:  # one patch per layer, each tagged with its series
            for p in group.iter(f"{SVG}path"):
                d = p.get("d")
                widths[group.get("id")].append(float(re.findall(r"L ([\d.]+) ", d)[0]) - float(re.findall(r"M ([\d.]+) ", d)[0]))
    assert len(widths["before"]) == len(widths["after"]) == 3
    before = BASE["channels"]["before_prune"]
    after = BASE["channels"]["after_prune"]
    scale = widths["before"][1] / before["conv2"]
    assert widths["before"][0] == pytest.approx(scale * before["conv1"], rel=0.01)
    assert widths["after"][0] == pytest.approx(scale * after["conv1"], rel=0.01)
    assert widths["after"][1] == pytest.approx(scale * after["conv2"], rel=0.01)


def test_missing_data_says_why_instead_of_plotting():
    data = json.loads(json.dumps(BASE))
    data["channels"] = {"student_initial": {"conv1": 32}}
    for rec in [data["teacher"], *data["stages"], data["final"]]:
        rec["measured_latency_ms"] = None
    page = render_html(data)
    assert "The prune stage did not run" in page
    assert "No model has both a measured latency and an accuracy" in page
    assert set(_images(page)) == {"size-memory"}


def test_html_escapes_report_text():
    data = json.loads(json.dumps(BASE))
    data["profile"]["description"] = "<script>alert(1)</script>"
    assert "<script>" not in render_html(data)


def test_a_bench_warning_is_printed_beside_the_measured_latencies():
    from hwkd.report.markdown import render_markdown

    assert "Warning" not in render_markdown(BASE) and "Warning" not in render_html(BASE)
    rep = json.loads(json.dumps(BASE))
    rep["stages"][-1]["details"]["warnings"] = ["model.onnx: the p50s of its 5 timing rounds range from 1 to 1.3 ms"]
    md = render_markdown(rep)
    assert "\n\n**Warning:** model.onnx: the p50s of its 5 timing rounds range from 1 to 1.3 ms\n" in md
    assert '<p class="over"><b>Warning:</b> model.onnx: the p50s of its 5 timing rounds' in render_html(rep)


def test_report_command_regenerates_md_and_html(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    report(run / "report.json", measured_latency_ms=0.5)
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    md = (run / "report.md").read_text()
    assert "| **final (int8, model.onnx)** | 98.00% | 0.500 |" in md
    assert "peak memory MB (host)" in md
    assert _images((run / "report.html").read_text())


def test_report_command_bad_input_is_exit_2(tmp_path):
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "report.json" in result.stderr
    (tmp_path / "report.json").write_text('{"format": "hwkd.bench/1"}')
    result = runner.invoke(app, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "not a hwkd run report" in result.stderr


def test_estimates_of_fp32_models_are_marked_when_the_budget_is_for_int8():
    """Stop 39: a jetson report showed "after prune 0.318 ms" beside a 0.2616 ms budget that the run met: the
    teacher and stage rows were FP32 estimates, the budget and the final row INT8, with nothing saying so."""
    from hwkd.report.markdown import render_markdown

    rep = json.loads(json.dumps(BASE))
    rep["budget"].update(precision="int8", source={"latency_ms": "profile: 15% of teacher"})
    for m in (rep["teacher"], rep["stages"][0], rep["stages"][1]):
        m["estimated_precision"] = "fp32"
    for m in (*rep["stages"][2:], rep["final"]):
        m["estimated_precision"] = "int8"
    md, page = render_markdown(rep), render_html(rep)
    assert "| teacher | 99.00% | 1.200 | 1.600 (fp32) |" in md and "| after prune | 98.20% | 0.140 | 0.300 (fp32) |" in md
    assert "| **final (int8, model.onnx)** | 98.00% | 0.210 | 0.220 |" in md  # at the budget's precision: no mark
    note = ("Estimated ms and memory are at the budget's precision (int8) except where marked: a model marked fp32 is "
            "priced as the FP32 model it is at that point; the relative latency budget is a share of the teacher's "
            "fp32 estimate.")
    assert f"\n{note}\n" in md and f"<p>{html.escape(note)}</p>" in page and "<td>0.300 (fp32)</td>" in page
    # stop 40: the est. memory column had the same mix (an FP32 model's weights are 4x its INT8 ones)
    rep["teacher"]["estimated_memory_mb"], rep["final"]["estimated_memory_mb"] = 1.5, 0.4
    md, page = render_markdown(rep), render_html(rep)
    assert "| 1.180 | 1.500 (fp32) | 9.500 |" in md and "<td>1.500 (fp32)</td>" in page
    assert "| 0.044 | 0.400 | 2.900 |" in md  # the final, at the budget's precision
    # an fp32 deployment, or a report.json written before the field existed: nothing to mark
    assert "(fp32)" not in render_markdown(BASE) and "except where marked" not in render_html(BASE)
    rep["budget"]["precision"] = "fp32"
    rep["final"]["estimated_precision"] = "fp32"
    assert "except where marked" not in render_markdown({**rep, "stages": rep["stages"][:2]})
