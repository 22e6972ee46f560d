"""Stage 2's samples: one per (study, level), a context patch per slot around the stage-1 (or label) point."""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd

from spine_ray.core.schema import LEVELS, with_target
from spine_ray.core.storage import join, read_parquet
from spine_ray.data.crops import crop_stack
from spine_ray.data.half import to_float16
from spine_ray.data.label_flags import excluded_targets
from spine_ray.data.volumes import LABELS_FILE, load_volume
from spine_ray.engine.stage import FoldJob
from spine_ray.stages.grade.config import SLOTS, GradeConfig


@functools.lru_cache(maxsize=4)
def _read_table(url: str) -> pd.DataFrame:
    return read_parquet(url)


def label_table(prepared: str) -> pd.DataFrame:
    """labels.parquet with a `target` column (label column name)."""
    return with_target(_read_table(join(prepared, LABELS_FILE)))


def point_urls(job: FoldJob) -> tuple[str, ...]:
    """The stage-1 points tables a grade job reads: `points` (a whole run's) and/or `points/{view}` (one fold's per view)."""
    return tuple(url for name, url in job.inputs.items() if name == "points" or name.startswith("points/"))


@functools.lru_cache(maxsize=4)
def read_points(urls: tuple[str, ...]) -> pd.DataFrame:
    """Stage-1 points tables as one, by study and target (a fold's per-view tables give that fold's rows of the run's table)."""
    tables = [_read_table(u) for u in urls]
    if len(tables) == 1:
        return tables[0]
    return pd.concat(tables, ignore_index=True).sort_values(["study_id", "target"]).reset_index(drop=True)


@functools.lru_cache(maxsize=4)
def slice_errors(urls: tuple[str, ...]) -> dict[str, np.ndarray]:
    """Stage-1 OOF slice errors per localize view, from points tables."""
    pts = read_points(urls)
    if "slice_err" not in pts:
        return {}
    ok = pts[pts["slice_err"].notna()]
    return {v: g["slice_err"].to_numpy(float) for v, g in ok.groupby("view")}


def fake_points(labels: pd.DataFrame, rng: np.random.Generator, xy_px: float = 1.5, slice_sigma: float = 0.7) -> pd.DataFrame:
    """A stand-in stage-1 points table from label points plus noise (demos and tests without stage 1).

    Gaussian noise of `xy_px` native pixels in-plane, round(N(0, slice_sigma)) slices; `slice_err` is recorded.
    """
    lab = with_target(labels[labels["slice"].notna()])
    lab = lab.drop_duplicates(["study_id", "target"])
    n = len(lab)
    shift = np.rint(rng.normal(0.0, slice_sigma, n))
    view = lab["condition"].map({c: v for c, _, v in SLOTS})
    return pd.DataFrame({
        "study_id": lab["study_id"].astype(int).to_numpy(), "target": lab["target"].to_numpy(), "view": view.to_numpy(),
        "series_id": lab["series_id"].astype(int).to_numpy(), "stack": lab["stack"].astype(int).to_numpy(),
        "slice": lab["slice"].to_numpy(float) + shift,
        "row": lab["row"].to_numpy(float) + rng.normal(0.0, xy_px, n),
        "col": lab["col"].to_numpy(float) + rng.normal(0.0, xy_px, n),
        "confidence": np.ones(n), "gt_slice": lab["slice"].to_numpy(float), "slice_err": shift,
    })


def points_for(job: FoldJob, split: str) -> pd.DataFrame:
    """Crop centres: label points to train on, stage-1 points to validate and test on."""
    if split == "train":
        lab = label_table(job.prepared)
        return lab[lab["slice"].notna()]
    if not point_urls(job):
        raise KeyError(f"grade needs job.inputs['points'] or ['points/{{view}}'] (stage-1 points) for the {split!r} split")
    return read_points(point_urls(job))


