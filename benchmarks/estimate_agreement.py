"""Does the estimate a run prunes by equal ``hwkd estimate`` of the model it exports?

During training hwkd prices the PyTorch student (``cost.estimate``: hooks on layers plus a torch function
mode for ops written in ``forward``); users and CI price the exported ONNX (``hwkd estimate model.onnx``,
the path ``predictor_accuracy.py`` checks against measured latency). The two must agree, or a run's
"budget met" is a claim about a different graph. This script builds the models predictor_accuracy uses
(the zoo grid and the torchvision/timm 224 px set, exported with hwkd's exporter, INT8 by onnxruntime's
static QDQ quantization) plus the committed CIFAR-10 default-pipeline INT8 model (torchao PT2E QAT export),
and compares both estimates per model and precision on a profile. Nothing is timed.

    python benchmarks/estimate_agreement.py                  # rpi4; ~6 min on 2 cores
    python benchmarks/estimate_agreement.py --quick          # 11 pairs, to estimate_agreement_quick.*
    python benchmarks/estimate_agreement.py --profile jetson --tag jetson
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import predictor_accuracy as pa  # noqa: E402

from hwkd.artifacts import atomic_write, write_json  # noqa: E402
from hwkd.hardware.cost import estimate, estimate_onnx, trace_onnx, trace_torch  # noqa: E402
from hwkd.hardware.profiles import load_profile  # noqa: E402
from hwkd.models.zoo import ZOO  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
# The committed default-pipeline model of the CIFAR-10 benchmark and the architecture it was trained as.
CIFAR_INT8 = RESULTS / "cifar10" / "e30" / "rpi4_int8.onnx"


# Architectures whose forward writes much of its work itself (permutes around a LayerNorm, F.* calls,
# attention's matmuls), outside the families predictor_accuracy times: where the PyTorch-side trace has
# the most to miss. Exported and quantized the same way; shown as their own group.
FORWARD_WRITTEN = ("convnext_atto", "vit_tiny_patch16_224")
PT2E_FAMILY = "arm"  # rpi4's and jetson's CPU family: the quantizer a run on those profiles uses


def torch_model(row: dict) -> torch.nn.Module:
    if row["group"] == "benchmark":
        arch, width = row["model"].split("-w")[0], float(row["model"].split("-w")[1].split("-r")[0])
        return ZOO.get(arch)(num_classes=10, in_channels=3, width=width).eval()
    return pa.build_224(row["model"]).eval()


def export_forward_written(root: Path) -> list[dict]:
    import numpy as np
    import timm

    from hwkd.hardware.calibrate import quantize
    from hwkd.onnx.export import export_onnx

    rows, rng = [], np.random.default_rng(0)
    for name in FORWARD_WRITTEN:
        model = timm.create_model(name, pretrained=False).eval()
        fp32 = export_onnx(model, torch.randn(1, 3, 224, 224), root / f"{name}-fp32.onnx", {}, name=name)
        int8 = quantize(fp32, root / f"{name}-int8.onnx", rng)
        pt2e = export_pt2e(model, root / f"{name}-pt2e.onnx")
        rows += [{"model": label, "group": "forward-written ops (timm 224px)", "resolution": 224, "precision": prec,
                  "path": path, "build": model}
                 for label, path, prec in ((name, fp32, "fp32"), (f"{name} (ORT static QDQ)", int8, "int8"),
                                           (f"{name} (hwkd PT2E)", pt2e, "int8"))]  # fmt: skip
    return rows


def export_pt2e(model: torch.nn.Module, path: Path) -> Path:
    """``model`` quantized as the pipeline's qat stage does (torchao PT2E, hwkd's quantizer for the profile's CPU
    family, observers fed two random batches, no training) and exported as its export stage does: the INT8
    graph a run's estimate stands for, where ORT's quantizer places its Q/DQ pairs elsewhere."""
    import copy

    from hwkd.onnx.export import export_onnx
    from hwkd.stages.qat import convert, prepare_qat

    x = torch.randn(2, 3, 224, 224)
    prepared, _ = prepare_qat(copy.deepcopy(model).eval(), x, PT2E_FAMILY)
    with torch.no_grad():
        prepared(x)
    return export_onnx(convert(prepared), x[:1], path, {}, name=path.stem)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", default="rpi4")
    ap.add_argument("--tag", default="", help="results go to estimate_agreement[_TAG].{json,md}")
    ap.add_argument("--quick", action="store_true", help="three zoo models and one 224 px model")
    args = ap.parse_args()
    profile = load_profile(args.profile)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)  # reproducible exports; both estimates depend on shapes only, so a fresh
        # instance of each architecture (torch_model) is priced beside its export
        rows = pa.export_models(Path(tmp), args.quick)
        rows += [] if args.quick else export_forward_written(Path(tmp))
        models: dict[str, torch.nn.Module] = {}
        for row in rows:
            model = models.setdefault(row["model"], row.get("build") or torch_model(row))
            results.append(compare(row["model"], row["group"], row["precision"], model, row["resolution"],
                                   row["path"], profile))  # fmt: skip
    if CIFAR_INT8.is_file():  # the pipeline's own INT8 export, not ORT's quantizer
        student = ZOO.get("mobilenetv2")(num_classes=10, in_channels=3, width=1.0).eval()
        results.append(compare("cifar10 default student (pipeline export)", "hwkd pipeline", "int8", student, 32,
                               CIFAR_INT8, profile))  # fmt: skip
    summary = {"profile": args.profile, **agreement(results), "rows": results,
               "by_group": {g: agreement([r for r in results if r["group"] == g])
                            for g in dict.fromkeys(r["group"] for r in results)}}  # fmt: skip
    tag = "_".join(t for t in (args.tag, "quick" if args.quick else "") if t)
    stem = RESULTS / f"estimate_agreement{'_' + tag if tag else ''}"
    write_json(stem.with_suffix(".json"), summary)
    atomic_write(stem.with_suffix(".md"), render(summary))
    print(render(summary))
    return 0


def agreement(rows: list[dict]) -> dict:
    """How many pairs, the largest |PyTorch / ONNX - 1| in percent, and how many differ by more than 2%."""
    int8 = [r for r in rows if "qdq_ort" in r]
    return {"pairs": len(rows), "max_abs_diff_pct": round(max(abs(r["ratio"] - 1) for r in rows) * 100, 3),
            "off_by_more_than_2pct": sum(abs(r["ratio"] - 1) > 0.02 for r in rows),
            "int8_qdq_as_ort": f"{sum(r['qdq_onnx'] == r['qdq_ort'] for r in int8)}/{len(int8)}"}  # fmt: skip


def compare(name: str, group: str, precision: str, model: torch.nn.Module, res: int, path, profile) -> dict:
    x = torch.zeros(1, 3, res, res)
    from_torch = estimate(model, x, profile, precision).latency_ms
    from_onnx = estimate_onnx(path, profile, precision).latency_ms
    row = {"model": name, "group": group, "precision": precision, "torch_ms": round(from_torch, 4),
           "onnx_ms": round(from_onnx, 4), "ratio": round(from_torch / from_onnx, 5)}  # fmt: skip
    if precision == "int8":  # the Q/DQ nodes each side prices, against those ORT's optimised graph keeps
        row["qdq_torch"] = qdq_count(w.op for w in trace_torch(model, x, "int8"))
        row["qdq_onnx"] = qdq_count(w.op for w in trace_onnx(path)[0])
        row["qdq_ort"] = ort_qdq_count(path)
    return row


def qdq_count(ops) -> int:
    return sum(op in ("QuantizeLinear", "DequantizeLinear") for op in ops)


def ort_qdq_count(path) -> int:
    """QuantizeLinear + DequantizeLinear nodes in ONNX Runtime's optimised graph of ``path``: what it runs."""
    from hwkd.onnx.check import ort_executed_ops

    return qdq_count(ort_executed_ops(path).elements())


