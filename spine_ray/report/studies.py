"""Pictures of one study for the report: the slices stage 1 looked at with its points, a multiplanar view, stage 2's crops.

Per study: the sagittal T2 slice with the five spinal points; the sagittal T1 slices of the left
and right foramina; each level's axial slice with its subarticular points and the sagittal spinal
point projected there through the DICOM geometry; and the axial stacks resampled onto the
sagittal T2 plane through their affines (a reformat: does the axial stack sit where the sagittal
says the discs are?). Points are drawn into the pixels (`plots.overlay`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from spine_ray.core.schema import LEVEL_TITLES, LEVELS
from spine_ray.data import geometry
from spine_ray.data.volumes import load_volume, read_volumes
from spine_ray.report import plots


def _scale(shape: tuple[int, ...]) -> int:
    # Small (synthetic) slices are enlarged so that markers do not hide the anatomy.
    return max(1, 192 // max(shape[-2:]))


def _pts(rows: pd.DataFrame, prefix: str = "") -> np.ndarray:
    v = rows[[f"{prefix}row", f"{prefix}col"]].to_numpy(dtype=np.float64)
    return v[np.isfinite(v).all(axis=1)]


def _level(target: str) -> str:
    return target[-5:]


def _panel(vol: np.ndarray, k: int, rows: pd.DataFrame, title: str, proj: np.ndarray | None = None) -> dict:
    """One slice with the rows' predicted points and the ground-truth points that lie on that slice."""
    s = _scale(vol.shape)
    gt = rows[rows["gt_slice"].round() == k]
    rgb = plots.overlay(vol[k], _pts(rows), _pts(gt, "gt_"), proj if proj is not None else (), s)
    return {"rgb": rgb, "title": title}


def reformat(target_meta: dict, target_shape: tuple[int, int], k: int, sources: list[tuple[np.ndarray, dict]]) -> np.ndarray:
    """Slice k of a target stack's plane, resampled (nearest voxel) from source stacks through their affines; NaN outside them."""
    ii, jj = np.meshgrid(np.arange(target_shape[0]), np.arange(target_shape[1]), indexing="ij")
    kij = np.stack([np.full_like(ii, k), ii, jj], axis=-1).astype(np.float64)
    xyz = geometry.voxel_to_patient(target_meta["affine"], kij)  # [H, W, 3] patient mm
    out = np.full(target_shape, np.nan)
    for vol, meta in sources:
        v = np.rint(geometry.patient_to_voxel(meta["affine"], xyz)).astype(int)
        # A source voxel counts when the plane passes within half a slice of it.
        ok = np.all((v >= 0) & (v < np.asarray(vol.shape)), axis=-1) & np.isnan(out)
        out[ok] = vol[v[ok][:, 0], v[ok][:, 1], v[ok][:, 2]]
    return out


