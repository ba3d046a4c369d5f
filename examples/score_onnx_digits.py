"""Score an hwkd model.onnx on scikit-learn's digits using only what the ONNX file says about itself.

No hwkd and no torch: the preprocessing comes from the model's ``hwkd.preprocessing`` metadata
(scale raw pixels, resize with PIL, normalize), as a deployer's code would do it.

    python examples/score_onnx_digits.py runs/demo/model.onnx
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image
from sklearn.datasets import load_digits

PIL_FILTERS = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "bicubic": Image.BICUBIC}


def preprocess(raw: np.ndarray, meta: dict) -> np.ndarray:
    """raw: N x H x W pixel values -> N x 1 x H' x W' float32 model input."""
    h, w = meta["resize"]
    scaled = raw.astype(np.float32) * meta["scale"]
    resized = np.stack(
        [
            np.asarray(Image.fromarray(img, mode="F").resize((w, h), PIL_FILTERS[meta["interpolation"]]))
            for img in scaled
        ]
    )
    mean = np.asarray(meta["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(meta["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return ((resized[:, None] - mean) / std).astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    args = parser.parse_args()
    props = {p.key: p.value for p in onnx.load(args.model, load_external_data=False).metadata_props}
    meta = json.loads(props["hwkd.preprocessing"])
    labels = json.loads(props["hwkd.labels"])
    digits = load_digits()
    x = preprocess(digits.images, meta)
    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    logits = np.concatenate([session.run(None, {name: x[i : i + 256]})[0] for i in range(0, len(x), 256)])
    predicted = np.asarray(labels)[logits.argmax(1)]
    acc = float((predicted == digits.target.astype(str)).mean())
    print(json.dumps({"model": args.model, "images": len(x), "accuracy": round(acc, 4)}))


if __name__ == "__main__":
    main()
