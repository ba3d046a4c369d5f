"""Score an hwkd model.onnx on scikit-learn's digits using only what the ONNX file says about itself.

No hwkd and no torch: the preprocessing comes from the model's ``hwkd.preprocessing`` metadata
(resize and center-crop with PIL, scale, channel order, normalize), as a deployer's code would do it.

    python examples/score_onnx_digits.py runs/demo/model.onnx
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import onnx
import onnxruntime as ort
from PIL import Image
from score_onnx_images import normalize, resize_and_crop  # the same directory: run as a script
from sklearn.datasets import load_digits


def preprocess(raw: np.ndarray, meta: dict) -> np.ndarray:
    """raw: N x H x W pixel values -> N x 1 x H' x W' float32 model input, as the metadata says:
    resize -> center crop -> x * scale -> channel order -> (x - mean) / std (scale is linear, so resizing the
    unscaled float image first is the same)."""
    images = [Image.fromarray(img.astype(np.float32), mode="F") for img in raw]
    return normalize(np.stack([np.asarray(resize_and_crop(img, meta)) for img in images])[:, None], meta)


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
