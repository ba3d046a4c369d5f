"""Inputs for timing any ONNX graph: named shapes, dynamic dimensions, integer and boolean inputs.

Third-party graphs (detectors with dynamic H/W, text models with int64 token ids and masks) need more
than "one float tensor with a dynamic batch". The rules, in order:

- ``--shape NAME=1,3,640,640`` gives the full shape of input NAME; ``--shape height=640`` sets a named
  symbolic dimension everywhere it appears. Values a full shape gives to named dimensions propagate
  to other inputs that share the name.
- A dynamic first dimension is the batch: ``batch`` (from ``--batch``) fills it, or, when no batch was
  asked for, the value from ``--shape`` (default 1).
- Any other dimension left open is an error that names the input and shows the flag to pass.
- ``--input NAME=FILE.npy`` feeds real data; it fixes that input's shape.

Random data: floats are standard normal; integers feeding a Gather on a constant table are uniform over
the table's rows (token ids into an embedding); other integers are ones (masks), or zeros when they
index something whose size is unknown; booleans are True.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hwkd.errors import ConfigError, ModelError

NP_DTYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int16)": np.int16,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(uint16)": np.uint16,
    "tensor(uint32)": np.uint32,
    "tensor(uint64)": np.uint64,
    "tensor(bool)": np.bool_,
}
# Ops whose integer input is an index: a value out of range would make the run fail.
# op -> position of its index input.
_INDEX_INPUT = {"Gather": 1, "GatherElements": 1, "GatherND": 1, "ScatterElements": 1, "ScatterND": 1, "OneHot": 0}


@dataclass(frozen=True)
class InputSpec:
    """One graph input as the session declares it: fixed dims are ints, dynamic ones a name or None."""

    name: str
    type: str  # ORT type string, e.g. "tensor(float)"
    dims: tuple[int | str | None, ...]

    @property
    def dtype(self) -> Any:
        if self.type not in NP_DTYPES:
            raise ModelError(
                f"Input {self.name!r} has type {self.type}, which hwkd cannot fill with test data.",
                f"Feed it real data with --input {self.name}=FILE.npy.",
            )
        return NP_DTYPES[self.type]

    def is_dynamic(self, i: int) -> bool:
        return i < len(self.dims) and not (isinstance(self.dims[i], int) and self.dims[i] > 0)

    def shown(self) -> str:
        return "[" + ", ".join(str(d) if d not in (None, "") else "?" for d in self.dims) + "]"


# dim_param values that name nothing: exporters write "?" (and "") for "unknown", and two such dims
# are not the same size. They are anonymous, like a dim with neither value nor name.
ANONYMOUS_DIMS = ("", "?")


def input_specs(session: Any) -> list[InputSpec]:
    """The session's inputs; symbolic dims keep their names, anonymous dynamic dims are None."""
    specs = []
    for inp in session.get_inputs():
        dims = tuple(
            d if isinstance(d, int) and d > 0 else (d if isinstance(d, str) and d not in ANONYMOUS_DIMS else None)
            for d in inp.shape
        )
        specs.append(InputSpec(inp.name, inp.type, dims))
    return specs


def applicable(specs: Sequence[InputSpec], keys: Sequence[str]) -> list[str]:
    """The ``--shape`` / ``--input`` keys that name an input or a named dimension of this model."""
    names = {s.name for s in specs} | {d for s in specs for d in s.dims if isinstance(d, str)}
    return [k for k in keys if k in names]


