"""Crops and resampling for both stages, in plain numpy (plus torch's interpolate for volumes).

Conventions: a volume is [S, H, W] (slices ordered along the slice normal); a point is
(slice, row, col) in native voxel indices, pixel i having its centre at i (the competition's
x is col, y is row); PixelSpacing is [row_mm, col_mm]. Crops are sized in millimetres and
resampled to a fixed pixel size, so the same anatomy has the same size whatever the scanner.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

SlicePad = Literal["zero", "edge"]


def normalise_intensity(x: np.ndarray, p01: float, p99: float) -> np.ndarray:
    """Window raw intensities to [0, 1] float32 with the stack's 1st and 99th percentiles."""
    scale = 1.0 / max(float(p99) - float(p01), 1e-6)
    return np.clip((np.asarray(x, dtype=np.float32) - p01) * scale, 0.0, 1.0).astype(np.float32)


def intensity_window(volume: np.ndarray) -> tuple[float, float]:
    """The (p01, p99) window of a whole stack, for `normalise_intensity`."""
    lo, hi = np.percentile(np.asarray(volume, dtype=np.float32), [1.0, 99.0])
    return float(lo), float(hi)


def _bilinear(
    image: np.ndarray, rows: np.ndarray, cols: np.ndarray, window: tuple[float, float] | None
) -> np.ndarray:
    """Sample image [N, H, W] at float positions rows [h], cols [w] → [N, h, w]; zero outside.

    Outside voxels count as 0 *after* windowing, so padding reads as black, and a sample half
    a pixel off the edge is half as bright (like grid_sample's zero padding).
    """
    n, h, w = image.shape
    r0 = np.floor(rows).astype(np.int64)
    c0 = np.floor(cols).astype(np.int64)
    fr = (rows - r0).astype(np.float32)[:, None]
    fc = (cols - c0).astype(np.float32)[None, :]
    out = np.zeros((n, len(rows), len(cols)), dtype=np.float32)
    for dr, wr in ((0, 1 - fr), (1, fr)):
        rr = r0 + dr
        rok = (rr >= 0) & (rr < h)
        for dc, wc in ((0, 1 - fc), (1, fc)):
            cc = c0 + dc
            cok = (cc >= 0) & (cc < w)
            vals = image[:, np.clip(rr, 0, h - 1)][:, :, np.clip(cc, 0, w - 1)].astype(np.float32)
            if window is not None:
                vals = normalise_intensity(vals, *window)
            mask = (rok[:, None] & cok[None, :]).astype(np.float32)
            out += vals * (wr * wc * mask)[None]
    return out


def crop_stack(
    volume: np.ndarray,
    spacing: Sequence[float],
    point: Sequence[float],
    size_mm: float | Sequence[float] = 40.0,
    out_px: int | Sequence[int] = 64,
    k: int = 2,
    window: tuple[float, float] | None = None,
    slice_pad: SlicePad = "zero",
) -> np.ndarray:
    """2.5D crop: slices round(point.slice) ± k, each a `size_mm` window around (row, col) → [2k+1, h, w].

    volume [S, H, W] native; spacing [row_mm, col_mm]; size_mm (height_mm, width_mm) or one
    number; out_px (h, w) or one number. With `window=(p01, p99)` values are normalised to
    [0, 1] float32 (use the whole series' window, not the crop's). In-plane, anything outside
    the image is 0. Slices beyond the volume are all-zero (`slice_pad="zero"`, default: the
    model sees there is nothing there rather than a copy that looks like a real neighbour) or
    repeat the edge slice (`"edge"`). The same function serves the axial case: pass the axial
    stack and the axial slice index found from the sagittal point.
    """
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise ValueError(f"volume must be [S, H, W], got shape {volume.shape}")
    hmm, wmm = (float(size_mm),) * 2 if np.isscalar(size_mm) else map(float, size_mm)
    oh, ow = (int(out_px),) * 2 if np.isscalar(out_px) else map(int, out_px)
    s, r, c = (float(v) for v in point)
    rmm, cmm = (float(v) for v in spacing)
    # Output pixel j covers [j, j+1)/n of the window; sample at its centre, in native pixels.
    rows = r + ((np.arange(oh) + 0.5) / oh - 0.5) * (hmm / rmm)
    cols = c + ((np.arange(ow) + 0.5) / ow - 0.5) * (wmm / cmm)
    n_slices = volume.shape[0]
    idx, inside = stack_slices(n_slices, s, k)
    out = _bilinear(volume[np.clip(idx, 0, n_slices - 1)], rows, cols, window)
    if slice_pad == "zero":
        out[~inside] = 0.0
    elif slice_pad != "edge":
        raise ValueError(f"slice_pad must be 'zero' or 'edge', got {slice_pad!r}")
    return out


def stack_slices(n_slices: int, centre: float, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """The 2k+1 slice indices of a crop stack around round(centre), and which lie inside the volume.

    `inside` is the grader's `slice_mask` for that stack.
    """
    idx = int(np.floor(float(centre) + 0.5)) + np.arange(-k, k + 1)
    return idx, (idx >= 0) & (idx < n_slices)


def crop_to_native(
    points: np.ndarray,
    centre: Sequence[float],
    spacing: Sequence[float],
    size_mm: float | Sequence[float] = 40.0,
    out_px: int | Sequence[int] = 64,
) -> np.ndarray:
    """Map (row, col) positions in a crop's pixels [..., 2] back to native pixels (inverse of crop_stack's grid)."""
    hmm, wmm = (float(size_mm),) * 2 if np.isscalar(size_mm) else map(float, size_mm)
    oh, ow = (int(out_px),) * 2 if np.isscalar(out_px) else map(int, out_px)
    step = np.array([hmm / spacing[0] / oh, wmm / spacing[1] / ow])
    size = np.array([oh, ow], dtype=np.float64)
    return np.asarray(centre, dtype=np.float64)[-2:] + (np.asarray(points, dtype=np.float64) + 0.5 - size / 2) * step


def native_to_crop(
    points: np.ndarray,
    centre: Sequence[float],
    spacing: Sequence[float],
    size_mm: float | Sequence[float] = 40.0,
    out_px: int | Sequence[int] = 64,
) -> np.ndarray:
    """Map native (row, col) [..., 2] into a crop's pixel grid (e.g. to place a second point)."""
    hmm, wmm = (float(size_mm),) * 2 if np.isscalar(size_mm) else map(float, size_mm)
    oh, ow = (int(out_px),) * 2 if np.isscalar(out_px) else map(int, out_px)
    step = np.array([hmm / spacing[0] / oh, wmm / spacing[1] / ow])
    size = np.array([oh, ow], dtype=np.float64)
    return (np.asarray(points, dtype=np.float64) - np.asarray(centre, dtype=np.float64)[-2:]) / step + size / 2 - 0.5


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
    "intensity_window",
    "crop_stack",
    "stack_slices",
    "crop_to_native",
    "native_to_crop",
    "resample_volume",
    "to_resampled",
    "to_native",
]
