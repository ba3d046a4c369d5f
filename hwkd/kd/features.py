"""Intermediate features for feature and relation KD, captured with forward hooks on named layers.

The training loop stays generic: a ``FeatureTap`` hooks the layers once, every forward pass of the
model refreshes what it holds, and the KD loss reads it after the forward. Layers are named
(``model.named_modules()`` names) or found automatically: the ends of the last three stages, where a
stage is a run of layers with the same spatial resolution.
"""

from __future__ import annotations

import torch
from torch import nn

from hwkd.errors import ConfigError


def _check_hookable(model: nn.Module, role: str) -> None:
    if isinstance(model, torch.jit.ScriptModule):
        raise ConfigError(
            f"Feature and relation KD need the {role}'s intermediate layers, but the {role} is a TorchScript file.",
            "Use a response KD (--kd hinton or dkd), or give the model as a state dict with --teacher-arch "
            "or as module:factory.",
        )


def auto_layers(model: nn.Module, example: torch.Tensor, count: int = 3) -> list[str]:
    """Names of the modules that end the last ``count`` spatial stages (deepest resolution last).

    One forward pass with a hook on every module records, in order of completion, which module last
    produced a 4-D output of each spatial size; a 1x1 output (after global pooling) is not a stage.
    """
    _check_hookable(model, "model")
    last_by_size: dict[tuple[int, int], str] = {}
    order: list[tuple[int, int]] = []
    handles = []

    def hook_for(name):
        def hook(_module, _inputs, output):
            if isinstance(output, torch.Tensor) and output.ndim == 4 and output.shape[-2:] != (1, 1):
                size = tuple(output.shape[-2:])
                if size not in last_by_size:
                    order.append(size)
                last_by_size[size] = name

        return hook

    for name, module in model.named_modules():
        if name:  # the model itself is not a stage
            handles.append(module.register_forward_hook(hook_for(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not order:
        raise ConfigError(
            f"Found no 4-D feature maps in {type(model).__name__} to distill.",
            "Name the layers with distill.student_layers / distill.teacher_layers, or use a response KD.",
        )
    return [last_by_size[size] for size in order[-count:]]


class FeatureTap:
    """Forward hooks that keep the latest outputs of named layers (and the classifier's input).

    Example::

        tap = FeatureTap(model, ["features.1", "features.2"], embedding_of=model.head)
        model(x)
        tap.maps, tap.embedding   # [N,C,H,W] tensors, [N,D] tensor
        tap.remove()
    """

    def __init__(self, model: nn.Module, layers: list[str], embedding_of: nn.Module | None = None):
        _check_hookable(model, "model")
        modules = dict(model.named_modules())
        missing = [name for name in layers if name not in modules]
        if missing:
            known = [n for n in modules if n][:12]
            raise ConfigError(
                f"Layer {missing[0]!r} is not in {type(model).__name__}.",
                f"Use names from model.named_modules(), e.g. {', '.join(known)}.",
            )
        self.layers = list(layers)
        self._outputs: dict[str, torch.Tensor] = {}
        self.embedding: torch.Tensor | None = None
        self._handles = [modules[name].register_forward_hook(self._keep(name)) for name in layers]
        if embedding_of is not None:
            self._handles.append(embedding_of.register_forward_pre_hook(self._keep_embedding))

    def _keep(self, name):
        def hook(_module, _inputs, output):
            self._outputs[name] = output

        return hook

    def _keep_embedding(self, _module, inputs):
        self.embedding = torch.flatten(inputs[0], 1)

    @property
    def maps(self) -> list[torch.Tensor]:
        return [self._outputs[name] for name in self.layers if name in self._outputs]

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._outputs = {}
        self.embedding = None
