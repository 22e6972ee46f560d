"""Plan a study's MRI series: which series exist, their slice geometry and instance numbering.

Sagittal T1 and Sagittal T2/STIR are stacks of parallel sagittal planes through the spine;
Axial T2 is either one continuous axial stack or oblique blocks, one per disc, tilted to the
disc. Instance numbers follow the real data's habits: not always spatial order, not always from 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spine_ray.core.schema import AXIAL_T2, SAGITTAL_T1, SAGITTAL_T2
from spine_ray.synth.anatomy import Spine
from spine_ray.synth.geometry import SeriesGeometry, Slice, plane_stack
from spine_ray.synth.phantom import N_LEVELS, Phantom


@dataclass(frozen=True)
class AcquisitionConfig:
    """How series are acquired; image sizes are drawn per series from `image_sizes`."""

    image_sizes: tuple[int, ...] = (256,)
    sagittal_slices: tuple[int, int] = (15, 20)
    sagittal_gap_mm: tuple[float, float] = (3.0, 4.0)
    sagittal_fov_mm: tuple[float, float] = (230.0, 300.0)
    sagittal_centre_sd_mm: float = 5.0  # head-foot scatter of the sagittal centre: where the field of view starts
    axial_fov_mm: tuple[float, float] = (160.0, 200.0)
    axial_block_fraction: float = 0.5  # axial series acquired as oblique per-disc blocks
    axial_block_slices: tuple[int, int] = (3, 5)
    axial_gap_mm: tuple[float, float] = (3.5, 4.5)
    extra_axial: tuple[float, float] = (0.15, 0.015)  # P(2 axial series), P(3 axial series)
    missing_series: float = 0.005  # P(a study lacks Sagittal T1), same for Sagittal T2/STIR
    non_square_fraction: float = 0.1  # series whose column spacing differs from row spacing
    shuffled_instances: float = 0.25  # series whose instance numbers are not in spatial order
    offset_instances: float = 0.1  # series whose instance numbers do not start at 1


@dataclass(frozen=True)
class SeriesPlan:
    """One series to render: id, description, geometry and the instance number of each slice."""

    series_id: int
    description: str
    geometry: SeriesGeometry
    instance_numbers: tuple[int, ...]


def _in_plane(rng: np.random.Generator, cfg: AcquisitionConfig, fov: tuple[float, float]) -> tuple[tuple[int, int], tuple[float, float]]:
    """Image size (rows, cols) and PixelSpacing [Δy, Δx] for one series."""
    n = int(rng.choice(cfg.image_sizes))
    dy = rng.uniform(*fov) / n
    dx = dy * (rng.uniform(1.05, 1.25) if rng.random() < cfg.non_square_fraction else 1.0)
    return (n, n), (round(dy, 4), round(dx, 4))


def _numbering(n: int, rng: np.random.Generator, cfg: AcquisitionConfig, blocks: int = 1) -> tuple[int, ...]:
    """Instance numbers for n slices in spatial order: ascending, reversed or block-shuffled."""
    start = int(rng.integers(2, 6000)) if rng.random() < cfg.offset_instances else 1
    order = np.arange(n)
    if rng.random() < cfg.shuffled_instances:
        if blocks > 1:
            parts = np.array_split(order, blocks)
            rng.shuffle(parts)
            order = np.concatenate(parts)
        else:
            order = order[::-1]
    numbers = np.empty(n, dtype=np.int64)
    numbers[order] = start + np.arange(n)
    return tuple(int(v) for v in numbers)


def sagittal(phantom: Phantom | Spine, rng: np.random.Generator, cfg: AcquisitionConfig) -> tuple[SeriesGeometry, int]:
    """A sagittal stack centred on the canal midline; returns it and its number of slices."""
    n = int(rng.integers(cfg.sagittal_slices[0], cfg.sagittal_slices[1] + 1))
    gap = round(float(rng.uniform(*cfg.sagittal_gap_mm)), 2)
    size, spacing = _in_plane(rng, cfg, cfg.sagittal_fov_mm)
    centre = phantom.disc_point(2, v=-20.0) + np.array([0.0, 0.0, rng.normal(0, cfg.sagittal_centre_sd_mm)])
    centre[0] = phantom.disc_point(2)[0] + rng.uniform(-0.2, 0.2) * gap
    # Rows run posterior, columns inferior: normal = (0,1,0) × (0,0,-1) = (-1,0,0).
    offsets = (np.arange(n) - (n - 1) / 2) * gap
    slices = plane_stack(centre, np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0]), size, spacing, offsets)
    return SeriesGeometry(tuple(slices), thickness=round(gap * 0.9, 2), spacing_between=gap), n


def axial(phantom: Phantom | Spine, levels: list[int], rng: np.random.Generator, cfg: AcquisitionConfig) -> tuple[SeriesGeometry, int]:
    """An axial series covering `levels`: one continuous stack or one oblique block per disc."""
    gap = round(float(rng.uniform(*cfg.axial_gap_mm)), 2)
    size, spacing = _in_plane(rng, cfg, cfg.axial_fov_mm)
    slices: list[Slice] = []
    row = np.array([1.0, 0.0, 0.0])
    if rng.random() < cfg.axial_block_fraction:
        for lv in levels:
            t = phantom.disc_tangent(lv)
            r = row - t * (row @ t)
            c = np.cross(t, r / np.linalg.norm(r))  # so that r × c = t
            k = int(rng.integers(cfg.axial_block_slices[0], cfg.axial_block_slices[1] + 1))
            offsets = (np.arange(k) - (k - 1) / 2) * gap + rng.uniform(-0.2, 0.2) * gap
            centre = phantom.disc_point(lv, v=-15.0)
            slices += plane_stack(centre, r, c, size, spacing, offsets)
        return SeriesGeometry(tuple(slices), round(gap * 0.9, 2), gap), len(levels)
    top = phantom.disc_point(min(levels))[2] + 15.0
    bottom = phantom.disc_point(max(levels))[2] - 15.0
    n = int(np.ceil((top - bottom) / gap)) + 1
    centre = phantom.disc_point(2, v=-15.0)
    centre[2] = (top + bottom) / 2
    offsets = (np.arange(n) - (n - 1) / 2) * gap
    slices = plane_stack(centre, row, np.array([0.0, 1.0, 0.0]), size, spacing, offsets)
    return SeriesGeometry(tuple(slices), round(gap * 0.9, 2), gap), 1


def plan_study(
    phantom: Phantom | Spine, labels: np.ndarray, rng: np.random.Generator, cfg: AcquisitionConfig
) -> list[SeriesPlan]:
    """The series of one study; axial coverage skips upper levels whose recess labels are empty."""
    plans: list[SeriesPlan] = []
    ids = iter(dict.fromkeys(int(v) for v in rng.integers(1_000_000, 4_000_000_000, 12)))
    for desc in (SAGITTAL_T1, SAGITTAL_T2):
        if rng.random() < cfg.missing_series:
            continue
        geom, _ = sagittal(phantom, rng, cfg)
        plans.append(SeriesPlan(next(ids), desc, geom, _numbering(len(geom.slices), rng, cfg)))
    sub = labels.reshape(5, N_LEVELS)[3:]
    levels = [lv for lv in range(N_LEVELS) if (sub[:, lv] >= 0).any()] or list(range(N_LEVELS))
    u = rng.random()
    n_axial = 3 if u < cfg.extra_axial[1] else 2 if u < cfg.extra_axial[0] + cfg.extra_axial[1] else 1
    for i in range(n_axial):
        # Extra axial series cover the lower spine again, as repeat acquisitions usually do.
        cover = levels if i == 0 else levels[-int(rng.integers(1, len(levels) + 1)) :]
        geom, blocks = axial(phantom, cover, rng, cfg)
        plans.append(SeriesPlan(next(ids), AXIAL_T2, geom, _numbering(len(geom.slices), rng, cfg, blocks)))
    return plans
