"""The onnxruntime side of hwkd in one home.

- ``export``: PyTorch (FP32 modules, torchao INT8 GraphModules) -> ONNX with metadata; FP16 conversion.
- ``check``: ONNX Runtime for correctness: predictions, parity with PyTorch, accuracy, and the op
  types ORT really executes after its optimizer (what a regression in Q/DQ placement shows up in).
- ``ptq``: the peer, onnxruntime's own ``quantize_static`` as its users call it.
- ``bench``: the one place that times models (interleaved rounds); ``memory``: peak RSS of a model.
- ``host``: execution providers, threads and what this host's CPU is.
- ``inputs``: inputs for timing any graph (named shapes, dynamic and anonymous dimensions).

Submodules are imported by name (``from hwkd.onnx import check``), so ``import hwkd.onnx`` is cheap.
"""
