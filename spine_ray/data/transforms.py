"""Augmentations: pure functions on channel-first numpy arrays, randomness from an explicit Generator.

Slice shifts follow the real errors of stage 1 and rotations turn the crop window before
cropping (see `spine_ray.data.crops`). `mirror_name` pairs left_* and right_* names: a mirrored left
foramen is a right foramen (the left–right flip itself is `spine_ray.stages.grade.augment.flip_sample`).
"""

from __future__ import annotations

import numpy as np

INTENSITY_NOISE = 0.03  # σ of `intensity`'s additive Gaussian noise on a [0, 1] image


def mirror_name(name: str) -> str:
    """'left_…' ↔ 'right_…' anywhere in a label/point name (e.g. a LABEL_COLUMNS entry); others unchanged."""
    return name.replace("left_", "\0").replace("right_", "left_").replace("\0", "right_")


def sample_slice_shift(
    rng: np.random.Generator, errors: np.ndarray | None = None, sigma: float = 0.5
) -> int:
    """An integer slice offset drawn from observed stage-1 OOF slice errors, or round(N(0, sigma))."""
    if errors is not None and len(errors):
        return int(np.rint(rng.choice(np.asarray(errors, dtype=np.float64))))
    return int(np.rint(rng.normal(0.0, sigma)))


def random_angle(rng: np.random.Generator, max_deg: float = 15.0) -> float:
    """An in-plane crop rotation in degrees, uniform in ±max_deg (for `crops.crop_stack(angle=…)`)."""
    return float(rng.uniform(-max_deg, max_deg))


def draw_intensity(
    rng: np.random.Generator,
    shape: tuple[int, ...],
    gamma: tuple[float, float] = (0.7, 1.5),
    contrast: tuple[float, float] = (0.75, 1.25),
    brightness: float = 0.1,
    noise: float = INTENSITY_NOISE,
) -> tuple[float, float, float, np.ndarray | None]:
    """The draws of `intensity` for an array of `shape`, in its order: gamma, contrast, brightness, noise [shape] float32 (None without)."""
    g = float(np.exp(rng.uniform(np.log(gamma[0]), np.log(gamma[1]))))
    c = rng.uniform(*contrast)
    b = rng.uniform(-brightness, brightness)
    n = None
    if noise:
        n = rng.standard_normal(size=shape)  # the draws of rng.normal(0, noise, shape), without its per-value loc and scale
        n *= noise
        n = n.astype(np.float32)
    return g, c, b, n


def apply_intensity(x: np.ndarray, g: float, c: float, b: float, n: np.ndarray | None) -> np.ndarray:
    """Gamma g, contrast c about the mean, brightness b and additive noise n on a [0, 1] array (computed in float64) → float32."""
    y = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0).astype(np.float64)
    y **= g  # in place, in the order of (y ** g − m) · c + m + b + n: the same values, fewer temporaries
    m = y.mean()
    y -= m
    y *= c
    y += m
    y += b
    if n is not None:
        y += n
    return np.clip(y, 0.0, 1.0, out=y).astype(np.float32)


def intensity(
    x: np.ndarray,
    rng: np.random.Generator,
    gamma: tuple[float, float] = (0.7, 1.5),
    contrast: tuple[float, float] = (0.75, 1.25),
    brightness: float = 0.1,
    noise: float = INTENSITY_NOISE,
) -> np.ndarray:
    """Random gamma, contrast (about the mean), brightness and Gaussian noise on a [0, 1] array."""
    return apply_intensity(x, *draw_intensity(rng, np.shape(x), gamma, contrast, brightness, noise))


__all__ = ["INTENSITY_NOISE", "sample_slice_shift", "random_angle", "draw_intensity", "apply_intensity", "intensity", "mirror_name"]
