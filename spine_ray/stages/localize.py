"""Stage 1: find, in each series, the points the graders must look at.

Three views, each a keypoint model trained fold by fold:
- `sag_t2`: Sagittal T2/STIR → the 5 spinal-canal points (one per level);
- `sag_t1`: Sagittal T1 → the 10 foraminal points (left and right per level);
- `axial`: for each level, the axial stack and slice through that disc are found by projecting
  the level's spinal point (from `sag_t2`) into every axial stack through the DICOM geometry;
  the model then places the left and right subarticular points on a slab of slices around it.

Sagittal samples are whole stacks resampled to a fixed [slices, size, size]; axial samples are
slabs of `slices` neighbouring axial images around the projected slice, each resampled to
[size, size]. Predictions map back to native (slice, row, col) and patient millimetres.

Points table (`localize/points.parquet`, one row per study × target found):
study_id, target, view, fold, series_id, stack, slice, row, col, x_mm, y_mm, z_mm, confidence,
and where a label point exists: gt_slice, gt_row, gt_col, err_mm, slice_err.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from spine_ray.core.schema import AXIAL_T2, LEVELS, SAGITTAL_T1, SAGITTAL_T2, with_target
from spine_ray.core.storage import join, read_parquet
from spine_ray.data import geometry
from spine_ray.data.crops import normalise_intensity, resample_volume, to_native, to_resampled
from spine_ray.data.half import to_float16, to_float32
from spine_ray.data.transforms import intensity
from spine_ray.data.volumes import LABELS_FILE, load_volume
from spine_ray.engine.stage import FoldJob, VolumeStage, columns
from spine_ray.engine.train_loop import TrainConfig, precision
from spine_ray.models.heatmap import decode_points, keypoint_loss, scale_coords
from spine_ray.models.localizer import Localizer, LocalizerConfig

SPINAL = tuple(f"spinal_canal_stenosis_{lv}" for lv in LEVELS)
FORAMINAL = tuple(f"{side}_neural_foraminal_narrowing_{lv}" for side in ("left", "right") for lv in LEVELS)
SUBARTICULAR = ("left_subarticular_stenosis", "right_subarticular_stenosis")
VIEWS: dict[str, tuple[str, tuple[str, ...]]] = {
    "sag_t2": (SAGITTAL_T2, SPINAL),
    "sag_t1": (SAGITTAL_T1, FORAMINAL),
    "axial": (AXIAL_T2, SUBARTICULAR),  # points per level: the target name gets the level appended
}
POINT_COLUMNS = [
    "study_id", "target", "view", "fold", "series_id", "stack", "slice", "row", "col",
    "x_mm", "y_mm", "z_mm", "confidence", "gt_slice", "gt_row", "gt_col", "err_mm", "slice_err",
]


@dataclass(frozen=True)
class ViewConfig:
    """One view's keypoint model, its input size and its training."""

    model: LocalizerConfig = field(default_factory=LocalizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    slices: int = 16  # resampled depth (sagittal) or slab of neighbouring slices (axial, odd)
    size: int = 128  # resampled in-plane size
    sigma: float = 1.5  # Gaussian target width in heatmap voxels
    w_js: float = 1.0
    w_coord: float = 1.0


@dataclass(frozen=True)
class LocalizeConfig:
    """Stage 1: one keypoint model per view."""

    sag_t2: ViewConfig = field(default_factory=ViewConfig)
    sag_t1: ViewConfig = field(default_factory=ViewConfig)
    axial: ViewConfig = field(default_factory=lambda: ViewConfig(slices=5))


@dataclass(frozen=True)
class LocalizeVariant:
    """Another stage-1 ensemble member (e.g. another seed or backbone) for cross-ensembling.

    Its localisers train as members `{view}@{name}` and write `localize/points@{name}.parquet`;
    every stage-2 member then also predicts on these points, as member `{grader}@{name}`.
    """

    name: str
    localize: LocalizeConfig = field(default_factory=LocalizeConfig)

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"a localize variant needs a name of letters, digits, '-' or '_', got {self.name!r}")


