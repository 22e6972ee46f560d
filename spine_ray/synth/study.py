"""Generate one study: phantom, series, DICOM files, label coordinates and applied quirks.

`make_study` is pure apart from writing its own files; the orchestration in `generate` runs it
in-process or as one Ray task per study. All randomness comes from `(seed, study index)`, so a
study's files are identical whichever worker makes them.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field, replace

import numpy as np

from spine_ray.core.config import ConfigError
from spine_ray.core.schema import CONDITION_SERIES, CONDITION_TITLES, CONDITIONS, LEVEL_TITLES
from spine_ray.core.storage import atomic_write_bytes, is_local, join
from spine_ray.synth.acquisition import AcquisitionConfig, SeriesPlan, plan_study
from spine_ray.synth.anatomy import sample_spine
from spine_ray.synth.dicomwrite import (
    SeriesHeader,
    frame_of_reference_uid,
    image_bytes,
    non_image_bytes,
)
from spine_ray.synth.geometry import SeriesGeometry, Slice, nearest_slice
from spine_ray.synth.labels import LabelConfig
from spine_ray.synth.phantom import N_LEVELS, sample_phantom
from spine_ray.synth.presets import PRESETS
from spine_ray.synth.render import render_realistic, render_series, sample_scanner

QUIRKS: tuple[str, ...] = (
    "monochrome1", "rescale", "explicit", "implicit", "deflated", "mixed_sizes", "non_image", "truncated",
)


@dataclass(frozen=True)
class SynthConfig:
    """Everything that determines a synthetic dataset, given its seed."""

    studies: int = 100
    test_studies: int = 0
    seed: int = 0
    quirks: float = 0.0  # fraction of series that get one quirk
    quirk_kinds: tuple[str, ...] = QUIRKS
    noise: float = 0.035  # Gaussian noise σ relative to the brightest tissue (simple; realistic draws it per site)
    preset: str = "simple"  # "simple" or "realistic" (see PRESETS for the acquisition it goes with)
    off_level: float = 0.02  # realistic: fraction of coordinates a reader put on the adjacent level
    jitter_mm: float = 1.5  # realistic: σ of a reader's in-plane placement error; 5% of points get 3× it
    labels: LabelConfig = field(default_factory=LabelConfig)
    acquisition: AcquisitionConfig = field(default_factory=AcquisitionConfig)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r} (known: {list(PRESETS)})")
        unknown = sorted(set(self.quirk_kinds) - set(QUIRKS))
        if unknown:
            raise ConfigError(f"unknown quirk kinds {unknown} (known: {list(QUIRKS)})")
        if not 0.0 <= self.quirks <= 1.0:
            raise ConfigError(f"quirks is a fraction of series, got {self.quirks}")
        if self.studies < 0 or self.test_studies < 0 or self.studies + self.test_studies == 0:
            raise ConfigError("need at least one study")
        if not self.acquisition.image_sizes or min(self.acquisition.image_sizes) < 16:
            raise ConfigError(f"image sizes must be at least 16 px, got {self.acquisition.image_sizes}")


@dataclass(frozen=True)
class StudyTask:
    """One study to make: its place in the run, id, split, labels [25] and latents [25]."""

    index: int
    study_id: int
    split: str  # "train" or "test"
    labels: np.ndarray
    latent: np.ndarray


@dataclass(frozen=True)
class StudyResult:
    """Rows the study contributes to the dataset's tables."""

    series: list[tuple[int, int, str]]
    coordinates: list[tuple[int, int, int, str, str, float, float]]
    quirks: list[tuple[int, int, str, str]]


def write_file(url: str, data: bytes) -> None:
    """Write one file via a temporary name; locally without fsync (the manifest seals the run)."""
    if not is_local(url):
        atomic_write_bytes(url, data)
        return
    os.makedirs(os.path.dirname(url), exist_ok=True)
    tmp = f"{url}.tmp-{uuid.uuid4().hex[:8]}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, url)


