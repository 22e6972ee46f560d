"""Render a phantom through a series' geometry: tissue contrast per sequence, bias field, noise.

Pure numpy: every slice is evaluated at its voxel centres' patient coordinates in one vectorised
call; randomness comes in as an explicit `np.random.Generator`.
"""

from __future__ import annotations

import numpy as np

from spine_ray.schema import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2
from spine_ray.synth.geometry import SeriesGeometry
from spine_ray.synth.phantom import N_TISSUES, Phantom

# Relative intensity of each tissue (AIR, SOFT, FAT, MUSCLE, MARROW, BONE, DISC, CSF, NERVE).
# T1: fat bright, CSF dark. T2: CSF bright, healthy disc bright, fat intermediate.
CONTRAST: dict[str, np.ndarray] = {
    SAGITTAL_T1: np.array([0.0, 0.38, 0.95, 0.30, 0.62, 0.18, 0.36, 0.10, 0.42]),
    SAGITTAL_T2: np.array([0.0, 0.30, 0.55, 0.22, 0.42, 0.12, 0.70, 0.97, 0.35]),
    AXIAL_T2: np.array([0.0, 0.30, 0.58, 0.24, 0.42, 0.12, 0.66, 0.97, 0.33]),
}
assert all(len(c) == N_TISSUES for c in CONTRAST.values())
MAX_STORED = 4095  # 12 bits stored


def bias_field(points: np.ndarray, rng_params: np.ndarray) -> np.ndarray:
    """A smooth multiplicative field over patient points [..., 3]: exp of a low-order polynomial."""
    a = rng_params
    p = points / 150.0
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    return np.exp(a[0] * x + a[1] * y + a[2] * z + a[3] * x * y + a[4] * y * z + a[5] * (x**2 + y**2 - z**2))


def render_series(
    phantom: Phantom,
    geom: SeriesGeometry,
    description: str,
    rng: np.random.Generator,
    noise: float = 0.035,
) -> list[np.ndarray]:
    """One uint16 image per slice (12-bit values), in the order of `geom.slices`."""
    contrast = CONTRAST[description] * rng.uniform(0.9, 1.1, N_TISSUES)
    contrast[0] = 0.0
    bias = rng.normal(0.0, 0.25, 6)
    scale = rng.uniform(0.35, 0.8) * MAX_STORED
    images = []
    for s in geom.slices:
        pts = s.voxel_centres()
        img = (contrast[phantom.tissue(pts)] * bias_field(pts, bias)).astype(np.float32)
        # Rician-like noise: magnitude of a complex signal with Gaussian noise on both parts.
        re = img + noise * rng.standard_normal(img.shape, dtype=np.float32)
        im = noise * rng.standard_normal(img.shape, dtype=np.float32)
        mag = np.sqrt(re**2 + im**2)
        images.append(np.clip(np.rint(mag * scale), 0, MAX_STORED).astype(np.uint16))
    return images