def study_panels(volumes: pd.DataFrame, points: pd.DataFrame) -> list[dict]:
    """The drawn panels of one study from its volume rows and its stage-1 points (pure)."""
    stacks = {(int(r.series_id), int(r.stack)): load_volume(r) for _, r in volumes.iterrows()}
    panels = []
    sag = points[points["view"] == "sag_t2"]

    def vol_of(rows: pd.DataFrame) -> tuple[np.ndarray, dict] | None:
        key = (int(rows["series_id"].iloc[0]), int(rows["stack"].iloc[0]))
        return stacks.get(key)

    for view, name in (("sag_t2", "sag T2"), ("sag_t1", "sag T1")):
        rows = points[points["view"] == view]
        sides = [("", rows)] if view == "sag_t2" else [(side + " ", rows[rows["target"].str.startswith(side)]) for side in ("left", "right")]
        for side, part in sides:
            if len(part) and (vs := vol_of(part)) is not None:
                k = int(np.clip(np.rint(np.median(part["slice"])), 0, len(vs[0]) - 1))
                panels.append(_panel(vs[0], k, part, f"{side}{name}, slice {k}"))
    axial = points[points["view"] == "axial"]
    for lv, title in zip(LEVELS, LEVEL_TITLES, strict=True):
        part = axial[axial["target"].map(_level) == lv]
        if not len(part) or (vs := vol_of(part)) is None:
            continue
        vol, meta = vs
        k = int(np.clip(np.rint(part["slice"].iloc[0]), 0, len(vol) - 1))
        proj = np.empty((0, 2))
        spinal = sag[sag["target"].map(_level) == lv]
        if len(spinal):
            hit = geometry.nearest_slice(spinal[["x_mm", "y_mm", "z_mm"]].to_numpy(float)[0], meta["positions"], meta["orientation"], meta["pixel_spacing"], vol.shape[1:])
            proj = np.array([[hit.row, hit.col]])
        panels.append(_panel(vol, k, part, f"axial {title}, slice {k}", proj))
    if len(sag) and (vs := vol_of(sag)) is not None and len(axial):
        vol, meta = vs
        k = int(np.clip(np.rint(np.median(sag["slice"])), 0, len(vol) - 1))
        axial_series = set(axial["series_id"].astype(int))
        sources = [v for (sid, _), v in stacks.items() if sid in axial_series]
        mpr = reformat(meta, vol.shape[1:], k, sources)
        gt = sag[sag["gt_slice"].round() == k]
        s = _scale(vol.shape)
        panels.append({"rgb": plots.overlay(np.nan_to_num(mpr, nan=float(np.nanmin(mpr)) if np.isfinite(mpr).any() else 0.0), _pts(sag), _pts(gt, "gt_"), (), s), "title": f"axial → sag T2 plane {k}"})
    return panels


def stage2_attention(run_dir: str, member: str, fold: int, volumes: pd.DataFrame, points: pd.DataFrame, level: str = "l4_l5") -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """The crops one grade member's fold model sees for one level of a study [T, S, H, W], its attention over slices [T, S], slot names."""
    import torch

    from spine_ray.core.storage import exists
    from spine_ray.stages.grade.augment import collate_samples
    from spine_ray.stages.grade.config import SAMPLE_COLUMNS
    from spine_ray.stages.grade.predict import forward
    from spine_ray.stages.grade.samples import study_samples
    from spine_ray.stages.registry import load_fold_model, model_url

    if not exists(model_url(run_dir, "grade", member, fold)):  # a one-stage member has no crops to show
        return None
    model, gcfg = load_fold_model(run_dir, "grade", member, fold)
    samples = pd.DataFrame(study_samples(gcfg, volumes, points), columns=SAMPLE_COLUMNS)
    if not len(samples):
        return None
    samples = samples[samples["level"] == level] if (samples["level"] == level).any() else samples.iloc[:1]
    batch = collate_samples(gcfg, {c: samples[c].to_numpy() for c in samples.columns}, None)
    with torch.no_grad():
        attn = forward(model, batch)["slice_attention"][0].numpy()  # [T, S]
    x = batch["x"][0].numpy()  # [T, S, C, H, W]
    names = [f"{c.replace('_', ' ')} ({v})" for c, _, v in gcfg.slots]
    return x[:, :, x.shape[2] // 2], attn, names


def study_figures(run_dir: str, prepared: str, points: pd.DataFrame, study: int, img: Callable[[str], str], member: str = "", fold: int = -1) -> list[str]:
    """Draw one study's panels into img(f"study_{study}.png") and, given a grade member and the study's fold, stage 2's crops; returns the PNG paths."""
    volumes = read_volumes(prepared, filters=[("study_id", "=", int(study))])
    mine = points[points["study_id"] == study]
    panels = study_panels(volumes, mine)
    out = [plots.overlay_panels(panels, img(f"study_{study}.png"))] if panels else []
    if member and fold >= 0:
        seen = stage2_attention(run_dir, member, fold, volumes, mine)
        if seen is not None:
            crops, attn, names = seen
            out.append(plots.crops_attention(crops, attn, names, f"study {study}: {member} fold {fold}, crops of L4/L5 and attention over slices", img(f"crops_{study}.png")))
    return out
