"""Stage 1: a keypoint heatmap network over a resampled series volume.

A timm encoder runs on every slice; a small FPN decoder brings its maps to one resolution
(stride `out_stride`); a light context block mixes neighbouring slices; a 1×1×1 head gives one
heatmap logit volume per point over (slice, row, col). Train it with
`spine_ray.models.heatmap.keypoint_loss` and decode with `decode_points`. Uses:

- sagittal T2/STIR: n_points=5 (spinal canal at each level);
- sagittal T1: n_points=10 (left foramina L1/L2…L5/S1, then right);
- axial T2: n_points=2 (left, right subarticular) on the few slices around the axial slice that
  stage 1 finds geometrically from the sagittal spinal point — the same network on S = 5.

`spine_ray.stages.localize.VIEWS[view]` gives each view's series description and names its heatmap
channels in that order.

Heatmap voxel (s, i, j) is centred on input voxel (s, (i + 0.5)·stride − 0.5, …): map with
`spine_ray.models.heatmap.scale_coords(coords, model.stride)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from spine_ray.models.backbone import BackboneConfig, build_encoder, feature_maps


@dataclass(frozen=True)
class LocalizerConfig(BackboneConfig):
    """Stage-1 network settings: the encoder's (`BackboneConfig`), then the decoder's and head's."""

    n_points: int = 5
    hidden: int = 64  # decoder / context channels
    out_stride: int = 4  # in-plane heatmap stride w.r.t. the input
    context: Literal["conv", "gru", "none"] = "conv"
    context_layers: int = 2
    dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_points < 1 or self.hidden < 1 or self.context_layers < 0:
            raise ValueError("n_points and hidden must be positive, context_layers non-negative")
        if self.out_stride < 1 or self.out_stride & (self.out_stride - 1):
            raise ValueError(f"out_stride must be a power of two, got {self.out_stride}")


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class _SliceConv(nn.Module):
    """Residual 3×3×3 conv block: mixes neighbouring slices and pixels."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv = nn.Conv3d(dim, dim, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm3d(dim)

    def forward(self, x: Tensor) -> Tensor:  # [B, D, S, h, w]
        return x + F.relu(self.norm(self.conv(x)))


class _SliceGRU(nn.Module):
    """Residual bidirectional GRU along the slice axis, independently at every pixel."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gru = nn.GRU(dim, dim // 2, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(2 * (dim // 2), dim)

    def forward(self, x: Tensor) -> Tensor:  # [B, D, S, h, w]
        b, d, s, h, w = x.shape
        seq = x.permute(0, 3, 4, 2, 1).reshape(b * h * w, s, d)  # [B·h·w, S, D]
        out = self.proj(self.gru(seq)[0])
        return x + out.view(b, h, w, s, d).permute(0, 4, 3, 1, 2)


class Localizer(nn.Module):
    """Volume [B, S, C, H, W] → heatmap logits [B, P, S, H/stride, W/stride].

    img_size: the in-plane side (the view's `size`); transformer families are built for it, and a
    backbone that cannot take it fails here with a ValueError.
    """

    def __init__(self, cfg: LocalizerConfig, img_size: int | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder, mean, std = build_encoder(cfg, img_size, maps=True)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        reductions = self.encoder.feature_info.reduction()
        # Use the maps from the finest at or below out_stride's resolution down to the deepest
        # (finer ones are computed on the way anyway). Plain ViTs give every map at the patch
        # stride: all of them go through the decoder, which upsamples to out_stride.
        self.first = max([i for i, r in enumerate(reductions) if r <= cfg.out_stride], default=0)
        channels = self.encoder.feature_info.channels()[self.first :]
        self.lateral = nn.ModuleList(nn.Conv2d(c, cfg.hidden, 1) for c in channels)
        self.smooth = nn.ModuleList(_conv_bn_relu(cfg.hidden, cfg.hidden) for _ in channels[:-1])
        block = {"conv": _SliceConv, "gru": _SliceGRU, "none": None}[cfg.context]
        self.context = nn.Sequential(*(block(cfg.hidden) for _ in range(cfg.context_layers))) if block else nn.Identity()
        self.dropout = nn.Dropout3d(cfg.dropout)
        self.head = nn.Conv3d(cfg.hidden, cfg.n_points, 1)

    @property
    def stride(self) -> tuple[float, float, float]:
        """Input voxels per heatmap voxel along (slice, row, col)."""
        return (1.0, float(self.cfg.out_stride), float(self.cfg.out_stride))

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 5:
            raise ValueError(f"expected [B, S, C, H, W], got {tuple(x.shape)}")
        b, s, c, h, w = x.shape
        if h % self.cfg.out_stride or w % self.cfg.out_stride:
            # Otherwise heatmap voxels would not sit exactly `stride` input pixels apart.
            raise ValueError(f"H, W ({h}, {w}) must be multiples of out_stride ({self.cfg.out_stride})")
        size = (h // self.cfg.out_stride, w // self.cfg.out_stride)
        x = x.reshape(b * s, c, h, w)
        if self.cfg.normalise_input:
            x = (x - self.mean) / self.std
        feats = feature_maps(self.encoder, x)[self.first :]  # each [B·S, C_i, H/r_i, W/r_i]
        y = self.lateral[-1](feats[-1])
        for i in range(len(feats) - 2, -1, -1):  # top-down: upsample, add the lateral, smooth
            lat = self.lateral[i](feats[i])
            y = self.smooth[i](lat + F.interpolate(y, size=lat.shape[-2:], mode="bilinear", align_corners=False))
        if tuple(y.shape[-2:]) != size:
            y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)  # [B·S, D, h', w']
        y = y.reshape(b, s, -1, *size).transpose(1, 2)  # [B, D, S, h', w']
        y = self.context(y)
        return self.head(self.dropout(y))  # [B, P, S, h', w']


__all__ = ["Localizer", "LocalizerConfig"]
