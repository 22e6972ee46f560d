"""Crops and resampling for both stages, in plain numpy (plus torch's interpolate for volumes).

Conventions: a volume is [S, H, W] (slices ordered along the slice normal); a point is
(slice, row, col) in native voxel indices, pixel i having its centre at i (the competition's
x is col, y is row); PixelSpacing is [row_mm, col_mm]. Crops are sized in millimetres and
resampled to a fixed pixel size, so the same anatomy has the same size whatever the scanner.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from spine_ray.data.half import to_float32

SlicePad = Literal["zero", "edge"]


def normalise_intensity(x: np.ndarray, p01: float, p99: float) -> np.ndarray:
    """Window raw intensities to [0, 1] float32 with the stack's 1st and 99th percentiles."""
    scale = 1.0 / max(float(p99) - float(p01), 1e-6)
    return np.clip((np.asarray(x, dtype=np.float32) - p01) * scale, 0.0, 1.0).astype(np.float32)


def _bilinear(
    image: np.ndarray, rows: np.ndarray, cols: np.ndarray, window: tuple[float, float] | None
) -> np.ndarray:
    """Sample image [N, H, W] (any real dtype) at float positions rows, cols (both [h, w]) → [N, h, w] float32; zero outside.

    Outside voxels count as 0 *after* windowing, so padding reads as black, and a sample half
    a pixel off the edge is half as bright (like grid_sample's zero padding). The N slices are
    read as float32 once and each corner gathered by flat index (one axis, not two).
    """
    n, h, w = image.shape
    flat = to_float32(image).reshape(n, h * w)
    r0 = np.floor(rows).astype(np.int64)
    c0 = np.floor(cols).astype(np.int64)
    fr = (rows - r0).astype(np.float32)
    fc = (cols - c0).astype(np.float32)
    out = np.zeros((n, *rows.shape), dtype=np.float32)
    for dr, wr in ((0, 1 - fr), (1, fr)):
        rr = r0 + dr
        row_ok, row_at = (rr >= 0) & (rr < h), np.clip(rr, 0, h - 1) * w
        for dc, wc in ((0, 1 - fc), (1, fc)):
            cc = c0 + dc
            ok = row_ok & (cc >= 0) & (cc < w)
            vals = np.take(flat, row_at + np.clip(cc, 0, w - 1), axis=1)
            if window is not None:
                vals = normalise_intensity(vals, *window)
            out += vals * (wr * wc * ok)[None]
    return out


@functools.lru_cache(maxsize=16)
def _pixel_grid(h: int, w: int) -> np.ndarray:
    """The crop's pixel indices (i, j) as float64 [h, w, 2], read-only (shared by every crop of that size)."""
    ij = np.stack(np.meshgrid(np.arange(h), np.arange(w), indexing="ij"), axis=-1).astype(np.float64)
    ij.flags.writeable = False
    return ij


def _pair(v: float | Sequence[float], kind: type) -> tuple:
    return (kind(v),) * 2 if np.isscalar(v) else tuple(kind(x) for x in v)