def parse_shape_flags(items: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """``["images=1,3,640,640", "seq=128"]`` -> ``{"images": (1, 3, 640, 640), "seq": (128,)}``."""
    out: dict[str, tuple[int, ...]] = {}
    for item in items:
        name, sep, raw = item.rpartition("=")
        values = [v.strip() for v in raw.strip().split(",")]
        if not sep or not name.strip() or not values or not all(v.isdigit() and int(v) > 0 for v in values):
            raise ConfigError(
                f"--shape {item!r} is not NAME=D0,D1,... with positive integers.",
                "Example: --shape images=1,3,640,640 (a full input shape) or --shape height=640 (a named dimension).",
            )
        out[name.strip()] = tuple(int(v) for v in values)
    return out


def parse_input_flags(items: Sequence[str]) -> dict[str, Path]:
    """``["ids=tokens.npy"]`` -> ``{"ids": Path("tokens.npy")}``; the files must exist."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, raw = item.partition("=")
        if not sep or not name.strip() or not raw.strip():
            raise ConfigError(f"--input {item!r} is not NAME=FILE.npy.", "Example: --input input_ids=ids.npy")
        path = Path(raw.strip())
        if not path.is_file():
            raise ConfigError(f"--input {item!r}: the file {str(path)!r} does not exist.")
        out[name.strip()] = path
    return out


def load_input_files(files: Mapping[str, Path]) -> dict[str, np.ndarray]:
    arrays = {}
    for name, path in files.items():
        try:
            arrays[name] = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--input {name}={path}: not a readable .npy array ({exc}).") from exc
    return arrays


def _open_dims_message(spec: InputSpec, open_dims: list[int], model: str) -> str:
    """Which dims are open and the --shape that fills them; anonymous dims are named by position."""
    example = []
    for i, d in enumerate(spec.dims):
        if not spec.is_dynamic(i):
            example.append(str(d))
        elif i == 0:
            example.append("1")
        else:
            example.append(f"<{d or f'dim{i}'}>")
    names = [spec.dims[i] or f"dim{i}" for i in open_dims]
    named = [spec.dims[i] for i in open_dims if spec.dims[i]]
    extra = f" (or set the named dimension{'s' if len(named) > 1 else ''} with " + " ".join(
        f"--shape {n}=N" for n in named
    ) + ")" if named else ""
    return (
        f"Input {spec.name!r} of {model} has dynamic dimension{'s' if len(names) > 1 else ''} "
        f"{', '.join(map(str, names))} (shape {spec.shown()}) that hwkd cannot choose: "
        f"pass --shape {spec.name}={','.join(example)}{extra}. A dynamic first dimension is the batch "
        "and comes from --batch."
    )


def resolve_shapes(
    specs: Sequence[InputSpec],
    batch: int | None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    arrays: Mapping[str, np.ndarray] | None = None,
    model: str = "the model",
) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for every input (see the module docstring for the rules).

    Example: an input ``[batch, 3, height, width]`` with ``shapes={"height": (480,), "width": (640,)}``
    and ``batch=8`` -> ``(8, 3, 480, 640)``.
    """
    shapes = dict(shapes or {})
    arrays = dict(arrays or {})
    by_name = {s.name: s for s in specs}
    symbols: dict[str, int] = {}
    all_symbols = {d for s in specs for i, d in enumerate(s.dims) if isinstance(d, str) and i > 0}
    batch_symbols = {s.dims[0] for s in specs if s.dims and isinstance(s.dims[0], str)}
    for key in [k for k in shapes if k in batch_symbols and k not in by_name and k not in all_symbols]:
        value = shapes.pop(key)  # --shape batch=4 names the batch dimension: it is the batch
        if len(value) != 1:
            raise ConfigError(f"--shape {key}=...: a named dimension takes one value (e.g. --shape {key}=4).")
        if batch is None:
            batch = value[0]
    for key in list(shapes) + list(arrays):
        if key not in by_name and (key not in shapes or key not in all_symbols):
            what = "--shape" if key in shapes else "--input"
            raise ConfigError(
                f"{what} {key}: {model} has no input (or named dimension) {key!r}.",
                f"Its inputs: {', '.join(f'{s.name} {s.shown()}' for s in specs)}.",
            )
    for key, value in shapes.items():
        if key not in by_name:
            if len(value) != 1:
                raise ConfigError(f"--shape {key}=...: a named dimension takes one value (e.g. --shape {key}=640).")
            symbols[key] = value[0]

    given: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if spec.name in arrays:
            given[spec.name] = tuple(arrays[spec.name].shape)
        elif spec.name in shapes:
            given[spec.name] = tuple(shapes[spec.name])
    # A full shape names values for symbolic dims, which other inputs sharing the symbol then take.
    for name, shape in given.items():
        spec = by_name[name]
        if len(shape) != len(spec.dims):
            raise ConfigError(
                f"The shape {list(shape)} given for input {name!r} of {model} has {len(shape)} dimensions; "
                f"the input has {len(spec.dims)} {spec.shown()}."
            )
        for i, (want, got) in enumerate(zip(spec.dims, shape, strict=True)):
            if not spec.is_dynamic(i) and want != got:
                raise ConfigError(
                    f"The shape {list(shape)} given for input {name!r} of {model} sets dimension {i} to {got}, "
                    f"but the model fixes it at {want} {spec.shown()}."
                )
            if i > 0 and isinstance(want, str):
                if symbols.setdefault(want, got) != got:
                    raise ConfigError(
                        f"Dimension {want!r} is {symbols[want]} elsewhere but {got} in the shape given for {name!r}."
                    )

    explicit_batch = batch is not None
    if batch is None:  # the batch a full shape gives, else 1
        batch = next((shape[0] for n, shape in given.items() if shape and by_name[n].is_dynamic(0)), 1)
    out: dict[str, tuple[int, ...]] = {}
    for spec in specs:
        if spec.name in given:
            shape = list(given[spec.name])
            if explicit_batch and shape and spec.is_dynamic(0) and spec.name not in arrays:
                shape[0] = batch
            out[spec.name] = tuple(shape)
            continue
        shape, open_dims = [], []
        for i, d in enumerate(spec.dims):
            if not spec.is_dynamic(i):
                shape.append(d)
            elif i == 0:
                shape.append(batch)
            elif isinstance(d, str) and d in symbols:
                shape.append(symbols[d])
            else:
                open_dims.append(i)
                shape.append(0)
        if open_dims:
            raise ConfigError(_open_dims_message(spec, open_dims, model))
        out[spec.name] = tuple(shape)
    if explicit_batch and specs and not any(s.is_dynamic(0) for s in specs):
        s = next((s for s in specs if s.dims), None)
        if s is not None and s.dims[0] != batch:
            raise ConfigError(
                f"{model} has a fixed batch of {s.dims[0]} (input {s.name!r} {s.shown()}), so --batch {batch} "
                "cannot apply.",
                f"Leave --batch out, or pass --batch {s.dims[0]}.",
            )
    return out


def index_ranges(model_path: str | Path) -> dict[str, int | None]:
    """For graph inputs used as indices: the row count of the constant table they index (Gather on an
    initializer), or None when the size is unknown; inputs that index nothing are absent."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # noqa: BLE001 - ORT reports an unreadable model itself, with a better message
        return {}
    names = [i.name for i in model.graph.input]
    init_shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    init_shapes[node.output[0]] = tuple(attr.t.dims)
    ranges: dict[str, int | None] = {}
    wanted = set(names)
    for node in model.graph.node:
        pos = _INDEX_INPUT.get(node.op_type)
        if pos is None or len(node.input) <= pos:
            continue
        name = node.input[pos]
        if name in wanted:
            high = None
            if node.op_type == "Gather" and node.input[0] in init_shapes:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
                dims = init_shapes[node.input[0]]
                if dims:
                    high = int(dims[axis])
            prev = ranges.get(name, high)
            ranges[name] = None if prev is None or high is None else min(prev, high)
    return ranges


def make_feed_arrays(
    specs: Sequence[InputSpec],
    shapes: Mapping[str, tuple[int, ...]],
    rng: np.random.Generator,
    arrays: Mapping[str, np.ndarray] | None = None,
    ranges: Mapping[str, int | None] | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """``({name: array}, {name: how it was filled})`` for one batch size."""
    arrays = dict(arrays or {})
    ranges = dict(ranges or {})
    feed, fills = {}, {}
    for spec in specs:
        shape = shapes[spec.name]
        if spec.name in arrays:
            arr = arrays[spec.name]
            if arr.dtype != spec.dtype:
                arr = arr.astype(spec.dtype)
            feed[spec.name], fills[spec.name] = np.ascontiguousarray(arr), "from file"
            continue
        dtype = spec.dtype
        if np.issubdtype(dtype, np.floating):
            feed[spec.name], fills[spec.name] = rng.standard_normal(shape).astype(dtype), "normal(0, 1)"
        elif dtype == np.bool_:
            feed[spec.name], fills[spec.name] = np.ones(shape, dtype=dtype), "true"
        elif spec.name in ranges and ranges[spec.name]:
            high = int(min(ranges[spec.name], np.iinfo(dtype).max))
            feed[spec.name] = rng.integers(0, high, size=shape, dtype=dtype)
            fills[spec.name] = f"uniform integers in [0, {high})"
        elif spec.name in ranges:
            feed[spec.name], fills[spec.name] = np.zeros(shape, dtype=dtype), "zeros (indexes a table of unknown size)"
        else:
            feed[spec.name], fills[spec.name] = np.ones(shape, dtype=dtype), "ones"
    return feed, fills
