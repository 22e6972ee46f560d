"""Stage-2 losses shaped like the competition metric (see `spine_ray.ensemble.metric`).

Severity cross-entropy uses the metric's sample weights 1/2/4 and its weighted mean
(Σ w·nll / Σ w); label −1 means unlabelled. The any-severe-spinal term mirrors the metric's
fourth part: per study, max over its labelled spinal levels of p(severe) against "any level
severe", weighted by the largest sample weight among those levels.

Soft targets (CutMix / mixup, `spine_ray.stages.grade.augment.mix_batch`): every term also takes a target as a
distribution with unnormalised mass — severity [..., 3], slice [..., S] — where a mixed target is
λ·onehot(a) + (1−λ)·onehot(b) and an unlabelled side adds no mass (all-zero = unlabelled). The
weighted mean then reads Σ_c w_c q_c nll_c / Σ_c w_c q_c over targets: each labelled part of a
mixed crop counts with its area (or blend) share, and one-hot targets give exactly the hard loss.
The any-severe term uses, per target, the severe share q_2 / Σq as its "is severe" value and
Σ_c w_c q_c / Σq as its weight.

Every term is branch-free with fixed shapes, so a training step never waits on the host: hard
labels become one-hot targets, unlabelled ones weigh 0 by multiplication, an empty weighted mean
reads 0 through a denominator of 1, and studies are grouped by comparison, not `torch.unique`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from spine_ray.core.schema import SEVERITY_WEIGHTS

IGNORE = -1


def soft_targets(labels: Tensor, n: int) -> Tensor:
    """Hard labels [...] (−1 = unlabelled) → one-hot float targets [..., n] (all-zero where unlabelled)."""
    # A comparison with 0..n−1, not F.one_hot: −1 matches no class, and no value is read on the host.
    return (labels.long()[..., None] == torch.arange(n, device=labels.device)).float()


def _is_soft(target: Tensor, logits: Tensor) -> bool:
    return target.is_floating_point() and target.ndim == logits.ndim


def _per_class(q: Tensor, weights: Sequence[float]) -> Tensor:
    """q [..., C] with class c scaled by weights[c]."""
    # Python numbers, not a weight tensor: a tensor built on the host costs a blocking copy (a
    # stream sync on CUDA) every step.
    return torch.stack([q[..., c] * w for c, w in zip(range(q.shape[-1]), weights, strict=True)], -1)


def _safe(den: Tensor) -> Tensor:
    """A denominator with 1 where it is 0, so an empty sum reads 0 (with zero gradient), never 0/0."""
    return torch.where(den > 0, den, torch.ones_like(den))


def _weighted_nll(flat: Tensor, q: Tensor) -> Tensor:
    """Σ q·(−log softmax(flat)) / Σ q over rows [N, C] and target mass [N, C]; 0 when q has no mass."""
    logp = F.log_softmax(flat, -1)
    # where, not a bare product: a class without mass adds exactly 0, even at a logit of −inf.
    nll = -torch.where(q != 0, q * logp, torch.zeros_like(logp)).sum()
    return nll / _safe(q.sum())


def severity_loss(
    logits: Tensor, labels: Tensor, weights: Sequence[float] = SEVERITY_WEIGHTS
) -> Tensor:
    """Weighted CE over any leading dims: logits [..., 3], labels [...] in {0, 1, 2, −1} or soft [..., 3]; 0 if none labelled."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    q = labels if _is_soft(labels, logits) else soft_targets(labels, flat.shape[-1])
    return _weighted_nll(flat, _per_class(q.reshape(flat.shape).to(flat.dtype), weights))


