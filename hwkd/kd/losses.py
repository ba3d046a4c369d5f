"""Knowledge-distillation losses behind a registry: adding one is one class and one registry line.

A *term* (a registered ``KDTerm``) measures how far the student is from one teacher on one batch:
response terms compare logits (Hinton KD, DKD), feature terms compare intermediate feature maps
(FitNets hints, attention transfer), relation terms compare how samples relate to each other (RKD,
similarity-preserving). ``KDLoss`` combines terms with weights, weights the teachers, and mixes in the
hard labels:

    loss = (1 - alpha) * CE + alpha * sum(w_i * response_i) + sum(w_j * feature_j)

(with no response term the cross-entropy keeps weight 1). A spec string names the terms:
``"hinton"``, ``"dkd"``, ``"hinton+at"``, ``"hinton+fitnet:0.5"`` (``NAME[:WEIGHT]`` joined by ``+``),
``"none"`` for the student alone. The returned dict holds ``"loss"`` (back-propagated), ``"ce"``,
``"kd"`` (the weighted distillation part) and each term by name; all are logged per epoch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from hwkd.errors import ConfigError
from hwkd.registry import Registry

KD_LOSSES: Registry[type[KDTerm]] = Registry("KD loss")


@dataclass
class KDBatch:
    """What a term sees for one teacher: logits, labels, and (if it asked) features and adapters."""

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    labels: torch.Tensor
    temperatures: tuple[tuple[float, float], ...] = ((4.0, 1.0),)  # (T, weight); several = fusion
    student_maps: list[torch.Tensor] = field(default_factory=list)
    teacher_maps: list[torch.Tensor] = field(default_factory=list)
    student_embedding: torch.Tensor | None = None
    teacher_embedding: torch.Tensor | None = None
    adapters: nn.ModuleList | None = None  # student -> teacher channels, one per map (FitNets)


class KDTerm(ABC):
    """Interface: ``__call__(batch) -> scalar``. ``uses`` says what it needs: logits, maps or embedding."""

    uses = "logits"  # "logits" (response) | "maps" (feature maps) | "embedding" (classifier input)
    default_weight = 1.0
    needs_adapters = False

    @abstractmethod
    def __call__(self, batch: KDBatch) -> torch.Tensor: ...


def soft_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target KL, scaled by T^2 so its gradients keep their size as T changes."""
    t = temperature
    log_p = F.log_softmax(student_logits / t, dim=1)
    q = F.softmax(teacher_logits / t, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * (t * t)


def fused(fn, temperatures) -> torch.Tensor:
    """Weighted sum of ``fn(T)`` over (T, weight) pairs: one pair = one temperature, several = fusion."""
    return sum(w * fn(t) for t, w in temperatures)


@KD_LOSSES.register("hinton")
class HintonTerm(KDTerm):
    """Hinton et al. 2015: T^2 * KL(teacher_T || student_T)."""

    def __call__(self, b):
        return fused(lambda t: soft_kl(b.student_logits, b.teacher_logits, t), b.temperatures)


@KD_LOSSES.register("dkd")
class DecoupledTerm(KDTerm):
    """Decoupled KD (Zhao et al. 2022): target-class KD + beta * non-target-class KD, each T^2-scaled.

    TCKD matches the binary (target vs rest) probabilities; NCKD matches the distribution among the
    non-target classes, which classic KD suppresses when the teacher is confident.
    """

    def __init__(self, tckd: float = 1.0, nckd: float = 8.0):
        self.tckd, self.nckd = tckd, nckd

    def __call__(self, b):
        return fused(lambda t: dkd_loss(b.student_logits, b.teacher_logits, b.labels, t, self.tckd, self.nckd), b.temperatures)


def dkd_loss(s, t, labels, temperature, alpha=1.0, beta=8.0):
    gt = F.one_hot(labels, s.shape[1]).bool()
    p_s, p_t = F.softmax(s / temperature, 1), F.softmax(t / temperature, 1)
    bin_s = torch.stack([(p_s * gt).sum(1), (p_s * ~gt).sum(1)], 1).clamp_min(1e-8)
    bin_t = torch.stack([(p_t * gt).sum(1), (p_t * ~gt).sum(1)], 1).clamp_min(1e-8)
    tckd = F.kl_div(bin_s.log(), bin_t, reduction="batchmean")
    # Mask the target class with a large negative logit, so the softmax is over the other classes only.
    log_s = F.log_softmax(s / temperature - 1000.0 * gt, 1)
    q_t = F.softmax(t / temperature - 1000.0 * gt, 1)
    nckd = F.kl_div(log_s, q_t, reduction="batchmean")
    return (alpha * tckd + beta * nckd) * temperature**2


def _match_size(teacher_map: torch.Tensor, size) -> torch.Tensor:
    """Pool a (larger) teacher map to the student's spatial size; interpolate if it is smaller."""
    if teacher_map.shape[-2:] == tuple(size):
        return teacher_map
    if teacher_map.shape[-2] >= size[0] and teacher_map.shape[-1] >= size[1]:
        return F.adaptive_avg_pool2d(teacher_map, size)
    return F.interpolate(teacher_map, size=tuple(size), mode="bilinear", align_corners=False)


@KD_LOSSES.register("fitnet")
class FitNetTerm(KDTerm):
    """FitNets hints (Romero et al. 2015): MSE between teacher maps and 1x1-adapted student maps."""

    uses = "maps"
    needs_adapters = True

    def __call__(self, b):
        losses = [
            F.mse_loss(adapter(s), _match_size(t, s.shape[-2:]))
            for adapter, s, t in zip(b.adapters, b.student_maps, b.teacher_maps, strict=True)
        ]
        return sum(losses) / len(losses)


def attention_map(f: torch.Tensor) -> torch.Tensor:
    """Spatial attention: channel mean of squared activations, flattened and L2-normalized."""
    return F.normalize(f.pow(2).mean(1).flatten(1), dim=1)


@KD_LOSSES.register("at")
class AttentionTerm(KDTerm):
    """Attention transfer (Zagoruyko & Komodakis 2017): match normalized spatial attention maps."""

    uses = "maps"
    default_weight = 1000.0  # the maps are unit vectors over H*W, so the raw loss is tiny

    def __call__(self, b):
        losses = []
        for s, t in zip(b.student_maps, b.teacher_maps, strict=True):
            t_att = attention_map(_match_size(t.pow(2).mean(1, keepdim=True), s.shape[-2:]))
            losses.append((attention_map(s) - t_att).pow(2).mean())
        return sum(losses) / len(losses)


def _pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(e, e).clamp_min(1e-12)
    return d * (1 - torch.eye(len(e), device=e.device))


@KD_LOSSES.register("rkd")
class RelationTerm(KDTerm):
    """Relational KD (Park et al. 2019): distance (x25) and angle (x50) of embedding pairs and triplets."""

    uses = "embedding"

    def __init__(self, distance: float = 25.0, angle: float = 50.0):
        self.distance, self.angle = distance, angle

    def __call__(self, b):
        s, t = b.student_embedding, b.teacher_embedding.detach()
        d_s, d_t = _pairwise_distances(s), _pairwise_distances(t)
        off = ~torch.eye(len(s), dtype=torch.bool, device=s.device)
        # Distances are compared after dividing by their mean, so the embeddings' scales need not match.
        dist = F.smooth_l1_loss(d_s[off] / d_s[off].mean(), d_t[off] / d_t[off].mean())
        angle = F.smooth_l1_loss(_angles(s), _angles(t))
        return self.distance * dist + self.angle * angle


def _angles(e: torch.Tensor) -> torch.Tensor:
    """cos of the angle at every anchor j between (e_i - e_j) and (e_k - e_j), for all i, j, k."""
    v = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)
    return torch.bmm(v, v.transpose(1, 2)).flatten()