def variant_member(name: str, variant: str) -> str:
    """The member name of a view (stage 1) or grader (stage 2) run on a stage-1 variant: `name@variant` ("" → name)."""
    return f"{name}@{variant}" if variant else name


def view_of(member: str) -> str:
    """The view a stage-1 member localises: `sag_t2@seed1` → `sag_t2`."""
    return member.split("@", 1)[0]


@functools.lru_cache(maxsize=4)
def _labels(prepared: str) -> pd.DataFrame:
    df = with_target(read_parquet(join(prepared, LABELS_FILE)))
    return df[df["slice"].notna()]


@functools.lru_cache(maxsize=4)
def _points_table(url: str) -> pd.DataFrame:
    return read_parquet(url)


def view_model(view: str, cfg: ViewConfig) -> Localizer:
    """A fresh Localizer for a view: one heatmap per point of that view."""
    return Localizer(dataclasses.replace(cfg.model, n_points=len(VIEWS[view][1])), img_size=cfg.size)


def sagittal_sample(row: pd.Series, targets: tuple[str, ...], gt: pd.DataFrame, cfg: ViewConfig) -> dict:
    """One sagittal stack resampled to [slices, size, size], with its label points in resampled voxels."""
    vol, meta = load_volume(row)
    x = normalise_intensity(vol.astype(np.float32), float(row["intensity_p01"]), float(row["intensity_p99"]))
    x, scale = resample_volume(x, (cfg.slices, cfg.size, cfg.size))
    coords = np.zeros((len(targets), 3), np.float32)
    visible = np.zeros(len(targets), bool)
    for i, t in enumerate(targets):
        hit = gt[(gt["target"] == t) & (gt["series_id"] == row["series_id"]) & (gt["stack"] == row["stack"])]
        if len(hit):
            h = hit.iloc[0]
            coords[i] = to_resampled(np.array([h["slice"], h["row"], h["col"]], float), scale)
            visible[i] = True
    return {
        "study_id": int(row["study_id"]), "series_id": int(row["series_id"]), "stack": int(row["stack"]),
        "level": "", "x": to_float16(x).tobytes(), "shape": list(x.shape), "coords": coords.tobytes(),
        "visible": visible.tobytes(), "has_gt": visible.tobytes(), "scale": list(scale), "slice0": 0,
        "affine": list(meta["affine"].reshape(-1)), "gt": coords.tobytes(),
    }


def _axial_samples(rows: pd.DataFrame, study: int, spinal: pd.DataFrame, gt: pd.DataFrame, cfg: ViewConfig) -> list[dict]:
    """One sample per level: the axial slab around the level's spinal point projected into the nearest stack."""
    out = []
    stacks = [load_volume(r) for _, r in rows.iterrows()]
    k = cfg.slices // 2
    for lv in LEVELS:
        sp = spinal[spinal["target"] == f"spinal_canal_stenosis_{lv}"]
        if not len(sp) or not stacks:
            continue
        point = sp.iloc[0][["x_mm", "y_mm", "z_mm"]].to_numpy(float)
        hits = [
            geometry.nearest_slice(point, m["positions"], m["orientation"], m["pixel_spacing"], v.shape[1:], stack=i)
            for i, (v, m) in enumerate(stacks)
        ]
        best = min(range(len(hits)), key=lambda i: hits[i].distance_mm)
        vol, meta = stacks[best]
        row = rows.iloc[best]
        idx = np.clip(np.arange(hits[best].slice - k, hits[best].slice + k + 1), 0, vol.shape[0] - 1)
        x = normalise_intensity(vol[idx].astype(np.float32), float(row["intensity_p01"]), float(row["intensity_p99"]))
        x, scale = resample_volume(x, (len(idx), cfg.size, cfg.size))
        slice0 = int(hits[best].slice - k)
        coords = np.zeros((2, 3), np.float32)
        visible = np.zeros(2, bool)
        has_gt = np.zeros(2, bool)
        for i, side in enumerate(SUBARTICULAR):
            hit = gt[(gt["target"] == f"{side}_{lv}") & (gt["series_id"] == row["series_id"]) & (gt["stack"] == row["stack"])]
            if len(hit):
                h = hit.iloc[0]
                local = np.array([h["slice"] - slice0, h["row"], h["col"]], float)
                coords[i] = to_resampled(local, scale)
                visible[i] = 0 <= local[0] <= len(idx) - 1
                has_gt[i] = True
        out.append({
            "study_id": study, "series_id": int(row["series_id"]), "stack": int(row["stack"]), "level": lv,
            "x": to_float16(x).tobytes(), "shape": list(x.shape), "coords": coords.tobytes(),
            "visible": visible.tobytes(), "has_gt": has_gt.tobytes(), "scale": list(scale), "slice0": slice0,
            "affine": list(meta["affine"].reshape(-1)), "gt": coords.tobytes(),
        })
    return out


