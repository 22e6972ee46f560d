"""Augmentations: pure functions on channel-first numpy arrays, randomness from an explicit Generator.

Geometric jitter acts on the crop centre *before* cropping (see `spine_ray.crops`), so it is
sized in millimetres and slices like the real errors of stage 1. The left–right flip also swaps
every left_* and right_* label and point: a mirrored left foramen is a right foramen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar

import numpy as np

from spine_ray.schema import CONDITIONS

View = Literal["axial", "sagittal"]
V = TypeVar("V")


def mirror_name(name: str) -> str:
    """'left_…' ↔ 'right_…' anywhere in a label/point name (e.g. a LABEL_COLUMNS entry); others unchanged."""
    return name.replace("left_", "\0").replace("right_", "left_").replace("\0", "right_")


# Condition index → its mirror (spinal stays; left ↔ right foraminal and subarticular).
MIRROR_CONDITION: tuple[int, ...] = tuple(CONDITIONS.index(mirror_name(c)) for c in CONDITIONS)


def sample_slice_shift(
    rng: np.random.Generator, errors: np.ndarray | None = None, sigma: float = 0.5
) -> int:
    """An integer slice offset drawn from observed stage-1 OOF slice errors, or round(N(0, sigma))."""
    if errors is not None and len(errors):
        return int(np.rint(rng.choice(np.asarray(errors, dtype=np.float64))))
    return int(np.rint(rng.normal(0.0, sigma)))


def jitter_point(
    rng: np.random.Generator,
    point: Sequence[float],
    spacing: Sequence[float],
    xy_mm: float = 2.0,
    slice_errors: np.ndarray | None = None,
    slice_sigma: float = 0.5,
) -> tuple[np.ndarray, int]:
    """Move a crop centre (slice, row, col): Gaussian `xy_mm` in-plane, slice as `sample_slice_shift`.

    Returns the new point and the slice shift; the labelled slice then sits at index
    k − shift of the 2k+1 crop (the aux target of the grader).
    """
    shift = sample_slice_shift(rng, slice_errors, slice_sigma)
    d = rng.normal(0.0, xy_mm, size=2) / np.asarray(spacing, dtype=np.float64)
    s, r, c = (float(v) for v in point)
    return np.array([s + shift, r + d[0], c + d[1]]), shift


def random_angle(rng: np.random.Generator, max_deg: float = 15.0) -> float:
    """An in-plane crop rotation in degrees, uniform in ±max_deg (for `crops.crop_stack(angle=…)`)."""
    return float(rng.uniform(-max_deg, max_deg))


def intensity(
    x: np.ndarray,
    rng: np.random.Generator,
    gamma: tuple[float, float] = (0.7, 1.5),
    contrast: tuple[float, float] = (0.75, 1.25),
    brightness: float = 0.1,
    noise: float = 0.03,
) -> np.ndarray:
    """Random gamma, contrast (about the mean), brightness and Gaussian noise on a [0, 1] array."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0)
    g = np.exp(rng.uniform(np.log(gamma[0]), np.log(gamma[1])))
    x = x**g
    m = x.mean()
    x = (x - m) * rng.uniform(*contrast) + m + rng.uniform(-brightness, brightness)
    if noise:
        x = x + rng.normal(0.0, noise, size=x.shape).astype(np.float32)
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def swap_left_right(mapping: Mapping[str, V]) -> dict[str, V]:
    """A dict keyed by condition or label column with left_* and right_* entries exchanged."""
    return {mirror_name(k): v for k, v in mapping.items()}


def mirror_conditions(condition: np.ndarray) -> np.ndarray:
    """Condition indices (CONDITIONS order) with left and right exchanged, e.g. a grader sample's [T]."""
    return np.asarray(MIRROR_CONDITION)[np.asarray(condition)]


def mirror_permutation(names: Sequence[str]) -> np.ndarray:
    """Index array that reorders per-name rows (points, heatmap channels, labels) after a flip.

    `flipped_points = points[mirror_permutation(names)]`: row i of the result is the old row of
    mirror_name(names[i]). Every mirrored name must be in `names`.
    """
    index = {n: i for i, n in enumerate(names)}
    return np.array([index[mirror_name(n)] for n in names], dtype=np.int64)


def flip_left_right(
    image: np.ndarray,
    view: View,
    labels: Mapping[str, Any] | None = None,
    points: Mapping[str, np.ndarray] | None = None,
    slice_axis: int = 0,
) -> tuple[np.ndarray, dict[str, Any] | None, dict[str, np.ndarray] | None]:
    """Mirror the patient left–right, and the labels and points with it.

    image: [..., H, W] with slices along `slice_axis` (0 for a stack [S, C, H, W], 1 for a
    grader sample [T, S, C, H, W]). Axial: the image columns flip (patient left–right runs
    across the columns). Sagittal: the slice order reverses (slices run left–right); the
    in-plane image is unchanged. Points are (slice, row, col) arrays [..., 3] in this image's
    voxel indices and move with the flip. Keys of `labels` and `points` are swapped
    left_* ↔ right_* (see `mirror_name`): right for an image that shows both sides. For a
    grader sample of per-target crops, keep each crop's severity and mirror its condition id
    instead (`mirror_conditions`): the flipped left crop now shows a right-side structure.
    """
    image = np.asarray(image)
    n_slices, width = image.shape[slice_axis], image.shape[-1]
    match view:
        case "axial":
            flipped = np.flip(image, axis=-1).copy()
            axis, size = 2, width
        case "sagittal":
            flipped = np.flip(image, axis=slice_axis).copy()
            axis, size = 0, n_slices
        case _:
            raise ValueError(f"view must be 'axial' or 'sagittal', got {view!r}")

    def move(p: np.ndarray) -> np.ndarray:
        p = np.array(p, dtype=np.float64)
        p[..., axis] = size - 1 - p[..., axis]
        return p

    new_labels = None if labels is None else swap_left_right(labels)
    new_points = None if points is None else {mirror_name(k): move(v) for k, v in points.items()}
    return flipped, new_labels, new_points


__all__ = [
    "MIRROR_CONDITION",
    "sample_slice_shift",
    "jitter_point",
    "random_angle",
    "intensity",
    "mirror_name",
    "swap_left_right",
    "mirror_conditions",
    "mirror_permutation",
    "flip_left_right",
]
