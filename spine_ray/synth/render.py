"""Render a phantom through a series' geometry: tissue contrast per sequence, bias field, noise.

Pure numpy: every slice is evaluated at its voxel centres' patient coordinates in one vectorised
call; randomness comes in as an explicit `np.random.Generator`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spine_ray.core.schema import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2
from spine_ray.synth.anatomy import ANNULUS as ANNULUS_R
from spine_ray.synth.anatomy import NUCLEUS as NUCLEUS_R
from spine_ray.synth.anatomy import Spine
from spine_ray.synth.geometry import SeriesGeometry, Slice
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


# --- the realistic preset -------------------------------------------------------------------
# Relative intensity of each realistic tissue (AIR, SOFT, FAT, MUSCLE, MARROW, CORTEX, NUCLEUS,
# ANNULUS, CSF, NERVE, LIGAMENT, JOINT, BOWEL, VESSEL). T1: fat and fatty marrow bright, CSF and
# disc dark. FSE T2: CSF and a hydrated nucleus bright, fat still fairly bright, annulus and
# ligament dark. STIR (a Sagittal T2/STIR series at some sites): fat and marrow suppressed.
REALISTIC_CONTRAST: dict[str, np.ndarray] = {
    "T1": np.array([0.0, 0.36, 0.92, 0.30, 0.66, 0.05, 0.34, 0.28, 0.14, 0.40, 0.24, 0.16, 0.32, 0.03]),
    "T2": np.array([0.0, 0.30, 0.70, 0.20, 0.44, 0.04, 0.86, 0.16, 0.98, 0.34, 0.12, 0.80, 0.48, 0.03]),
    "STIR": np.array([0.0, 0.34, 0.06, 0.18, 0.12, 0.03, 0.88, 0.14, 0.98, 0.36, 0.10, 0.85, 0.55, 0.03]),
}
TEXTURE_DEPTH = np.array([0, 0.10, 0.06, 0.10, 0.22, 0, 0, 0, 0, 0, 0, 0, 0.45, 0], dtype=np.float32)
VENDORS = ("GE", "Siemens", "Philips")


@dataclass(frozen=True)
class Scanner:
    """One site's scanner and protocol: field strength, vendor, noise, stored intensity range, STIR or T2."""

    vendor: str
    tesla: float
    noise: float
    bias_sd: float
    max_value: int  # the brightest stored value at this site
    stir: bool  # Sagittal T2/STIR acquired as STIR
    motion: float  # P(a series shows motion ghosts)
    wrap: float  # P(a series shows phase wrap)


def sample_scanner(rng: np.random.Generator) -> Scanner:
    """A random site: 1.5 T noisier than 3 T, 3 T with a stronger bias field; sites store different ranges."""
    tesla = 3.0 if rng.random() < 0.4 else 1.5
    return Scanner(
        vendor=str(rng.choice(VENDORS)),
        tesla=tesla,
        noise=float(rng.uniform(0.025, 0.04) if tesla == 3.0 else rng.uniform(0.035, 0.06)),
        bias_sd=0.3 if tesla == 3.0 else 0.18,
        max_value=int(rng.choice([900, 1500, 2500, 4000])),
        stir=bool(rng.random() < 0.15),
        motion=0.08,
        wrap=0.04,
    )


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear interpolation weights [n_out, n_in] from a coarse grid to a fine one over the same field of view."""
    x = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
    x = np.clip(x, 0, n_in - 1)
    i0 = np.floor(x).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    f = x - i0
    m = np.zeros((n_out, n_in), dtype=np.float32)
    m[np.arange(n_out), i0] += 1 - f
    m[np.arange(n_out), i1] += f
    return m


def _acquired_points(s: Slice, rows: int, cols: int, depth: float) -> np.ndarray:
    """Patient points of a rows × cols acquisition grid over the slice's field of view, `depth` mm off-plane."""
    fy = (np.arange(rows) + 0.5) * s.rows / rows - 0.5
    fx = (np.arange(cols) + 0.5) * s.cols / cols - 0.5
    r, c = np.asarray(s.row_dir), np.asarray(s.col_dir)
    return (
        np.asarray(s.position)
        + depth * s.normal
        + fx[None, :, None] * (s.spacing[1] * r)
        + fy[:, None, None] * (s.spacing[0] * c)
    )


def coil_profile(points: np.ndarray, spine: Spine) -> np.ndarray:
    """Spine-coil sensitivity: brightest at the patient's back, falling off anteriorly."""
    p = (points - spine.origin) @ spine.rotation
    v = p[..., 1] - 0.5 * spine._curve(p[..., 2])[0]  # the trunk's frame: the back follows half the lordosis
    return (0.45 + 0.55 * np.exp(-np.clip(spine.back - v, 0.0, None) / 110.0)).astype(np.float32)


def render_realistic(
    spine: Spine, geom: SeriesGeometry, description: str, scanner: Scanner, rng: np.random.Generator
) -> list[np.ndarray]:
    """One uint16 image per slice: acquired on a coarser matrix, two sub-planes of slice profile, upsampled like a scanner's reconstruction."""
    weighting = "T1" if description == SAGITTAL_T1 else "STIR" if (description == SAGITTAL_T2 and scanner.stir) else "T2"
    contrast = (REALISTIC_CONTRAST[weighting] * rng.uniform(0.92, 1.08, len(REALISTIC_CONTRAST[weighting]))).astype(np.float32)
    contrast[0] = 0.0
    bias = rng.normal(0.0, scanner.bias_sd, 6)
    scale = rng.uniform(0.55, 0.85) * scanner.max_value
    acq = int(rng.choice([224, 256, 288]))  # acquired matrix; the scanner interpolates to the stored one
    ghosts = rng.random() < scanner.motion
    wrap = rng.random() < scanner.wrap
    images = []
    for s in geom.slices:
        rows, cols = min(acq, s.rows), min(acq, s.cols)
        img = np.zeros((rows, cols), np.float32)
        for depth in (-0.25 * geom.thickness, 0.25 * geom.thickness):
            pts = _acquired_points(s, rows, cols, depth)
            tissue, mod = spine.sample(pts)
            base = contrast[tissue]
            nucleus = tissue == NUCLEUS_R
            base[nucleus] = contrast[ANNULUS_R] + mod[nucleus] * (contrast[NUCLEUS_R] - contrast[ANNULUS_R])
            img += 0.5 * base * (1.0 + TEXTURE_DEPTH[tissue] * np.where(nucleus, 0.0, mod))
        pts = _acquired_points(s, rows, cols, 0.0)
        img *= (bias_field(pts, bias) * coil_profile(pts, spine)).astype(np.float32)
        if wrap:
            # Anatomy beyond the phase field of view folds back onto the opposite edge.
            k = cols // 8
            img[:, :k] += 0.3 * img[:, -k:][:, ::-1]
        if ghosts:
            # Periodic motion: faint copies of the image displaced along the phase direction.
            shift = int(rng.integers(cols // 10, cols // 4))
            img = img + 0.07 * np.roll(img, shift, axis=1) + 0.07 * np.roll(img, -shift, axis=1)
        re = img + scanner.noise * rng.standard_normal(img.shape, dtype=np.float32)
        im = scanner.noise * rng.standard_normal(img.shape, dtype=np.float32)
        mag = np.sqrt(re**2 + im**2)
        if (rows, cols) != (s.rows, s.cols):
            mag = _interp_matrix(s.rows, rows) @ mag @ _interp_matrix(s.cols, cols).T
        images.append(np.clip(np.rint(mag * scale), 0, MAX_STORED).astype(np.uint16))
    return images
