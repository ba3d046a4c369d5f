"""Knowledge-distillation losses behind a registry: adding one is one class and one registry line.

A loss sees the student's logits, each teacher's logits, the teacher weights and the hard labels, and
returns a dict of named terms; ``"loss"`` is the total that is back-propagated, the rest are logged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from hwkd.registry import Registry

KD_LOSSES: Registry[type[KDLoss]] = Registry("KD loss")


class KDLoss(ABC):
    """Interface: ``__call__(student_logits, teacher_logits, weights, labels) -> {"loss": ..., ...}``."""

    needs_teacher = True

    def __init__(self, temperature: float = 4.0, alpha: float = 0.7):
        self.temperature = temperature
        self.alpha = alpha

    @abstractmethod
    def __call__(self, student_logits, teacher_logits, weights, labels) -> dict[str, torch.Tensor]: ...


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target KL, scaled by T^2 so its gradients keep their size as T changes."""
    t = temperature
    log_p = F.log_softmax(student_logits / t, dim=1)
    q = F.softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * (t * t)


@KD_LOSSES.register("hinton")
class HintonKD(KDLoss):
    """(1 - alpha) * CE(labels) + alpha * T^2 * KL(teacher_T || student_T), teachers weighted."""

    def __call__(self, student_logits, teacher_logits, weights, labels):
        hard = F.cross_entropy(student_logits, labels)
        soft = sum(w * soft_kl(student_logits, t, self.temperature) for w, t in zip(weights, teacher_logits, strict=True))
        return {"loss": (1 - self.alpha) * hard + self.alpha * soft, "ce": hard, "kd": soft}


@KD_LOSSES.register("none")
class NoKD(KDLoss):
    """The student alone on hard labels: the baseline every KD recipe must beat."""

    needs_teacher = False

    def __call__(self, student_logits, teacher_logits, weights, labels):
        ce = F.cross_entropy(student_logits, labels)
        return {"loss": ce, "ce": ce}


def make_kd_loss(name: str, temperature: float, alpha: float) -> KDLoss:
    return KD_LOSSES.get(name)(temperature=temperature, alpha=alpha)
