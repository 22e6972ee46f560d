"""The one-stage point-masking network (7th place, RSNA 2024): points and grades from one sagittal stack.

Per sagittal view, one `Localizer` (timm encoder per slice, FPN decoder, slice context) whose
1×1×1 head gives P + 3 channels: P heatmap logit volumes, one per level point, and a per-voxel
3-class grade map. A point's grade is the grade map pooled by that point's heatmap: the spatial
softmax of its logits (or, as a diagnostic, the ground-truth Gaussian) times the grade logits,
summed over the volume — an attention-weighted mean of per-voxel logits, [B, P, 3].

Two views by default: Sagittal T2/STIR with 5 points (spinal canal per level) and Sagittal T1 with
10 (left foramina L1/L2…L5/S1, then right), in `spine_ray.stages.localize.VIEWS` order. The heatmaps train
with `spine_ray.models.heatmap.keypoint_loss`, the pooled grades with the metric-weighted losses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from spine_ray.models.heatmap import spatial_softmax
from spine_ray.models.localizer import Localizer, LocalizerConfig


@dataclass(frozen=True)
class OneStageNetConfig:
    """Network settings: the per-view Localizer (its n_points is set per view) and the views' point counts."""

    net: LocalizerConfig = field(default_factory=lambda: LocalizerConfig(backbone="resnet18d", hidden=64, out_stride=4))
    views: tuple[str, ...] = ("sag_t2", "sag_t1")
    points: tuple[int, ...] = (5, 10)  # heatmaps per view, in `views` order
    n_grades: int = 3

    def __post_init__(self) -> None:
        if len(self.views) != len(self.points) or not self.views or min(self.points) < 1:
            raise ValueError(f"views {self.views} and points {self.points} must pair up, each view with ≥ 1 point")
        if self.n_grades < 2:
            raise ValueError("n_grades must be ≥ 2")


def pool_grades(attention: Tensor, grade_map: Tensor) -> Tensor:
    """Per-point grade logits: attention [B, P, *spatial] (each sums to 1) × grade map [B, C, *spatial], summed → [B, P, C]."""
    return torch.einsum("bpn,bcn->bpc", attention.flatten(2).float(), grade_map.flatten(2).float())


class PointGrader(nn.Module):
    """One view: volume [B, S, C, H, W] → heatmap logits [B, P, S, h, w], grade map [B, 3, S, h, w], pooled logits [B, P, 3]."""

    def __init__(self, net: LocalizerConfig, n_points: int, n_grades: int = 3, img_size: int | None = None) -> None:
        super().__init__()
        self.n_points = n_points
        # Composition, not a copy: the localiser's encoder/decoder/context with P + 3 output channels
        # (img_size: the stack's in-plane size, for backbones built for one size).
        self.net = Localizer(dataclasses.replace(net, n_points=n_points + n_grades), img_size=img_size)

    def forward(self, x: Tensor, gt_attention: Tensor | None = None, gt_visible: Tensor | None = None) -> dict[str, Tensor]:
        out = self.net(x)  # [B, P + 3, S, h, w]
        heat, grade_map = out[:, : self.n_points], out[:, self.n_points :]
        attention = spatial_softmax(heat, 3)  # [B, P, S, h, w]
        if gt_attention is not None:
            # The diagnostic switch: pool where the labelled point is; points without one keep the model's own.
            vis = gt_visible if gt_visible is not None else torch.ones(attention.shape[:2], dtype=torch.bool, device=x.device)
            attention = torch.where(vis[..., None, None, None], gt_attention.to(attention.dtype), attention)
        return {"heat": heat, "grade_map": grade_map, "logits": pool_grades(attention, grade_map)}


class OneStageNet(nn.Module):
    """One PointGrader per sagittal view: {view: [B, S, 1, H, W]} → {view: PointGrader output}."""

    def __init__(self, cfg: OneStageNetConfig, img_size: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.views = nn.ModuleDict({v: PointGrader(cfg.net, p, cfg.n_grades, img_size) for v, p in zip(cfg.views, cfg.points, strict=True)})

    @property
    def stride(self) -> tuple[float, float, float]:
        """Input voxels per heatmap voxel along (slice, row, col)."""
        return (1.0, float(self.cfg.net.out_stride), float(self.cfg.net.out_stride))

    def forward(
        self, xs: dict[str, Tensor], gt_attention: dict[str, Tensor] | None = None, gt_visible: dict[str, Tensor] | None = None
    ) -> dict[str, dict[str, Tensor]]:
        # Every view runs on every sample (a missing series is a zero volume whose targets are
        # masked), so all parameters take part in each step, as DDP needs.
        return {
            v: m(xs[v], (gt_attention or {}).get(v), (gt_visible or {}).get(v)) for v, m in self.views.items()
        }


__all__ = ["OneStageNet", "OneStageNetConfig", "PointGrader", "pool_grades"]
