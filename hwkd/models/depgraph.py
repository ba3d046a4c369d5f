"""torch-pruning's DependencyGraph, built so that what it cannot follow stays unpruned instead of crashing.

DepGraph maps channel indices through reshapes (flatten before a linear head). A reshape that moves
channels elsewhere, such as ShuffleNet's channel shuffle (``view(b, g, c/g, h, w)``), makes
``update_reshape_index_mapping`` divide by zero (torch-pruning 1.6). hwkd builds the graph with that one
function made tolerant, records the reshapes it skipped, and leaves every layer whose channels flow
through one of them unpruned: those channel groups would otherwise be pruned with a wrong index mapping.
Any other exception from torch-pruning becomes a StageError that says what failed and how to go on.

Example::

    dg = dependency_graph(model, example)          # dg.hwkd_unprunable: {module: reason}
    pruner, skipped = base_pruner(model, example, importance=imp, pruning_ratio=0.3, ignored_layers=[head])
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch import nn

from hwkd.errors import HwkdError, StageError

_SHUFFLE_REASON = "its channels pass through a reshape torch-pruning cannot map (e.g. a channel shuffle)"
_FIX = (
    "Leave pruning out with --stages distill,qat,export,bench (or --set prune.mode=ratio --set prune.ratio=0.1), "
    "or pass --debug for the traceback to report it."
)


@contextlib.contextmanager
def torch_pruning_errors(model: nn.Module, what: str) -> Iterator[None]:
    """Turn an exception raised inside torch-pruning into a StageError naming the model and the operation."""
    try:
        yield
    except HwkdError:
        raise
    except Exception as exc:
        if not _where(exc):
            raise  # not torch-pruning's: let it through unchanged
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise StageError(
            f"torch-pruning failed while {what} on {type(model).__name__} ({type(exc).__name__}"
            + (f": {first}" if first else "")
            + f"{_where(exc)}).",
            _FIX,
        ) from exc


def _where(exc: BaseException) -> str:
    """' in torch_pruning/<file>:<function>' of the innermost torch-pruning frame, to name the operation."""
    tb, last = exc.__traceback__, None
    while tb is not None:
        if "torch_pruning" in tb.tb_frame.f_code.co_filename:
            last = tb
        tb = tb.tb_next
    if last is None:
        return ""
    code = last.tb_frame.f_code
    return f", in torch-pruning's {code.co_name}"


@contextlib.contextmanager
def _tolerant_reshape_mapping(skipped: list) -> Iterator[None]:
    """While building a graph, record (rather than crash on) reshapes whose index mapping fails."""
    from torch_pruning.dependency import index_mapping

    original = index_mapping.update_reshape_index_mapping

    def tolerant(graph, node):
        try:
            original(graph, node)
        except ZeroDivisionError:  # a reshape that is not a flatten, e.g. a channel shuffle
            skipped.append(node)

    index_mapping.update_reshape_index_mapping = tolerant
    try:
        yield
    finally:
        index_mapping.update_reshape_index_mapping = original


def _unprunable(skipped: list) -> dict[nn.Module, str]:
    """Every layer whose output channels reach a skipped reshape, found by walking the graph from it.

    The walk crosses anything that keeps channels one-to-one (BN, activations, adds, cat, split, depthwise
    convs) and stops at ordinary convs and linears: a conv met upstream produces those channels (leave it
    unpruned), one met downstream only consumes them. Grouping by torch-pruning itself would follow the
    broken mapping (and crash with an IndexError), which is why hwkd walks the graph on its own here.
    """
    from torch_pruning import ops

    stops = (ops.OPTYPE.CONV, ops.OPTYPE.LINEAR)
    out: dict[nn.Module, str] = {}
    seen: set[int] = set()
    todo = list(skipped)
    while todo:
        node = todo.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node.module, nn.Module) and node.type in (ops.OPTYPE.DEPTHWISE_CONV, ops.OPTYPE.BN):
            out[node.module] = _SHUFFLE_REASON
        for up in node.inputs:
            if up.type in stops:
                out[up.module] = _SHUFFLE_REASON
            else:
                todo.append(up)
        todo.extend(down for down in node.outputs if down.type not in stops)
    return out


def _tolerant_graph_class():
    """A DependencyGraph whose index-mapping updates (at build and at every get_pruning_group) tolerate
    the reshapes torch-pruning cannot map, so later grouping and pruning calls do not crash either."""
    import torch_pruning as tp

    class TolerantDependencyGraph(tp.DependencyGraph):
        def build_dependency(self, *args, **kwargs):
            skipped: list = []
            with _tolerant_reshape_mapping(skipped):
                out = super().build_dependency(*args, **kwargs)
            self.hwkd_unprunable = _unprunable(skipped)
            return out

        def get_pruning_group(self, *args, **kwargs):
            with _tolerant_reshape_mapping([]):
                return super().get_pruning_group(*args, **kwargs)

    return TolerantDependencyGraph


def dependency_graph(model: nn.Module, example_input: Any):
    """torch-pruning's DependencyGraph of ``model``; ``dg.hwkd_unprunable`` maps layers to leave alone to why."""
    with torch_pruning_errors(model, "tracing the model's channel dependencies"):
        return _tolerant_graph_class()().build_dependency(model, example_inputs=example_input, verbose=False)


def unprunable_layers(model: nn.Module, example_input: Any, check_groups: bool = False) -> dict[str, str]:
    """``{layer name: reason}`` for the layers hwkd will leave unpruned (empty for most models).

    ``check_groups`` also forms every channel group once, as pruning will, so that a torch-pruning
    failure surfaces now (``api.compress`` calls it before any training) rather than after hours of it.
    """
    names = {m: n for n, m in model.named_modules()}
    dg = dependency_graph(model, example_input)
    if check_groups:
        from hwkd.models.loaders import find_head

        with torch_pruning_errors(model, "grouping the channels that prune together"):
            ignored = [find_head(model), *dg.hwkd_unprunable]
            for _ in dg.get_all_groups(ignored_layers=ignored, root_module_types=(nn.Conv1d, nn.Conv2d, nn.Linear)):
                pass
    return {names.get(m, type(m).__name__): why for m, why in dg.hwkd_unprunable.items()}


def base_pruner(model: nn.Module, example_input: Any, *, ignored_layers: list[nn.Module], round_to: int = 1, **kwargs):
    """``tp.pruner.BasePruner`` that leaves the layers it cannot follow alone; returns (pruner, their names).
    ``round_to`` <= 1 means no rounding (torch-pruning's None)."""
    import torch_pruning as tp

    dg = dependency_graph(model, example_input)
    names = {m: n for n, m in model.named_modules()}
    with torch_pruning_errors(model, "setting up the pruner"), _tolerant_reshape_mapping([]):
        pruner = tp.pruner.BasePruner(
            model, example_input, ignored_layers=[*ignored_layers, *dg.hwkd_unprunable],
            round_to=round_to if round_to > 1 else None, **kwargs
        )
    pruner.DG.__class__ = type(dg)  # same graph, tolerant grouping in pruner.step()
    return pruner, sorted(names.get(m, "") for m in dg.hwkd_unprunable)