@KD_LOSSES.register("sp")
class SimilarityTerm(KDTerm):
    """Similarity-preserving KD (Tung & Mori 2019): match the batch's row-normalized Gram matrices."""

    uses = "maps"
    default_weight = 3000.0  # the loss is divided by batch^2, as in the paper

    def __call__(self, b):
        s, t = b.student_maps[-1], b.teacher_maps[-1]
        g_s = F.normalize(s.flatten(1) @ s.flatten(1).T, dim=1)
        g_t = F.normalize(t.flatten(1) @ t.flatten(1).T, dim=1)
        return (g_s - g_t).pow(2).sum() / len(s) ** 2


def parse_spec(spec: str) -> list[tuple[str, float | None]]:
    """``"hinton+at:500"`` -> [("hinton", None), ("at", 500.0)]; ``"none"`` -> []."""
    spec = spec.strip()
    if spec in ("none", ""):
        return []
    out = []
    for part in spec.split("+"):
        name, _, weight = part.strip().partition(":")
        if name == "none":
            raise ConfigError(f"KD spec {spec!r} combines 'none' with other losses.", "Use --kd none alone.")
        if name not in KD_LOSSES:
            raise ConfigError(
                f"Unknown KD loss {name!r} in {spec!r}.",
                f"Choose from: {', '.join(KD_LOSSES.names())}, joined by '+' (e.g. hinton+at), or none.",
            )
        try:
            out.append((name, float(weight) if weight else None))
        except ValueError:
            raise ConfigError(
                f"KD spec {spec!r}: weight {weight!r} of {name!r} is not a number.", "Example: hinton+at:500"
            ) from None
    if len({name for name, _ in out}) != len(out):
        raise ConfigError(f"KD spec {spec!r} names a loss twice.")
    return out