def any_severe_spinal_loss(
    logits: Tensor,
    labels: Tensor,
    study: Tensor,
    weights: Sequence[float] = SEVERITY_WEIGHTS,
    eps: float = 1e-7,
) -> Tensor:
    """The metric's any-severe-spinal log loss over the studies present.

    logits [..., 3], labels [...] (or soft [..., 3]), study [...] long: the study each *spinal*
    target belongs to (any ids; −1 for targets that are not spinal). A study counts once, through
    its labelled spinal targets, so a batch that holds a study's five spinal levels (in one sample
    or across samples) reproduces the metric; 0 when no study has a labelled spinal target.
    """
    p_sev = F.softmax(logits.float(), dim=-1)[..., 2].reshape(-1)  # [N]
    q = (labels if _is_soft(labels, logits) else soft_targets(labels, logits.shape[-1])).reshape(-1, logits.shape[-1]).to(p_sev.dtype)
    mass, g = q.sum(-1), study.reshape(-1).long()
    keep = (g >= 0) & (mass > 0)
    # Fixed shapes instead of keep-indexing and torch.unique (whose sizes depend on the data): every
    # kept target points at the first kept target of its study, its group's slot; a dropped target
    # points at its own slot, which weighs 0 below.
    idx = torch.arange(len(g), device=g.device)
    same = keep[:, None] & keep[None, :] & (g[:, None] == g[None, :])  # [N, N]
    first = torch.where(same, idx[None, :], len(g)).amin(-1)
    gi = torch.where(keep, first, idx)
    slot = keep & (gi == idx)  # one per study present

    def group_max(v: Tensor) -> Tensor:
        return torch.full_like(v, -1.0).scatter_reduce(0, gi, v, reduce="amax", include_self=True)

    per_mass = _safe(mass)  # unlabelled targets have no mass; their slots weigh 0
    p = group_max(p_sev).clamp(eps, 1 - eps)
    target = group_max(q[:, 2] / per_mass)
    w = group_max(_per_class(q, weights).sum(-1) / per_mass) * slot
    nll = -(target * torch.log(p) + (1 - target) * torch.log1p(-p))
    return (w * nll).sum() / _safe(w.sum())


def slice_loss(slice_logits: Tensor, slice_target: Tensor) -> Tensor:
    """CE between the attention logits over slices [..., S] and the labelled slice's index [...] (−1 = unknown) or soft [..., S]."""
    flat = slice_logits.reshape(-1, slice_logits.shape[-1]).float()
    q = slice_target if _is_soft(slice_target, slice_logits) else soft_targets(slice_target, flat.shape[-1])
    return _weighted_nll(flat, q.reshape(flat.shape).to(flat.dtype))


def grader_loss(
    out: Mapping[str, Tensor],
    labels: Tensor,
    slice_target: Tensor | None = None,
    spinal_study: Tensor | None = None,
    w_slice: float = 0.2,
    w_any: float = 1.0,
    weights: Sequence[float] = SEVERITY_WEIGHTS,
) -> dict[str, Tensor]:
    """All stage-2 terms from a `Grader` output: {'loss', 'severity', 'slice', 'any_severe'}.

    labels [B, T] (or soft [B, T, 3]); slice_target [B, T] (index of the labelled slice in the
    crop, −1 = unknown; or soft [B, T, S]); spinal_study [B, T] (study id of spinal targets, −1
    elsewhere); weights: the severity class weights (the metric's 1/2/4; (1, 1, 1) is plain CE).
    Missing inputs, or w_slice / w_any of 0, zero their term.
    """
    logits = out["logits"]
    parts = {"severity": severity_loss(logits, labels, weights)}
    zero = logits.sum() * 0.0
    parts["slice"] = slice_loss(out["slice_logits"], slice_target) if slice_target is not None else zero
    parts["any_severe"] = (
        any_severe_spinal_loss(logits, labels, spinal_study) if spinal_study is not None and w_any else zero
    )
    parts["loss"] = parts["severity"] + w_slice * parts["slice"] + w_any * parts["any_severe"]
    return parts


__all__ = ["IGNORE", "soft_targets", "severity_loss", "any_severe_spinal_loss", "slice_loss", "grader_loss"]
