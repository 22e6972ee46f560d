"""DICOM patient-space geometry: slice normals, voxel↔patient affines and slice projections.

Conventions (DICOM PS3.3 C.7.6.2): ImageOrientationPatient = [X, Y] where X (first 3) is the
direction of increasing column index and Y (last 3) of increasing row index; PixelSpacing is
[row spacing (along Y), column spacing (along X)]. A voxel index (slice k, row i, column j) maps to
    patient = IPP_0 + j * col_spacing * X + i * row_spacing * Y + k * step,
with step = (IPP_last - IPP_0) / (n - 1). The 4x4 affine below takes homogeneous [k, i, j, 1],
matching the array order [S, H, W] of a stacked volume. All distances are in millimetres.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


def directions(orientation: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Unit (X, Y): the directions of increasing column and increasing row index."""
    o = np.asarray(orientation, dtype=np.float64).reshape(2, 3)
    return o[0] / np.linalg.norm(o[0]), o[1] / np.linalg.norm(o[1])


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit slice normal cross(X, Y)."""
    x, y = directions(orientation)
    n = np.cross(x, y)
    return n / np.linalg.norm(n)


def orientation_angle(a: Sequence[float], b: Sequence[float]) -> float:
    """Largest angle in degrees between the row directions or the column directions of two orientations."""
    (ax, ay), (bx, by) = directions(a), directions(b)
    cos = min(float(np.dot(ax, bx)), float(np.dot(ay, by)))
    return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))


def slice_distances(positions: np.ndarray, orientation: Sequence[float]) -> np.ndarray:
    """Position of each slice along the slice normal (dot of IPP with the normal), mm."""
    return np.asarray(positions, dtype=np.float64).reshape(-1, 3) @ slice_normal(orientation)


def slice_step(positions: np.ndarray, orientation: Sequence[float], fallback: float = 1.0) -> np.ndarray:
    """Per-slice step vector (IPP_last - IPP_0)/(n-1); for one slice, normal * fallback."""
    p = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if len(p) < 2:
        return slice_normal(orientation) * fallback
    return (p[-1] - p[0]) / (len(p) - 1)


def affine(
    positions: np.ndarray, orientation: Sequence[float], pixel_spacing: Sequence[float], fallback_step: float = 1.0
) -> np.ndarray:
    """4x4 voxel→patient affine acting on homogeneous [slice k, row i, column j, 1]."""
    x, y = directions(orientation)
    row_sp, col_sp = float(pixel_spacing[0]), float(pixel_spacing[1])
    a = np.eye(4)
    a[:3, 0] = slice_step(positions, orientation, fallback_step)
    a[:3, 1] = y * row_sp
    a[:3, 2] = x * col_sp
    a[:3, 3] = np.asarray(positions, dtype=np.float64).reshape(-1, 3)[0]
    return a


def voxel_to_patient(aff: np.ndarray, kij: np.ndarray) -> np.ndarray:
    """Voxel indices [..., 3] (slice, row, column; fractional allowed) → patient points [..., 3]."""
    kij = np.asarray(kij, dtype=np.float64)
    return kij @ aff[:3, :3].T + aff[:3, 3]


def patient_to_voxel(aff: np.ndarray, xyz: np.ndarray) -> np.ndarray:
    """Patient points [..., 3] → fractional voxel indices [..., 3] (slice, row, column)."""
    xyz = np.asarray(xyz, dtype=np.float64)
    return (xyz - aff[:3, 3]) @ np.linalg.inv(aff[:3, :3]).T


def pixel_to_patient(
    position: Sequence[float], orientation: Sequence[float], pixel_spacing: Sequence[float], row: float, col: float
) -> np.ndarray:
    """A (row, column) pixel of one slice with ImagePositionPatient `position` → patient point."""
    x, y = directions(orientation)
    return np.asarray(position, dtype=np.float64) + col * float(pixel_spacing[1]) * x + row * float(pixel_spacing[0]) * y


def patient_to_pixel(
    point: Sequence[float], position: Sequence[float], orientation: Sequence[float], pixel_spacing: Sequence[float]
) -> tuple[float, float, float]:
    """Project a patient point onto one slice: (row, column, signed distance along the normal in mm)."""
    x, y = directions(orientation)
    d = np.asarray(point, dtype=np.float64) - np.asarray(position, dtype=np.float64)
    return (
        float(d @ y) / float(pixel_spacing[0]),
        float(d @ x) / float(pixel_spacing[1]),
        float(d @ np.cross(x, y)),
    )


@dataclass(frozen=True)
class SliceHit:
    """The slice of one stack nearest to a point, with the point's pixel there and its distance."""

    stack: int
    slice: int
    row: float
    col: float
    distance_mm: float
    inside: bool


def nearest_slice(
    point: Sequence[float],
    positions: np.ndarray,
    orientation: Sequence[float],
    pixel_spacing: Sequence[float],
    shape: tuple[int, int],
    stack: int = 0,
) -> SliceHit:
    """The slice whose plane is nearest to `point`, with its (row, col) there; inside = within the image."""
    p = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    dist = (np.asarray(point, dtype=np.float64) - p) @ slice_normal(orientation)
    k = int(np.argmin(np.abs(dist)))
    row, col, d = patient_to_pixel(point, p[k], orientation, pixel_spacing)
    inside = -0.5 <= row <= shape[0] - 0.5 and -0.5 <= col <= shape[1] - 0.5
    return SliceHit(stack, k, row, col, abs(d), inside)


@dataclass
class Stack:
    """One image stack: slices in spatial order (along the normal) with their geometry."""

    volume: np.ndarray  # [S, H, W] uint16 or int16
    instance_numbers: list[int]
    positions: np.ndarray  # [S, 3] ImagePositionPatient of each sorted slice, mm
    orientation: tuple[float, ...]  # 6 floats: X (column direction), Y (row direction)
    pixel_spacing: tuple[float, float]  # [row spacing, column spacing], mm
    slice_spacing: float  # median step along the normal, mm
    affine: np.ndarray  # 4x4, [slice, row, col, 1] → patient mm
    frame_of_reference: str = ""
    names: list[str] = field(default_factory=list)

    @property
    def rows(self) -> int:
        """Image height in pixels."""
        return int(self.volume.shape[1])

    @property
    def cols(self) -> int:
        """Image width in pixels."""
        return int(self.volume.shape[2])