class LocalizeStage(VolumeStage[ViewConfig]):
    """Stage 1 for one view (the FoldJob's member names the view, its config is a ViewConfig)."""

    config_type = ViewConfig

    def sample_key(self, job: FoldJob[ViewConfig], split: str) -> dict:
        """The view and its resampled size; axial validation slabs sit on stage-1 spinal points."""
        cfg = job.config
        uses = ["spinal_points"] if view_of(job.member) == "axial" and split != "train" else []
        return {"view": view_of(job.member), "slices": cfg.slices, "size": cfg.size, "inputs": uses}

    def to_samples(self, job: FoldJob[ViewConfig], split: str, rows: pd.DataFrame) -> pd.DataFrame:
        """Volume rows → samples of this view (label points attached where they exist)."""
        cfg = job.config
        description, targets = VIEWS[view_of(job.member)]
        rows = rows[rows["series_description"] == description]
        gt = _labels(job.prepared) if split != "test" else _NO_LABELS
        samples: list[dict] = []
        if view_of(job.member) == "axial":
            spinal = _spinal_points(job, split)
            for study, group in rows.groupby("study_id"):
                samples += _axial_samples(group.reset_index(drop=True), int(study), spinal[spinal["study_id"] == study], gt[gt["study_id"] == study], cfg)
        else:
            for _, row in rows.iterrows():
                s = sagittal_sample(row, targets, gt[gt["study_id"] == row["study_id"]], cfg)
                if split != "train" or np.frombuffer(s["visible"], bool).any():
                    samples.append(s)
        return pd.DataFrame(samples, columns=SAMPLE_COLUMNS)

    def augment(self, job: FoldJob[ViewConfig], rows: dict[str, np.ndarray], rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        """Intensity augmentation of the stored stacks (see `view_arrays`)."""
        return view_arrays(view_of(job.member), job.config, rows, rng)

    def to_batch(self, job: FoldJob[ViewConfig], arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """See `view_tensors`."""
        return view_tensors(arrays)

    def build_model(self, member: str, config: ViewConfig) -> nn.Module:
        """A Localizer with one heatmap per point of the member's view."""
        return view_model(view_of(member), config)

    def loss(self, job: FoldJob[ViewConfig], model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Jensen–Shannon heatmap loss plus DSNT coordinate loss, on heatmap-voxel coordinates."""
        cfg = job.config
        logits = model(batch["x"])  # [B, P, S, h, w]
        stride = cfg.model.out_stride
        target = scale_coords(batch["coords"], [1.0, 1.0 / stride, 1.0 / stride])
        loss = keypoint_loss(logits.float(), target, batch["visible"], cfg.sigma, cfg.w_js, cfg.w_coord)
        return loss, {}

    def predict(self, job: FoldJob[ViewConfig], model: nn.Module, samples: pd.DataFrame) -> pd.DataFrame:
        """Samples → one point per (sample, point), best per study × target, with errors vs labels."""
        return predict_points(view_of(job.member), job.config, model, samples, fold=job.fold)


def view_arrays(view: str, cfg: ViewConfig, rows: dict[str, np.ndarray], rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    """Sample rows → x [B, S, H, W] float16 (intensity-augmented when rng is given), coords [B, P, 3], visible [B, P]."""
    xs = [to_float32(np.frombuffer(b, np.float16).reshape(s)) for b, s in zip(rows["x"], rows["shape"], strict=True)]
    if rng is not None:
        xs = [intensity(x, rng) for x in xs]
    p = len(VIEWS[view][1])
    if not xs:
        return {"x": np.zeros((0, cfg.slices, cfg.size, cfg.size), np.float16), "coords": np.zeros((0, p, 3), np.float32), "visible": np.zeros((0, p), bool)}
    return {
        "x": to_float16(np.stack(xs)),
        "coords": np.stack([np.frombuffer(c, np.float32).reshape(p, 3) for c in rows["coords"]]),
        "visible": np.stack([np.frombuffer(v, bool) for v in rows["visible"]]),
    }


def view_tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Arrays → x [B, S, 1, H, W] float32, coords [B, P, 3] (resampled voxels), visible [B, P]."""
    return {
        "x": torch.from_numpy(to_float32(arrays["x"])[:, :, None]),
        "coords": torch.from_numpy(np.asarray(arrays["coords"], np.float32)),
        "visible": torch.from_numpy(np.asarray(arrays["visible"], bool)),
    }


# Sample rows: volume/slab x (float16 bytes, `shape`), label coords in resampled voxels, `visible`
# (inside the input: trained on), `has_gt` (a label point exists: scored), `scale` resampled/native,
# `slice0` the slab's first native slice, `affine` voxel→patient of the stack.
SAMPLE_COLUMNS = ["study_id", "series_id", "stack", "level", "x", "shape", "coords", "visible", "has_gt", "scale", "slice0", "affine", "gt"]


def _spinal_points(job: FoldJob, split: str) -> pd.DataFrame:
    """Spinal points that place the axial slabs: label points for training, stage-1 points otherwise."""
    if split == "train" or "spinal_points" not in job.inputs:
        lab = _labels(job.prepared)
        return lab[lab["target"].isin(SPINAL)][["study_id", "target", "x_mm", "y_mm", "z_mm"]].astype({"x_mm": float, "y_mm": float, "z_mm": float})
    return _points_table(job.inputs["spinal_points"])


@torch.no_grad()
def predict_points(view: str, cfg: ViewConfig, model: nn.Module, samples: pd.DataFrame, fold: int = -1, batch_size: int = 8) -> pd.DataFrame:
    """Run a view's model on samples; map points to native pixels and millimetres (fold: recorded in the table)."""
    _, targets = VIEWS[view]
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(samples), batch_size):
        part = samples.iloc[i : i + batch_size]
        batch = view_tensors(view_arrays(view, cfg, columns(part), None))
        with precision(cfg.train, device):  # the view's training precision
            logits = model(batch["x"].to(device))
        logits = logits.float()
        coords, conf = decode_points(logits)  # heatmap voxels
        coords = scale_coords(coords, [1.0, float(cfg.model.out_stride), float(cfg.model.out_stride)]).cpu().numpy()
        for j, (_, s) in enumerate(part.iterrows()):
            scale = np.asarray(s["scale"], float)
            aff = np.asarray(s["affine"], float).reshape(4, 4)
            native = to_native(coords[j], scale)
            native[:, 0] += s["slice0"]
            gt = to_native(np.frombuffer(s["gt"], np.float32).reshape(-1, 3).astype(float), scale)
            gt[:, 0] += s["slice0"]
            vis = np.frombuffer(s["has_gt"], bool)
            mm = geometry.voxel_to_patient(aff, native)
            gt_mm = geometry.voxel_to_patient(aff, gt)
            for p, t in enumerate(targets):
                name = f"{t}_{s['level']}" if s["level"] else t
                out.append({
                    "study_id": int(s["study_id"]), "target": name, "view": view, "fold": fold,
                    "series_id": int(s["series_id"]), "stack": int(s["stack"]),
                    "slice": float(native[p, 0]), "row": float(native[p, 1]), "col": float(native[p, 2]),
                    "x_mm": float(mm[p, 0]), "y_mm": float(mm[p, 1]), "z_mm": float(mm[p, 2]),
                    "confidence": float(conf[j, p]),
                    "gt_slice": float(gt[p, 0]) if vis[p] else np.nan,
                    "gt_row": float(gt[p, 1]) if vis[p] else np.nan,
                    "gt_col": float(gt[p, 2]) if vis[p] else np.nan,
                    "err_mm": float(np.linalg.norm(mm[p] - gt_mm[p])) if vis[p] else np.nan,
                    "slice_err": float(round(native[p, 0]) - round(gt[p, 0])) if vis[p] else np.nan,
                })
    df = pd.DataFrame(out, columns=POINT_COLUMNS)
    if df.empty:
        return df
    # Several stacks of one view (repeat series): keep each target's most confident point.
    best = df.sort_values("confidence", ascending=False).drop_duplicates(["study_id", "target"])
    return best.sort_values(["study_id", "target"]).reset_index(drop=True)


def error_summary(points: pd.DataFrame) -> pd.DataFrame:
    """Per view: median and 90th-percentile error in mm, exact-slice and ±1-slice rates."""
    scored = points[points["err_mm"].notna()]
    return scored.groupby("view").agg(
        points=("err_mm", "size"),
        median_mm=("err_mm", "median"),
        p90_mm=("err_mm", lambda e: float(np.quantile(e, 0.9))),
        slice_exact=("slice_err", lambda e: float((e == 0).mean())),
        slice_within_1=("slice_err", lambda e: float((e.abs() <= 1).mean())),
    )


def _fold_average(points: pd.DataFrame) -> pd.DataFrame:
    """Points of several fold models → one per study × target: the stack most folds chose, averaged there."""
    if points.empty:
        return points
    keys = ["study_id", "target", "series_id", "stack"]
    g = points.groupby(keys, as_index=False).agg(
        n=("confidence", "size"), confidence=("confidence", "mean"), view=("view", "first"),
        slice=("slice", "mean"), row=("row", "mean"), col=("col", "mean"),
        x_mm=("x_mm", "mean"), y_mm=("y_mm", "mean"), z_mm=("z_mm", "mean"),
    )
    g = g.sort_values(["n", "confidence"], ascending=False).drop_duplicates(["study_id", "target"])
    return g.drop(columns="n").sort_values(["study_id", "target"]).reset_index(drop=True)


@torch.no_grad()
def locate_study(models: dict[str, list[nn.Module]], configs: dict[str, ViewConfig], rows: pd.DataFrame) -> pd.DataFrame:
    """Stage-1 inference on one study's volume rows: every fold's model per view, fold-averaged.

    models: view → fold models (eval mode); configs: view → its ViewConfig. Returns one point per
    target found (columns as the points table, without the label columns).
    """
    found = []
    for view in ("sag_t2", "sag_t1", "axial"):
        if view not in models:
            continue
        cfg = configs[view]
        description, targets = VIEWS[view]
        rel = rows[rows["series_description"] == description]
        if rel.empty:
            continue
        if view == "axial":
            spinal = pd.concat(found) if found else pd.DataFrame(columns=["target"])
            spinal = spinal[spinal["target"].isin(SPINAL)]
            study = int(rel["study_id"].iloc[0])
            samples = pd.DataFrame(_axial_samples(rel.reset_index(drop=True), study, spinal, _NO_LABELS, cfg), columns=SAMPLE_COLUMNS)
        else:
            samples = pd.DataFrame([sagittal_sample(r, targets, _NO_LABELS, cfg) for _, r in rel.iterrows()], columns=SAMPLE_COLUMNS)
        if samples.empty:
            continue
        per_fold = [predict_points(view, cfg, m, samples, fold=k) for k, m in enumerate(models[view])]
        found.append(_fold_average(pd.concat(per_fold, ignore_index=True)))
    return pd.concat(found, ignore_index=True) if found else pd.DataFrame(columns=POINT_COLUMNS)


_NO_LABELS = pd.DataFrame({"study_id": pd.Series(dtype="int64"), "target": pd.Series(dtype=str), "series_id": pd.Series(dtype="int64"), "stack": pd.Series(dtype="int64"), "slice": pd.Series(dtype=float), "row": pd.Series(dtype=float), "col": pd.Series(dtype=float)})