class KDLoss:
    """Weighted KD terms over weighted teachers, mixed with the hard-label cross-entropy.

    ``temperatures`` ((T, weight) pairs) and ``alpha`` are plain attributes that schedules update
    between epochs. Feature terms need ``attach(student, teachers, example)`` before training (it
    hooks the layers and builds the 1x1 adapters, whose parameters it returns for the optimizer) and
    ``detach()`` after.

    Example::

        kd = make_kd_loss("hinton+at", temperature=4.0, alpha=0.7)
        extra = kd.attach(student, [teacher], x[:2])
        out = kd(student(x), [teacher(x)], [1.0], y)   # {"loss", "ce", "kd", "hinton", "at"}
    """

    def __init__(self, terms: list[tuple[str, KDTerm, float]], temperature: float = 4.0, alpha: float = 0.7):
        self.terms = terms
        self.spec = "+".join(name for name, _, _ in terms) or "none"
        self.temperatures: tuple[tuple[float, float], ...] = ((float(temperature), 1.0),)
        self.alpha = alpha
        self.adapters: nn.ModuleList | None = None  # one ModuleList per teacher
        self._student_tap = None
        self._teacher_taps: list = []

    @property
    def temperature(self) -> float:
        """The (weighted mean) temperature, for logs and for stages that take one number."""
        total = sum(w for _, w in self.temperatures)
        return sum(t * w for t, w in self.temperatures) / total

    @property
    def needs_teacher(self) -> bool:
        return bool(self.terms)

    @property
    def needs_features(self) -> bool:
        return any(term.uses != "logits" for _, term, _ in self.terms)

    @property
    def attached(self) -> bool:
        return self._student_tap is not None

    def attach(
        self,
        student: nn.Module,
        teachers: list[nn.Module],
        example: torch.Tensor,
        student_layers: tuple[str, ...] = (),
        teacher_layers: tuple[str, ...] = (),
    ) -> list[nn.Parameter]:
        """Hook the layers the terms need; build adapters. Returns the new trainable parameters."""
        from hwkd.kd.features import FeatureTap, auto_layers
        from hwkd.models.loaders import find_head

        if not self.needs_features:
            return []
        self.detach()
        uses = {term.uses for _, term, _ in self.terms}
        s_layers = list(student_layers) or (auto_layers(student, example) if "maps" in uses else [])
        self._student_tap = FeatureTap(student, s_layers, find_head(student) if "embedding" in uses else None)
        for teacher in teachers:
            t_layers = list(teacher_layers) or (auto_layers(teacher, example) if "maps" in uses else [])
            if len(t_layers) != len(s_layers):
                self.detach()
                raise ConfigError(
                    f"Feature KD pairs student and teacher layers one to one, but got {len(s_layers)} student "
                    f"and {len(t_layers)} teacher layers.",
                    "Give distill.student_layers and distill.teacher_layers of the same length.",
                )
            self._teacher_taps.append(FeatureTap(teacher, t_layers, find_head(teacher) if "embedding" in uses else None))
        if any(term.needs_adapters for _, term, _ in self.terms):
            was_training = student.training
            student.eval()
            with torch.no_grad():
                student(example[:2])
                for teacher in teachers:
                    teacher(example[:2])
            student.train(was_training)
            s_channels = [m.shape[1] for m in self._student_tap.maps]
            self.adapters = nn.ModuleList(
                nn.ModuleList(nn.Conv2d(cs, t.shape[1], 1, bias=False) for cs, t in zip(s_channels, tap.maps, strict=True))
                for tap in self._teacher_taps
            )
            return list(self.adapters.parameters())
        return []

    def logits_only(self) -> KDLoss:
        """A copy without the feature terms (hinton if none is left), for stages whose student changes
        shape (prune recovery): the adapters fit the channels this student had."""
        terms = [t for t in self.terms if t[1].uses == "logits"]
        if self.terms and not terms:
            terms = [("hinton", HintonTerm(), 1.0)]
        out = KDLoss(terms, alpha=self.alpha)
        out.temperatures = self.temperatures
        return out

    def detach(self) -> None:
        """Remove every hook (the student goes on to pruning and export without them)."""
        for tap in [self._student_tap, *self._teacher_taps]:
            if tap is not None:
                tap.remove()
        self._student_tap, self._teacher_taps = None, []

    def __call__(self, student_logits, teacher_logits, weights, labels) -> dict[str, torch.Tensor]:
        ce = F.cross_entropy(student_logits, labels)
        if not self.terms:
            return {"loss": ce, "ce": ce}
        if self.needs_features and not self.attached:
            raise ConfigError(f"KD loss {self.spec!r} needs features: call attach() before training.")
        values = {name: student_logits.new_zeros(()) for name, _, _ in self.terms}
        for i, (t_logits, w) in enumerate(zip(teacher_logits, weights, strict=True)):
            batch = KDBatch(student_logits, t_logits, labels, self.temperatures)
            if self.needs_features:
                s_tap, t_tap = self._student_tap, self._teacher_taps[i]
                batch.student_maps, batch.teacher_maps = s_tap.maps, t_tap.maps
                batch.student_embedding, batch.teacher_embedding = s_tap.embedding, t_tap.embedding
                batch.adapters = self.adapters[i] if self.adapters is not None else None
            for name, term, _ in self.terms:
                values[name] = values[name] + w * term(batch)
        response = sum(weight * values[name] for name, term, weight in self.terms if term.uses == "logits")
        other = sum(weight * values[name] for name, term, weight in self.terms if term.uses != "logits")
        has_response = any(term.uses == "logits" for _, term, _ in self.terms)
        hard_weight = (1 - self.alpha) if has_response else 1.0
        kd = self.alpha * response + other
        return {"loss": hard_weight * ce + kd, "ce": ce, "kd": kd, **values}


def accuracy_weights(accuracies: list[float], num_classes: int) -> list[float]:
    """Teacher weights proportional to validation accuracy above chance (1/classes), summing to 1.

    A teacher at chance level gets no weight; if none is above chance, the weights are equal.
    """
    chance = 1.0 / num_classes
    margins = [max(0.0, a - chance) for a in accuracies]
    total = sum(margins)
    if total <= 0:
        return [1.0 / len(accuracies)] * len(accuracies)
    return [m / total for m in margins]


def make_kd_loss(spec: str, temperature: float = 4.0, alpha: float = 0.7) -> KDLoss:
    """Build a ``KDLoss`` from a spec string (see the module docstring)."""
    terms = []
    for name, weight in parse_spec(spec):
        cls = KD_LOSSES.get(name)
        terms.append((name, cls(), cls.default_weight if weight is None else weight))
    return KDLoss(terms, temperature=temperature, alpha=alpha)