def severity_table(job: FoldJob, split: str) -> pd.DataFrame:
    """Labels per (study, target); in `train`, those of `job.inputs["exclude_labels"]` become −1 (val keeps all, so CV stays comparable)."""
    if split == "test":
        return pd.DataFrame(columns=["study_id", "target", "severity"])
    lab = label_table(job.prepared)
    sev = lab.drop_duplicates(["study_id", "target"])[["study_id", "target", "severity"]]
    if split == "train" and "exclude_labels" in job.inputs:
        out = excluded_targets(job.inputs["exclude_labels"]).assign(out=True)
        drop = sev.merge(out, on=["study_id", "target"], how="left")["out"].fillna(False).to_numpy(bool)
        sev = sev.assign(severity=np.where(drop, -1, sev["severity"].to_numpy()))
    return sev


def study_samples(
    cfg: GradeConfig,
    volumes: pd.DataFrame,
    points: pd.DataFrame,
    severity: dict[str, int] | None = None,
    gt_slices: dict[str, float] | None = None,
) -> list[dict]:
    """One study's volume rows and crop centres → one sample per level (pure; no file access).

    points: rows with target, series_id, stack, slice, row, col (label or stage-1 points);
    severity: label column → 0/1/2/−1; gt_slices: label column → annotated slice in the same
    stack as the point (for the auxiliary slice target). Levels with no point at all are skipped.
    """
    severity, gt_slices = severity or {}, gt_slices or {}
    stacks = {(int(r["series_id"]), int(r["stack"])): r for _, r in volumes.iterrows()}
    loaded: dict[tuple[int, int], tuple[np.ndarray, dict]] = {}
    by_target = {t: p for t, p in points.drop_duplicates("target").set_index("target").iterrows()}
    kk, p = cfg.k + cfg.max_shift, cfg.patch_px
    study = int(volumes["study_id"].iloc[0]) if len(volumes) else int(points["study_id"].iloc[0])
    out = []
    for lv in LEVELS:
        slots = cfg.slots
        x = np.zeros((len(slots), 2 * kk + 1, p, p), np.float16)
        inside = np.zeros((len(slots), 2 * kk + 1), bool)
        mask = np.zeros(len(slots), bool)
        labels = np.full(len(slots), -1, np.int8)
        offset = np.full(len(slots), 127, np.int8)  # 127: labelled slice unknown
        for i, (cond, view, _) in enumerate(slots):
            target = f"{cond}_{lv}"
            if i == len(SLOTS):  # axial spinal: between the two subarticular points
                sides = [by_target.get(f"{c}_{lv}") for c, _, _ in SLOTS[3:5]]
                sides = [s for s in sides if s is not None]
                if not sides or any((int(s["series_id"]), int(s["stack"])) != (int(sides[0]["series_id"]), int(sides[0]["stack"])) for s in sides):
                    continue
                pt = sides[0].copy()
                for c in ("slice", "row", "col"):
                    pt[c] = float(np.mean([float(s[c]) for s in sides]))
            else:
                pt = by_target.get(target)
            if pt is None or (int(pt["series_id"]), int(pt["stack"])) not in stacks:
                continue
            key = (int(pt["series_id"]), int(pt["stack"]))
            if key not in loaded:
                loaded[key] = load_volume(stacks[key])
            vol, meta = loaded[key]
            row = stacks[key]
            mm = cfg.crop_mm(view)
            centre = np.array([float(pt["slice"]), float(pt["row"]), float(pt["col"])])
            x[i] = to_float16(crop_stack(
                vol, meta["pixel_spacing"], centre, (mm[0] * cfg.context, mm[1] * cfg.context), p, kk,
                window=(float(row["intensity_p01"]), float(row["intensity_p99"])),
            ))
            inside[i] = (np.floor(centre[0] + 0.5) + np.arange(-kk, kk + 1) >= 0) & (
                np.floor(centre[0] + 0.5) + np.arange(-kk, kk + 1) < vol.shape[0]
            )
            mask[i] = True
            labels[i] = int(severity.get(target, -1))
            if target in gt_slices and i < len(SLOTS):
                off = int(np.floor(gt_slices[target] + 0.5) - np.floor(centre[0] + 0.5))
                offset[i] = np.clip(off, -100, 100)
        if mask.any():
            out.append({
                "study_id": study, "level": lv, "x": x.tobytes(), "shape": list(x.shape), "inside": inside.tobytes(),
                "target_mask": mask.tobytes(), "labels": labels.tobytes(), "gt_offset": offset.tobytes(),
            })
    return out

