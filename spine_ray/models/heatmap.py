"""Keypoint heatmap maths for stage 1: targets, spatial softmax, DSNT, Jensen–Shannon, decoding.

Everything works on D spatial dimensions (D = 3 for (slice, row, col) volumes, D = 2 for single
slices); the spatial dims are always the last D dims of a tensor. Coordinates are voxel indices
in the heatmap's own grid: voxel i has its centre at i, so a point may lie anywhere in
[-0.5, n - 0.5]. `scale_coords` maps between grids of different resolution (input pixels ↔
heatmap voxels) with the same centre-aligned convention as `F.interpolate(align_corners=False)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _grids(shape: Sequence[int], like: Tensor) -> list[Tensor]:
    """One index vector per spatial dim, on `like`'s device and dtype."""
    return [torch.arange(n, device=like.device, dtype=like.dtype) for n in shape]


def _sigmas(sigma: float | Sequence[float], ndim: int) -> tuple[float, ...]:
    s = (float(sigma),) * ndim if isinstance(sigma, int | float) else tuple(map(float, sigma))
    if len(s) != ndim or min(s) <= 0:
        raise ValueError(f"sigma must be positive, one per spatial dim ({ndim}), got {sigma}")
    return s


def gaussian_heatmap(
    shape: Sequence[int], coords: Tensor, sigma: float | Sequence[float]
) -> Tensor:
    """Gaussian target distributions (each sums to 1) centred on `coords` [..., D] → [..., *shape].

    `sigma` is in voxels of this grid, one value or one per dim (e.g. (1.0, 2.0, 2.0) for thick
    sagittal slices).
    """
    ndim = len(shape)
    if coords.shape[-1] != ndim:
        raise ValueError(f"coords must end in {ndim} (one per spatial dim), got {tuple(coords.shape)}")
    sig = _sigmas(sigma, ndim)
    coords = coords.float()
    logp = torch.zeros((*coords.shape[:-1], *shape), device=coords.device)
    for d, (grid, s) in enumerate(zip(_grids(shape, coords), sig, strict=True)):
        # Separable: add each dim's log-Gaussian, broadcast along the other dims.
        view = [1] * ndim
        view[d] = shape[d]
        diff = grid.view(*view) - coords[..., d].reshape(*coords.shape[:-1], *([1] * ndim))
        logp = logp + (-0.5 * (diff / s) ** 2)
    return spatial_softmax(logp, ndim)


def spatial_softmax(logits: Tensor, ndim: int = 3) -> Tensor:
    """Softmax over the last `ndim` dims together: [..., *spatial] → probabilities, same shape."""
    flat = logits.flatten(-ndim)
    return F.softmax(flat.float(), dim=-1).view(logits.shape)


def dsnt(probs: Tensor, ndim: int = 3) -> Tensor:
    """Differentiable soft-argmax: expected voxel coordinates under `probs` [..., *spatial] → [..., D]."""
    shape = probs.shape[-ndim:]
    out = []
    for d, grid in enumerate(_grids(shape, probs)):
        # Marginal along dim d, then its mean.
        other = [-ndim + i for i in range(ndim) if i != d]
        marginal = probs.sum(dim=other) if other else probs
        out.append((marginal * grid).sum(-1))
    return torch.stack(out, dim=-1)


def js_divergence(p: Tensor, q: Tensor, ndim: int = 3, eps: float = 1e-12) -> Tensor:
    """Jensen–Shannon divergence (nats, in [0, ln 2]) between distributions over the last `ndim` dims."""
    p = p.flatten(-ndim).float()
    q = q.flatten(-ndim).float()
    m = 0.5 * (p + q)

    def kl(a: Tensor, b: Tensor) -> Tensor:
        # xlogy gives 0 where a == 0, so zero-mass voxels are exact and gradient-safe.
        return (torch.xlogy(a, a) - a * torch.log(b + eps)).sum(-1)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp_min(0.0)


def keypoint_loss(
    logits: Tensor,
    target_coords: Tensor,
    visible: Tensor,
    sigma: float | Sequence[float],
    w_js: float = 1.0,
    w_coord: float = 1.0,
) -> Tensor:
    """Heatmap loss averaged over visible points; missing points add nothing, not even gradient.

    logits [B, P, *spatial] (D = target_coords.shape[-1] spatial dims), target_coords [B, P, D] in
    heatmap voxels, visible [B, P] bool. The loss is w_js · JS(softmax, Gaussian target) +
    w_coord · L1 between the DSNT coordinates and the target, each coordinate divided by its
    axis length so that slice and in-plane errors weigh alike whatever the grid.
    """
    ndim = target_coords.shape[-1]
    shape = logits.shape[-ndim:]
    visible = visible.bool()
    # Park missing points at the centre so no NaN/inf can leak into the masked terms. Constants
    # stay Python numbers: a tensor built on the host costs a blocking copy (a CUDA stream sync).
    tc = torch.stack([torch.where(visible, target_coords[..., d].float(), (n - 1) / 2) for d, n in enumerate(shape)], -1)
    probs = spatial_softmax(logits, ndim)
    per_point = torch.zeros(visible.shape, device=logits.device)
    if w_js:
        per_point = per_point + w_js * js_divergence(probs, gaussian_heatmap(shape, tc, sigma), ndim)
    if w_coord:
        err = (dsnt(probs, ndim) - tc).abs()
        per_point = per_point + w_coord * torch.stack([err[..., d] / max(n - 1, 1) for d, n in enumerate(shape)], -1).sum(-1)
    per_point = torch.where(visible, per_point, torch.zeros_like(per_point))
    return per_point.sum() / visible.sum().clamp_min(1)


def decode_points(logits: Tensor, ndim: int = 3) -> tuple[Tensor, Tensor]:
    """Heatmap logits [B, P, *spatial] → (coords [B, P, D] by DSNT, confidence [B, P] = peak probability)."""
    probs = spatial_softmax(logits, ndim)
    return dsnt(probs, ndim), probs.flatten(-ndim).amax(-1)


def scale_coords(coords: Tensor, scale: float | Sequence[float]) -> Tensor:
    """Map voxel coordinates to a grid `scale` times as fine per dim (centre-aligned): (c + 0.5)·s − 0.5.

    Input pixels → heatmap at stride 4: `scale=1/4`; back: `scale=4`.
    """
    if not isinstance(scale, Sequence):
        return (coords + 0.5) * scale - 0.5
    # Per dim with Python numbers: a scale tensor built on the host costs a blocking copy (a CUDA stream sync).
    return torch.stack([(coords[..., d] + 0.5) * s - 0.5 for d, s in zip(range(coords.shape[-1]), scale, strict=True)], -1)


__all__ = [
    "gaussian_heatmap",
    "spatial_softmax",
    "dsnt",
    "js_divergence",
    "keypoint_loss",
    "decode_points",
    "scale_coords",
]