def crop_affine(
    centre: Sequence[float],
    spacing: Sequence[float],
    size_mm: float | Sequence[float] = 40.0,
    out_px: int | Sequence[int] = 64,
    angle: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(A [2, 2], b [2]) with native (row, col) = A @ crop (i, j) + b for a crop around centre's (row, col).

    Crop pixel (i, j) samples at the centre of its cell; the window is size_mm (height, width)
    and its axes are turned `angle` degrees counter-clockwise on screen (rows down) from the
    image's, rotating in millimetres so non-square pixels stay right.
    """
    hmm, wmm = _pair(size_mm, float)
    oh, ow = _pair(out_px, int)
    rmm, cmm = (float(v) for v in spacing)
    ph, pw = hmm / oh, wmm / ow  # mm per crop pixel
    cos, sin = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
    a = np.array([[cos * ph / rmm, -sin * pw / rmm], [sin * ph / cmm, cos * pw / cmm]])
    b = np.asarray(centre, dtype=np.float64)[-2:] - a @ np.array([oh / 2 - 0.5, ow / 2 - 0.5])
    return a, b


def crop_stack(
    volume: np.ndarray,
    spacing: Sequence[float],
    point: Sequence[float],
    size_mm: float | Sequence[float] = 40.0,
    out_px: int | Sequence[int] = 64,
    k: int = 2,
    window: tuple[float, float] | None = None,
    slice_pad: SlicePad = "zero",
    angle: float = 0.0,
) -> np.ndarray:
    """2.5D crop: slices round(point.slice) ± k, each a `size_mm` window around (row, col) → [2k+1, h, w].

    volume [S, H, W] native; spacing [row_mm, col_mm]; size_mm (height_mm, width_mm) or one
    number; out_px (h, w) or one number; angle: in-plane rotation of the window in degrees
    (see `crop_affine`). With `window=(p01, p99)` values are normalised to [0, 1] float32 (use
    the whole series' window, not the crop's). In-plane, anything outside the image is 0.
    Slices beyond the volume are all-zero (`slice_pad="zero"`, default: the model sees there is
    nothing there rather than a copy that looks like a real neighbour; `stack_slices` gives the
    mask) or repeat the edge slice (`"edge"`). The same function serves the axial case: pass
    the axial stack and the axial slice index found from the sagittal point.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be [S, H, W], got shape {volume.shape}")
    if slice_pad not in ("zero", "edge"):
        raise ValueError(f"slice_pad must be 'zero' or 'edge', got {slice_pad!r}")
    oh, ow = _pair(out_px, int)
    a, b = crop_affine(point, spacing, size_mm, (oh, ow), angle)
    rc = _pixel_grid(oh, ow) @ a.T + b  # [h, w, 2] native positions
    n_slices = volume.shape[0]
    idx, inside = stack_slices(n_slices, point[0], k)
    out = _bilinear(volume[np.clip(idx, 0, n_slices - 1)], rc[..., 0], rc[..., 1], window)
    if slice_pad == "zero":
        out[~inside] = 0.0
    return out


def stack_slices(n_slices: int, centre: float, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The 2k+1 slice indices of a crop stack around round(centre), and which lie inside the volume.

    `inside` is the grader's `slice_mask` for that stack.
    """
    idx = int(np.floor(float(centre) + 0.5)) + np.arange(-k, k + 1)
    return idx, (idx >= 0) & (idx < n_slices)


def resample_volume(volume: np.ndarray, out_shape: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Trilinear resize [S, H, W] → out_shape (float32) and the per-axis scale out/in.

    A native point p maps to (p + 0.5) · scale − 0.5 (see `to_resampled` / `to_native`), the
    centre-aligned convention of `F.interpolate(align_corners=False)`.
    """
    volume = np.asarray(volume, dtype=np.float32)
    if volume.ndim != 3 or len(out_shape) != 3:
        raise ValueError(f"need a [S, H, W] volume and a 3-long out_shape, got {volume.shape}, {out_shape}")
    t = torch.from_numpy(np.ascontiguousarray(volume))[None, None]
    out = F.interpolate(t, size=tuple(int(v) for v in out_shape), mode="trilinear", align_corners=False)
    scale = np.asarray(out_shape, dtype=np.float64) / np.asarray(volume.shape, dtype=np.float64)
    return out[0, 0].numpy(), scale


def to_resampled(points: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Native (slice, row, col) [..., 3] → coordinates in the resampled volume."""
    return (np.asarray(points, dtype=np.float64) + 0.5) * scale - 0.5


def to_native(points: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Resampled-volume coordinates [..., 3] → native (slice, row, col)."""
    return (np.asarray(points, dtype=np.float64) + 0.5) / scale - 0.5


__all__ = [
    "normalise_intensity",
    "crop_affine",
    "crop_stack",
    "stack_slices",
    "resample_volume",
    "to_resampled",
    "to_native",
]