def _mixed_sizes(geom: SeriesGeometry, rng: np.random.Generator) -> tuple[SeriesGeometry, str]:
    """Re-size the last slices of a series (same field of view, other matrix)."""
    first = geom.slices[0]
    factor = float(rng.choice([0.75, 1.25, 1.5]))
    rows, cols = int(round(first.rows * factor)), int(round(first.cols * factor))
    k = max(1, len(geom.slices) // 3)
    changed = []
    for s in geom.slices[-k:]:
        spacing = (round(s.spacing[0] * s.rows / rows, 4), round(s.spacing[1] * s.cols / cols, 4))
        changed.append(replace(s, rows=rows, cols=cols, spacing=spacing))
    return replace(geom, slices=geom.slices[:-k] + tuple(changed)), f"{k} slices {rows}x{cols}"


def _reader_point(points: dict, c: int, lv: int, cfg: SynthConfig, rng: np.random.Generator | None) -> tuple[np.ndarray, float]:
    """Where a reader marks (c, lv) and their in-plane error σ (mm); realistic readers slip a level now and then."""
    if rng is None:
        return points[(c, lv)], 0.0
    other = lv + (1 if lv == 0 else -1 if lv == N_LEVELS - 1 else int(rng.choice([-1, 1])))
    point = points[(c, other)] if rng.random() < cfg.off_level else points[(c, lv)]
    return point, cfg.jitter_mm * (3.0 if rng.random() < 0.05 else 1.0)


def _coordinates(task: StudyTask, plans: list[SeriesPlan], points: dict, cfg: SynthConfig, rng: np.random.Generator | None = None) -> tuple[list, set]:
    """Label coordinates on the series each condition is read on, and the annotated files."""
    rows, used = [], set()
    for c, cond in enumerate(CONDITIONS):
        for lv in range(N_LEVELS):
            if task.labels[c * N_LEVELS + lv] < 0:
                continue
            point, sd = _reader_point(points, c, lv, cfg, rng)
            for plan in plans:
                if plan.description != CONDITION_SERIES[cond]:
                    continue
                i, x, y, d = nearest_slice(plan.geometry, point)
                if d > 0.75 * plan.geometry.spacing_between and point is not points[(c, lv)]:
                    i, x, y, d = nearest_slice(plan.geometry, points[(c, lv)])  # no slice there: the reader used the right one
                s: Slice = plan.geometry.slices[i]
                if sd > 0:
                    x += float(rng.normal(0, sd / s.spacing[1]))
                    y += float(rng.normal(0, sd / s.spacing[0]))
                inside = 0 <= x < s.cols and 0 <= y < s.rows
                if d <= 0.75 * plan.geometry.spacing_between and inside:
                    inst = plan.instance_numbers[i]
                    rows.append((task.study_id, plan.series_id, inst, CONDITION_TITLES[c], LEVEL_TITLES[lv], round(x, 3), round(y, 3)))
                    used.add((plan.series_id, inst))
                    break
    return rows, used


def make_study(task: StudyTask, cfg: SynthConfig, out: str) -> StudyResult:
    """Render and write all series of one study; return its table rows."""
    rng = np.random.default_rng([cfg.seed, 1, task.index])
    realistic = cfg.preset == "realistic"
    phantom = sample_spine(task.latent, rng) if realistic else sample_phantom(task.latent, rng)
    scanner = sample_scanner(rng) if realistic else None
    plans = plan_study(phantom, task.labels, rng, cfg.acquisition)
    quirk_rows: list[tuple[int, int, str, str]] = []
    kinds = {}
    for n, plan in enumerate(plans):
        if cfg.quirk_kinds and rng.random() < cfg.quirks:
            kinds[n] = str(rng.choice(list(cfg.quirk_kinds)))
            if kinds[n] == "mixed_sizes":
                geom, detail = _mixed_sizes(plan.geometry, rng)
                plans[n] = replace(plan, geometry=geom)
                quirk_rows.append((task.study_id, plan.series_id, "mixed_sizes", detail))
    coords, used = _coordinates(task, plans, phantom.target_points(), cfg, rng if realistic else None)
    frame = frame_of_reference_uid(cfg.seed, task.study_id)
    folder = join(out, f"{task.split}_images", str(task.study_id))
    for n, plan in enumerate(plans):
        kind = kinds.get(n, "")
        header = SeriesHeader(
            study_id=task.study_id,
            series_id=plan.series_id,
            series_number=n + 1,
            description=plan.description,
            frame_of_reference=frame,
            geometry=plan.geometry,
            transfer_syntax=kind if kind in ("explicit", "implicit", "deflated") else "rle",
            monochrome1=kind == "monochrome1",
            rescale=(round(float(rng.uniform(0.5, 2.0)), 3), float(rng.integers(-100, 100))) if kind == "rescale" else None,
        )
        if scanner is not None:
            images = render_realistic(phantom, plan.geometry, plan.description, scanner, rng)
        else:
            images = render_series(phantom, plan.geometry, plan.description, rng, cfg.noise)
        files = {inst: image_bytes(header, s, img, inst) for s, img, inst in zip(plan.geometry.slices, images, plan.instance_numbers, strict=True)}
        if kind in ("monochrome1", "rescale", "explicit", "implicit", "deflated"):
            detail = f"slope={header.rescale[0]} intercept={header.rescale[1]}" if header.rescale else ""
            quirk_rows.append((task.study_id, plan.series_id, kind, detail))
        elif kind == "non_image":
            inst = max(plan.instance_numbers) + 1
            files[inst] = non_image_bytes(header, inst)
            quirk_rows.append((task.study_id, plan.series_id, kind, f"instance {inst}"))
        elif kind == "truncated":
            free = [i for i in plan.instance_numbers if (plan.series_id, i) not in used]
            if free:
                inst = int(rng.choice(free))
                files[inst] = files[inst][: len(files[inst]) // 2]
                quirk_rows.append((task.study_id, plan.series_id, kind, f"instance {inst}"))
        for inst, data in files.items():
            write_file(join(folder, str(plan.series_id), f"{inst}.dcm"), data)
    series = [(task.study_id, p.series_id, p.description) for p in plans]
    return StudyResult(series, coords, quirk_rows)


__all__ = ["PRESETS", "QUIRKS", "SynthConfig", "StudyTask", "StudyResult", "make_study", "LabelConfig", "AcquisitionConfig"]
