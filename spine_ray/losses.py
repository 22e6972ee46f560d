"""Stage-2 losses shaped like the competition metric (see `spine_ray.metric`).

Severity cross-entropy uses the metric's sample weights 1/2/4 and its weighted mean
(Σ w·nll / Σ w); label −1 means unlabelled. The any-severe-spinal term mirrors the metric's
fourth part: per study, max over its labelled spinal levels of p(severe) against "any level
severe", weighted by the largest sample weight among those levels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from spine_ray.schema import SEVERITY_WEIGHTS

IGNORE = -1


def severity_loss(
    logits: Tensor, labels: Tensor, weights: Sequence[float] = SEVERITY_WEIGHTS
) -> Tensor:
    """Weighted CE over any leading dims: logits [..., 3], labels [...] in {0, 1, 2, −1}; 0 if none labelled."""
    flat, y = logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).long()
    if not (y != IGNORE).any():
        return flat.sum() * 0.0
    w = torch.as_tensor(weights, dtype=flat.dtype, device=flat.device)
    return F.cross_entropy(flat, y, weight=w, ignore_index=IGNORE)


def any_severe_spinal_loss(
    logits: Tensor,
    labels: Tensor,
    study: Tensor,
    weights: Sequence[float] = SEVERITY_WEIGHTS,
    eps: float = 1e-7,
) -> Tensor:
    """The metric's any-severe-spinal log loss over the studies present.

    logits [..., 3], labels [...], study [...] long: the study each *spinal* target belongs to
    (any ids; −1 for targets that are not spinal). A study counts once, through its labelled
    spinal targets, so a batch that holds a study's five spinal levels (in one sample or across
    samples) reproduces the metric; 0 when no study has a labelled spinal target.
    """
    p_sev = F.softmax(logits.float(), dim=-1)[..., 2].reshape(-1)
    y, g = labels.reshape(-1).long(), study.reshape(-1).long()
    keep = (g >= 0) & (y != IGNORE)
    if not keep.any():
        return logits.sum() * 0.0
    p_sev, y, g = p_sev[keep], y[keep], g[keep]
    groups, gi = torch.unique(g, return_inverse=True)
    n = len(groups)
    w_table = torch.as_tensor(weights, dtype=p_sev.dtype, device=p_sev.device)

    def group_max(v: Tensor) -> Tensor:
        return torch.full((n,), -1.0, dtype=v.dtype, device=v.device).scatter_reduce(
            0, gi, v, reduce="amax", include_self=True
        )

    p = group_max(p_sev).clamp(eps, 1 - eps)
    target = group_max((y == 2).to(p.dtype))
    w = group_max(w_table[y])
    nll = -(target * torch.log(p) + (1 - target) * torch.log1p(-p))
    return (w * nll).sum() / w.sum()


def slice_loss(slice_logits: Tensor, slice_target: Tensor) -> Tensor:
    """CE between the attention logits over slices [..., S] and the labelled slice's index [...] (−1 = unknown)."""
    flat, y = slice_logits.reshape(-1, slice_logits.shape[-1]).float(), slice_target.reshape(-1).long()
    if not (y != IGNORE).any():
        return flat.sum() * 0.0
    return F.cross_entropy(flat, y, ignore_index=IGNORE)


def grader_loss(
    out: Mapping[str, Tensor],
    labels: Tensor,
    slice_target: Tensor | None = None,
    spinal_study: Tensor | None = None,
    w_slice: float = 0.2,
    w_any: float = 1.0,
) -> dict[str, Tensor]:
    """All stage-2 terms from a `Grader` output: {'loss', 'severity', 'slice', 'any_severe'}.

    labels [B, T]; slice_target [B, T] (index of the labelled slice in the crop, −1 = unknown);
    spinal_study [B, T] (study id of spinal targets, −1 elsewhere). Missing inputs zero their term.
    """
    logits = out["logits"]
    parts = {"severity": severity_loss(logits, labels)}
    zero = logits.sum() * 0.0
    parts["slice"] = slice_loss(out["slice_logits"], slice_target) if slice_target is not None else zero
    parts["any_severe"] = (
        any_severe_spinal_loss(logits, labels, spinal_study) if spinal_study is not None else zero
    )
    parts["loss"] = parts["severity"] + w_slice * parts["slice"] + w_any * parts["any_severe"]
    return parts


__all__ = ["IGNORE", "severity_loss", "any_severe_spinal_loss", "slice_loss", "grader_loss"]
