"""DICOM series geometry: slice planes in patient coordinates (LPS, mm), voxel centres, projection.

Conventions follow DICOM: ImageOrientationPatient is (row direction, column direction), the
row direction being the way the column index x grows; PixelSpacing is [row spacing, column
spacing], i.e. [Δy, Δx]. A pixel (x, y) of slice i lies at IPP_i + x·Δx·row_dir + y·Δy·col_dir.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Slice:
    """One image plane: its top-left voxel centre and its in-plane directions."""

    position: tuple[float, float, float]  # ImagePositionPatient
    row_dir: tuple[float, float, float]  # direction of increasing column index x
    col_dir: tuple[float, float, float]  # direction of increasing row index y
    rows: int
    cols: int
    spacing: tuple[float, float]  # PixelSpacing [row spacing Δy, column spacing Δx]

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal, row_dir × col_dir."""
        n = np.cross(self.row_dir, self.col_dir)
        return n / np.linalg.norm(n)

    def voxel_centres(self) -> np.ndarray:
        """Patient coordinates of every pixel centre: [rows, cols, 3]."""
        y, x = np.mgrid[0 : self.rows, 0 : self.cols].astype(np.float64)
        r, c = np.asarray(self.row_dir), np.asarray(self.col_dir)
        return (
            np.asarray(self.position)
            + x[..., None] * (self.spacing[1] * r)
            + y[..., None] * (self.spacing[0] * c)
        )

    def project(self, point: np.ndarray) -> tuple[float, float, float]:
        """A patient point → (x, y, signed distance from the plane), x and y in pixels."""
        d = np.asarray(point, dtype=np.float64) - np.asarray(self.position)
        x = float(d @ np.asarray(self.row_dir)) / self.spacing[1]
        y = float(d @ np.asarray(self.col_dir)) / self.spacing[0]
        return x, y, float(d @ self.normal)


@dataclass(frozen=True)
class SeriesGeometry:
    """The planes of one series, in acquisition order, with their thickness and spacing."""

    slices: tuple[Slice, ...]
    thickness: float
    spacing_between: float


def pixel_to_patient(
    position: np.ndarray, orientation: np.ndarray, spacing: np.ndarray, x: float, y: float
) -> np.ndarray:
    """DICOM tags (IPP, IOP, PixelSpacing [Δy, Δx]) and pixel (x, y) → patient point (mm)."""
    o = np.asarray(orientation, dtype=np.float64)
    return np.asarray(position, dtype=np.float64) + x * spacing[1] * o[:3] + y * spacing[0] * o[3:]


def plane_stack(
    centre: np.ndarray,
    row_dir: np.ndarray,
    col_dir: np.ndarray,
    size: tuple[int, int],
    spacing: tuple[float, float],
    offsets: np.ndarray,
) -> list[Slice]:
    """Parallel planes centred on `centre` + k·normal for each offset k (mm)."""
    r = np.asarray(row_dir, dtype=np.float64)
    r /= np.linalg.norm(r)
    c = np.asarray(col_dir, dtype=np.float64)
    c -= r * (c @ r)
    c /= np.linalg.norm(c)
    n = np.cross(r, c)
    rows, cols = size
    half = ((cols - 1) / 2) * spacing[1] * r + ((rows - 1) / 2) * spacing[0] * c
    out = []
    for k in offsets:
        top_left = np.asarray(centre) + float(k) * n - half
        out.append(
            Slice(
                position=tuple(round(float(v), 4) for v in top_left),
                row_dir=tuple(round(float(v), 6) for v in r),
                col_dir=tuple(round(float(v), 6) for v in c),
                rows=rows,
                cols=cols,
                spacing=(round(spacing[0], 6), round(spacing[1], 6)),
            )
        )
    return out


def nearest_slice(geom: SeriesGeometry, point: np.ndarray) -> tuple[int, float, float, float]:
    """The slice closest to a point along its normal: (index, x, y, |distance| mm)."""
    best = None
    for i, s in enumerate(geom.slices):
        x, y, d = s.project(point)
        if best is None or abs(d) < best[3]:
            best = (i, x, y, abs(d))
    assert best is not None
    return best