def render(s: dict) -> str:
    lines = [
        f"# PyTorch-side estimate vs `hwkd estimate` of the export (profile {s['profile']})",
        "",
        "Reproduce: `python benchmarks/estimate_agreement.py" + (f" --profile {s['profile']}" if s["profile"] != "rpi4" else "") + "`",
        "",
        f"**{s['pairs']} model/precision pairs; largest difference {s['max_abs_diff_pct']}%; "
        f"{s['off_by_more_than_2pct']} differ by more than 2%. INT8 graphs whose priced Q/DQ nodes are the ones "
        f"ONNX Runtime's optimised graph keeps: {s.get('int8_qdq_as_ort', '?')}.**",
        "",
        "Q/DQ: QuantizeLinear + DequantizeLinear nodes priced from PyTorch / priced from the ONNX file / left in ONNX "
        "Runtime's optimised graph (`SessionOptions.optimized_model_filepath`), the ones it runs.",
        "",
        "| group | pairs | largest difference | off by > 2% | INT8 Q/DQ as ORT runs |",
        "|---|---|---|---|---|",
        *(f"| {g} | {a['pairs']} | {a['max_abs_diff_pct']}% | {a['off_by_more_than_2pct']} | {a.get('int8_qdq_as_ort', '?')} |"
          for g, a in s.get("by_group", {}).items()),
        "",
        "| model | group | precision | PyTorch ms | ONNX ms | PyTorch / ONNX | Q/DQ: PyTorch / ONNX / ORT runs |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['model']} | {r['group']} | {r['precision']} | {r['torch_ms']:.4f} | {r['onnx_ms']:.4f} | {r['ratio']:.4f} | "
              + (f"{r['qdq_torch']} / {r['qdq_onnx']} / {r['qdq_ort']} |" if "qdq_ort" in r else "– |")
              for r in s["rows"]]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
