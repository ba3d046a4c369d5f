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
from sklearn.datasets import load_digits

PIL_FILTERS = {"bilinear": Image.BILINEAR, "nearest": Image.NEAREST, "bicubic": Image.BICUBIC}


def _resize(img: Image.Image, meta: dict) -> Image.Image:
    """resize ("exact" to H x W, or "shorter": the shorter side, aspect kept), then the center crop."""
    h, w = meta["resize"]
    if meta.get("resize_mode", "exact") == "shorter":
        short = h
        h, w = (short, int(short * img.width / img.height)) if img.height <= img.width else (int(short * img.height / img.width), short)
    img = img.resize((w, h), PIL_FILTERS[meta["interpolation"]])
    if meta.get("crop"):
        ch, cw = meta["crop"]
        top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
        img = img.crop((left, top, left + cw, top + ch))
    return img


def preprocess(raw: np.ndarray, meta: dict) -> np.ndarray:
    """raw: N x H x W pixel values -> N x 1 x H' x W' float32 model input, as the metadata says:
    resize -> center crop -> x * scale -> channel order -> (x - mean) / std."""
    scaled = raw.astype(np.float32) * meta["scale"]  # scale is linear: before or after the resize is the same
    resized = np.stack([np.asarray(_resize(Image.fromarray(img, mode="F"), meta)) for img in scaled])[:, None]
    if meta.get("channel_order", "rgb") == "bgr":
        resized = resized[:, ::-1]
    mean = np.asarray(meta["mean"], dtype=np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(meta["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return ((resized - mean) / std).astype(np.float32)


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
