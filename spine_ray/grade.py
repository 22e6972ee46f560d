"""Stage 2: grade the severity of every condition from millimetre-sized 2.5D crops at stage-1 points.

One sample per (study, level) holds T targets in fixed slots (`SLOTS`): the spinal canal from the
Sagittal T2/STIR point, left and right foramina from the Sagittal T1 points, left and right
subarticular zones from the axial points, and with `multiview_spinal` a sixth slot that sees the
spinal canal again on the axial slice (centred between the two subarticular points).

Where crops are centred: the `train` split uses the ground-truth points of labels.parquet (jittered
in collate); `val` and `test` use stage-1 points from `job.inputs["points"]` (the localize points
table), so cross-validation sees what inference sees. A target without a point (series absent, or
stage 1 found nothing) is masked out (`target_mask` False, zero crop, no loss) and is *not*
predicted: it is missing from the OOF table and from `predict_study`'s mask, and the blend fills
it with the prior (`spine_ray.prior`).

Augmentation needs crops taken *after* moving the centre, so a sample stores, per target, a
larger context patch (`context` × the crop in mm and pixels, `k + max_shift` slices each side,
float16 bytes) resampled to the crop's own mm-per-pixel; collate re-crops it with
`crops.crop_stack` (jittered slice, centre and angle), which keeps Ray Data rows self-contained.
Slice jitter draws from the stage-1 OOF `slice_err` of the slot's view when the points table is
given (the first-place team called this crucial), else from round(N(0, slice_sigma)).
The left–right flip mirrors every crop (axial: columns; sagittal: slice order) and swaps the
left and right slots with their labels, so slot i always means condition `SLOTS[i]`.

CutMix and mixup (`MixConfig`, fifth place used CutMix with p = 1) act on an augmented batch,
after the sample cache: each sample draws one partner from the batch and, per slot, either pastes
the partner's crop inside a box of H × W (through all slices of that slot's stack; λ = the area
left its own) or blends the two crops (λ ~ Beta(α, α)). The slot's severity target becomes
λ·onehot(own) + (1−λ)·onehot(partner's) and its slice target λ·onehot(own slice) +
(1−λ)·onehot(partner's slice), an unlabelled side adding no mass (see `spine_ray.losses`). A slot
is mixed only when both its own and the partner's slot are real (`target_mask`): a masked slot
never takes a partner's crop or label, and a real one never takes a partner's zero padding.

Two-step training (`TwoStepConfig`, fifth place): step 1 trains every weight with plain,
unweighted CE (and the slice term); step 2 freezes the backbone (its batch-norm statistics too)
and trains the rest with the metric-weighted CE and the any-severe term. Step 1 keeps its epoch
of best validation AUC where the fold driver validates (the in-process `run_fold`), else its
last epoch (Ray Train workers do not validate). `FreezeConfig` alone freezes the backbone but
its last N blocks (`spine_ray.models.freezing`) for the whole training.

OOF table (`grade/<member>/oof.parquet`): row_id, study_id, fold, member, normal_mild, moderate, severe.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import torch
from torch import nn

from spine_ray.crops import crop_stack
from spine_ray.label_flags import excluded_targets
from spine_ray.losses import grader_loss
from spine_ray.models.freezing import freeze_backbone, unfreeze
from spine_ray.models.grader import Grader, GraderConfig
from spine_ray.schema import (
    CONDITIONS,
    LABEL_COLUMNS,
    LEVELS,
    OOF_COLUMNS,
    PROB_COLUMNS,
    SEVERITY_WEIGHTS,
    row_id,
    target_index,
    with_target,
)
from spine_ray.stage import FoldJob
from spine_ray.storage import join, read_parquet
from spine_ray.train_loop import TrainConfig
from spine_ray.transforms import intensity, mirror_name, random_angle, sample_slice_shift
from spine_ray.volumes import LABELS_FILE, VOLUMES_DIR, load_volume

# Slot → (condition, view id, localize view). View ids feed the grader's view embedding.
SLOTS: tuple[tuple[str, int, str], ...] = (
    ("spinal_canal_stenosis", 0, "sag_t2"),
    ("left_neural_foraminal_narrowing", 1, "sag_t1"),
    ("right_neural_foraminal_narrowing", 1, "sag_t1"),
    ("left_subarticular_stenosis", 2, "axial"),
    ("right_subarticular_stenosis", 2, "axial"),
)
AXIAL_SPINAL = ("spinal_canal_stenosis", 2, "axial")  # the sixth slot with multiview_spinal
SAGITTAL_VIEWS = (0, 1)
SAMPLE_COLUMNS = ["study_id", "level", "x", "shape", "inside", "target_mask", "labels", "gt_offset"]


@dataclass(frozen=True)
class FreezeConfig:
    """Partial freezing (level-embedding repo): the backbone frozen but its last `unfreeze_last` blocks."""

    backbone: bool = False
    unfreeze_last: int = 0  # blocks as timm's group_matcher counts them (spine_ray.models.freezing)

    def __post_init__(self) -> None:
        if self.unfreeze_last < 0:
            raise ValueError("freeze.unfreeze_last must be ≥ 0")
        if self.unfreeze_last and not self.backbone:
            raise ValueError("freeze.unfreeze_last needs freeze.backbone: true")


@dataclass(frozen=True)
class TwoStepConfig:
    """Two-step training (fifth place): after `train` (all weights, plain CE), a step on the head alone."""

    epochs: int = 5  # step 2; step 1 runs GradeConfig.train
    lr: float = 1e-4  # step 2 (same batch size and weight decay as step 1)
    warmup_frac: float = 0.0
    select: Literal["auc", "last"] = "auc"  # step 1's weights: best validation AUC where validated, else the last epoch

    def __post_init__(self) -> None:
        if self.epochs < 1 or not self.lr > 0 or not 0.0 <= self.warmup_frac < 1.0:
            raise ValueError("two_step needs epochs ≥ 1, lr > 0 and warmup_frac in [0, 1)")


@dataclass(frozen=True)
class MixConfig:
    """CutMix / mixup of training batches, slot by slot (see the module docstring); off by default."""

    cutmix_p: float = 0.0  # share of samples CutMix-ed (fifth place: 1.0)
    mixup_p: float = 0.0  # share of samples mixed up (drawn after CutMix: cutmix_p + mixup_p ≤ 1)
    alpha: float = 1.0  # λ ~ Beta(alpha, alpha)

    def __post_init__(self) -> None:
        if min(self.cutmix_p, self.mixup_p) < 0 or self.cutmix_p + self.mixup_p > 1:
            raise ValueError("mix.cutmix_p and mix.mixup_p must be ≥ 0 with a sum ≤ 1")
        if not self.alpha > 0:
            raise ValueError("mix.alpha must be > 0")

    @property
    def enabled(self) -> bool:
        """Whether batches are mixed at all (training batches then carry soft targets)."""
        return self.cutmix_p + self.mixup_p > 0


@dataclass(frozen=True)
class GradeConfig:
    """One stage-2 ensemble member: network, training, crops and augmentation."""

    name: str = "grader"
    model: GraderConfig = field(
        default_factory=lambda: GraderConfig(
            backbone="resnet10t", dim=128, lstm_hidden=64, level_embedding=True, condition_embedding=True, n_views=3
        )
    )
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=6, batch_size=8, lr=1e-3))
    sagittal_mm: tuple[float, float] = (40.0, 40.0)  # crop (height, width) in mm on sagittal images
    axial_mm: tuple[float, float] = (40.0, 40.0)
    out_px: int = 32  # crop side in pixels
    k: int = 2  # slices each side: 2k+1 per crop
    max_shift: int = 2  # largest slice jitter; the stored patch holds k + max_shift slices each side
    context: float = 1.4  # stored patch side / crop side, room for xy jitter and rotation
    slice_jitter: bool = True
    slice_sigma: float = 0.5  # slice jitter without stage-1 errors: round(N(0, sigma))
    xy_jitter_mm: float = 2.0
    rotate_deg: float = 10.0
    intensity_aug: bool = True
    flip_prob: float = 0.5
    w_slice: float = 0.2  # auxiliary loss: attention finds the labelled slice
    w_any: float = 1.0  # any-severe-spinal term
    multiview_spinal: bool = False
    tta_flip: bool = True  # predict as the mean of the sample and its left–right mirror
    class_weights: tuple[float, float, float] = SEVERITY_WEIGHTS  # severity CE weights; (1, 1, 1) is plain CE
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    two_step: TwoStepConfig | None = None
    mix: MixConfig = field(default_factory=MixConfig)

    def __post_init__(self) -> None:
        if self.out_px < 8 or self.k < 0 or self.max_shift < 0:
            raise ValueError("out_px must be ≥ 8, k and max_shift ≥ 0")
        if self.context < 1.0:
            raise ValueError("context must be ≥ 1 (the stored patch holds the crop)")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError("flip_prob must be in [0, 1]")
        if min(*self.sagittal_mm, *self.axial_mm) <= 0:
            raise ValueError("crop sizes in mm must be positive")
        if self.model.n_views < 3:
            raise ValueError("the grader needs n_views ≥ 3 (sagittal T2, sagittal T1, axial)")
        if not (self.model.level_embedding and self.model.condition_embedding):
            raise ValueError("GradeStage feeds level and condition ids: turn both embeddings on")
        if min(self.class_weights) <= 0:
            raise ValueError("class_weights must be positive")
        if self.two_step is not None and self.freeze.backbone:
            raise ValueError("two_step trains every weight in step 1 and freezes the backbone in step 2: drop freeze")

    def steps(self) -> list[GradeConfig]:
        """The configs of the training steps: [self], or two-step's step 1 (plain CE) and step 2 (frozen backbone)."""
        if self.two_step is None:
            return [self]
        ts = self.two_step
        # Step 1 keeps `two_step` set: it says "select by AUC" (GradeStage.select).
        step1 = dataclasses.replace(self, class_weights=(1.0, 1.0, 1.0), w_any=0.0)
        step2 = dataclasses.replace(
            self, two_step=None, freeze=FreezeConfig(backbone=True),
            train=dataclasses.replace(self.train, epochs=ts.epochs, lr=ts.lr, warmup_frac=ts.warmup_frac),
        )
        return [step1, step2]

    @property
    def slots(self) -> tuple[tuple[str, int, str], ...]:
        """The sample's target slots in order."""
        return SLOTS + ((AXIAL_SPINAL,) if self.multiview_spinal else ())

    @property
    def patch_px(self) -> int:
        """Stored patch side in pixels."""
        return int(round(self.out_px * self.context))

    def crop_mm(self, view: int) -> tuple[float, float]:
        """Crop size in mm for a view id."""
        return self.axial_mm if view == 2 else self.sagittal_mm


@functools.lru_cache(maxsize=4)
def _read_table(url: str) -> pd.DataFrame:
    return read_parquet(url)


def _labels(prepared: str) -> pd.DataFrame:
    """labels.parquet with a `target` column (label column name)."""
    return with_target(_read_table(join(prepared, LABELS_FILE)))


@functools.lru_cache(maxsize=4)
def _slice_errors(url: str) -> dict[str, np.ndarray]:
    """Stage-1 OOF slice errors per localize view, from a points table."""
    pts = _read_table(url)
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


def _points_for(job: FoldJob, split: str) -> pd.DataFrame:
    """Crop centres: label points to train on, stage-1 points to validate and test on."""
    if split == "train":
        lab = _labels(job.prepared)
        return lab[lab["slice"].notna()]
    if "points" not in job.inputs:
        raise KeyError(f"grade needs job.inputs['points'] (stage-1 points table) for the {split!r} split")
    return _read_table(job.inputs["points"])


def _severity(job: FoldJob, split: str) -> pd.DataFrame:
    """Labels per (study, target); in `train`, those of `job.inputs["exclude_labels"]` become −1 (val keeps all, so CV stays comparable)."""
    if split == "test":
        return pd.DataFrame(columns=["study_id", "target", "severity"])
    lab = _labels(job.prepared)
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
            x[i] = crop_stack(
                vol, meta["pixel_spacing"], centre, (mm[0] * cfg.context, mm[1] * cfg.context), p, kk,
                window=(float(row["intensity_p01"]), float(row["intensity_p99"])),
            ).astype(np.float16)
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


def _crop_target(
    cfg: GradeConfig, patch: np.ndarray, inside: np.ndarray, view: int, rng: np.random.Generator | None, errors: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Re-crop one stored patch [2K+1, P, P] → crop [2k+1, h, w], slice mask [2k+1], slice shift."""
    kk = cfg.k + cfg.max_shift
    shift, d, angle = 0, np.zeros(2), 0.0
    mm = cfg.crop_mm(view)
    px_mm = np.array([mm[0] * cfg.context / cfg.patch_px, mm[1] * cfg.context / cfg.patch_px])
    if rng is not None:
        if cfg.slice_jitter:
            shift = int(np.clip(sample_slice_shift(rng, errors, cfg.slice_sigma), -cfg.max_shift, cfg.max_shift))
        d = rng.normal(0.0, cfg.xy_jitter_mm, 2) / px_mm
        angle = random_angle(rng, cfg.rotate_deg) if cfg.rotate_deg > 0 else 0.0
    c = cfg.patch_px / 2 - 0.5
    crop = crop_stack(patch.astype(np.float32), px_mm, (kk + shift, c + d[0], c + d[1]), mm, cfg.out_px, cfg.k, angle=angle)
    return crop, inside[kk + shift - cfg.k : kk + shift + cfg.k + 1], shift


def flip_sample(x: np.ndarray, views: np.ndarray, conditions: list[str], *per_target: np.ndarray, slice_index: np.ndarray | None = None) -> tuple:
    """Mirror one sample left–right: crops x [T, S, H, W], per-target arrays follow the slot swap.

    Sagittal crops reverse their slice order (slices run left–right), axial crops flip their
    columns; then left and right slots (and their labels, masks, …) trade places. `slice_index`
    [T] (−1 = none) are slice positions in the crop, reversed on sagittal slots. Per-target arrays
    whose second axis runs over slices (slice masks [T, S]) are reversed on sagittal slots too.
    """
    x = x.copy()
    sag = np.isin(views, SAGITTAL_VIEWS)
    x[sag] = x[sag, ::-1]
    x[~sag] = x[~sag, ..., ::-1]
    perm = _slot_permutation(conditions)
    rest = []
    for a in per_target:
        a = a.copy()
        if a.ndim == 2:
            a[sag] = a[sag, ::-1]
        rest.append(a[perm])
    if slice_index is not None:
        s = x.shape[1]
        slice_index = np.where(sag & (slice_index >= 0), s - 1 - slice_index, slice_index)[perm]
    return (x[perm], *rest, slice_index)


def _slot_permutation(conditions: list[str]) -> np.ndarray:
    """Slot i → the slot of its mirrored condition; a self-mirrored (spinal) slot, even repeated, stays put."""
    return np.asarray([i if mirror_name(c) == c else conditions.index(mirror_name(c)) for i, c in enumerate(conditions)], np.int64)


def augment_samples(cfg: GradeConfig, rows: dict[str, np.ndarray], rng: np.random.Generator | None, errors: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Sample rows → fixed-shape per-sample arrays (re-cropped, augmented when rng is given); pure.

    x [B, T, S, H, W] float16 (half the bytes through Ray Data's object store), slice_mask [B, T, S],
    target_mask [B, T], labels [B, T], slice_target [B, T], level [B], study_id [B].
    """
    slots = cfg.slots
    t = len(slots)
    conditions = [c for c, _, _ in slots]
    views = np.array([v for _, v, _ in slots])
    xs, smasks, tmasks, labs, starg, studies, levels = [], [], [], [], [], [], []
    for j in range(len(rows["study_id"])):
        shape = tuple(rows["shape"][j])
        patch = np.frombuffer(rows["x"][j], np.float16).reshape(shape)
        inside = np.frombuffer(rows["inside"][j], bool).reshape(shape[:2])
        tm = np.frombuffer(rows["target_mask"][j], bool).copy()
        lab = np.frombuffer(rows["labels"][j], np.int8).astype(np.int64)
        off = np.frombuffer(rows["gt_offset"][j], np.int8).astype(np.int64)
        x = np.zeros((t, 2 * cfg.k + 1, cfg.out_px, cfg.out_px), np.float32)
        sm = np.zeros((t, 2 * cfg.k + 1), bool)
        st = np.full(t, -1, np.int64)
        for i, (_, view, lview) in enumerate(slots):
            if not tm[i]:
                continue
            err = None if errors is None else errors.get(lview)
            x[i], sm[i], shift = _crop_target(cfg, patch[i], inside[i], view, rng, err)
            if rng is not None and cfg.intensity_aug:
                x[i] = intensity(x[i], rng)
            pos = cfg.k + off[i] - shift
            st[i] = pos if off[i] != 127 and 0 <= pos <= 2 * cfg.k else -1
        if rng is not None and rng.random() < cfg.flip_prob:
            x, sm, tm, lab, st = flip_sample(x, views, conditions, sm, tm, lab, slice_index=st)
        lab = np.where(tm, lab, -1)
        xs.append(x.astype(np.float16))
        smasks.append(sm)
        tmasks.append(tm)
        labs.append(lab)
        starg.append(np.where(tm, st, -1))
        studies.append(int(rows["study_id"][j]))
        levels.append(LEVELS.index(rows["level"][j]))
    b = len(xs)
    empty = (0, t)
    out = {
        "x": np.stack(xs) if b else np.zeros((*empty, 2 * cfg.k + 1, cfg.out_px, cfg.out_px), np.float16),
        "slice_mask": np.stack(smasks) if b else np.zeros((*empty, 2 * cfg.k + 1), bool),
        "target_mask": np.stack(tmasks) if b else np.zeros(empty, bool),
        "labels": np.stack(labs) if b else np.zeros(empty, np.int64),
        "slice_target": np.stack(starg) if b else np.zeros(empty, np.int64),
        "level": np.asarray(levels, np.int64),
        "study_id": np.asarray(studies, np.int64),
    }
    return mix_batch(cfg.mix, out, rng) if rng is not None and cfg.mix.enabled else out


def _one_hot(idx: np.ndarray, n: int) -> np.ndarray:
    """Indices [...] (−1 = unknown) → float32 one-hot [..., n], all-zero where unknown."""
    return (idx[..., None] == np.arange(n)).astype(np.float32)


def _box(rng: np.random.Generator, lam: float, h: int, w: int) -> tuple[int, int, int, int]:
    """A CutMix box (y0, y1, x0, x1) of about (1 − λ)·H·W, centred uniformly and clipped to the crop."""
    r = np.sqrt(1.0 - lam)
    ch, cw = int(round(h * r)), int(round(w * r))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    return max(cy - ch // 2, 0), min(cy - ch // 2 + ch, h), max(cx - cw // 2, 0), min(cx - cw // 2 + cw, w)


def mix_batch(mix: MixConfig, a: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """CutMix / mixup across an augmented batch, slot by slot (pure; rules in the module docstring).

    Returns the same arrays with labels as soft targets [B, T, 3] and slice_target [B, T, S]
    (float32, unnormalised: all-zero = unlabelled); a mixed slot's slice_mask is the union of both.
    """
    x = np.asarray(a["x"])  # float16 stays float16: CutMix copies pixels, mixup blends one slot at a time
    b, t, s, h, w = x.shape
    tm, sm = a["target_mask"], a["slice_mask"]
    q, st = _one_hot(a["labels"], 3), _one_hot(a["slice_target"], s)
    nx, nq, nst, nsm = x.copy(), q.copy(), st.copy(), sm.copy()
    partner = rng.permutation(b)
    for j in range(b):
        k, r = int(partner[j]), rng.random()
        op = "cutmix" if r < mix.cutmix_p else "mixup" if r < mix.cutmix_p + mix.mixup_p else None
        if op is None or k == j:
            continue
        for i in np.flatnonzero(tm[j] & tm[k]):
            lam = float(rng.beta(mix.alpha, mix.alpha))
            if op == "cutmix":
                y0, y1, x0, x1 = _box(rng, lam, h, w)
                nx[j, i, :, y0:y1, x0:x1] = x[k, i, :, y0:y1, x0:x1]
                lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually left its own
            else:
                nx[j, i] = lam * x[j, i].astype(np.float32) + (1.0 - lam) * x[k, i].astype(np.float32)
            nq[j, i] = lam * q[j, i] + (1.0 - lam) * q[k, i]
            nst[j, i] = lam * st[j, i] + (1.0 - lam) * st[k, i]
            nsm[j, i] = sm[j, i] | sm[k, i]
    return {**a, "x": nx, "labels": nq, "slice_target": nst, "slice_mask": nsm}


def batch_tensors(cfg: GradeConfig, a: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Augmented arrays → grader tensors: x [B, T, S, 1, H, W] float32 and per-target ids, masks, labels."""
    conditions = [c for c, _, _ in cfg.slots]
    views = np.array([v for _, v, _ in cfg.slots])
    b, t = a["target_mask"].shape
    cond_idx = np.array([CONDITIONS.index(c) for c in conditions])
    spinal = np.array([c == CONDITIONS[0] for c in conditions])
    return {
        "x": torch.from_numpy(np.asarray(a["x"], np.float32)[:, :, :, None]),  # [B, T, S, 1, H, W]
        "slice_mask": torch.from_numpy(np.asarray(a["slice_mask"], bool)),
        "target_mask": torch.from_numpy(np.asarray(a["target_mask"], bool)),
        # Hard ids [B, T], or soft targets [B, T, 3] / [B, T, S] from mix_batch.
        "labels": torch.from_numpy(_target_array(a["labels"], 2)),
        "slice_target": torch.from_numpy(_target_array(a["slice_target"], 2)),
        "level": torch.from_numpy(np.repeat(np.asarray(a["level"], np.int64)[:, None], t, 1)),
        "condition": torch.from_numpy(np.broadcast_to(cond_idx, (b, t)).copy()),
        "view": torch.from_numpy(np.broadcast_to(views, (b, t)).copy()),
        # The study id's rank in the batch keeps ids small and exact in int64.
        "spinal_study": torch.from_numpy(np.where(spinal[None], np.unique(np.asarray(a["study_id"]), return_inverse=True)[1].reshape(-1)[:, None], -1)),
    }


def _target_array(a: np.ndarray, hard_ndim: int) -> np.ndarray:
    a = np.asarray(a)
    return a.astype(np.int64) if a.ndim == hard_ndim else a.astype(np.float32)


def severity_auc(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean one-vs-rest ROC AUC over the severity classes present: probs [N, 3], labels [N] (−1 dropped); NaN if none."""
    keep = labels >= 0
    p, y = probs[keep], labels[keep]
    aucs = []
    for c in range(probs.shape[-1]):
        pos = y == c
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos and n_neg:
            ranks = pd.Series(p[:, c]).rank().to_numpy()  # ties share their mean rank
            aucs.append((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
    return float(np.mean(aucs)) if aucs else float("nan")


def collate_samples(cfg: GradeConfig, rows: dict[str, np.ndarray], rng: np.random.Generator | None, errors: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """Sample rows → grader tensors; augmented when rng is given (pure; shared by train, OOF and inference)."""
    return batch_tensors(cfg, augment_samples(cfg, rows, rng, errors))


def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Slices beyond a volume are masked; a fully masked (padding) target keeps one slice so softmax stays finite.
    sm = batch["slice_mask"].clone()
    sm[..., sm.shape[-1] // 2] |= ~sm.any(-1)
    return model(batch["x"], batch["level"], batch["condition"], batch["view"], batch["target_mask"], sm)


def flip_batch(cfg: GradeConfig, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated batch mirrored left–right (as `flip_sample`, on tensors); slot ids stay, crops and per-slot data swap."""
    conditions = [c for c, _, _ in cfg.slots]
    perm = torch.from_numpy(_slot_permutation(conditions))
    sag = torch.tensor([v in SAGITTAL_VIEWS for _, v, _ in cfg.slots])[None, :, None]  # [1, T, 1]
    x = batch["x"]
    x = torch.where(sag[..., None, None, None], x.flip(2), x.flip(-1))
    out = dict(batch)
    out["x"] = x[:, perm]
    out["slice_mask"] = torch.where(sag, batch["slice_mask"].flip(-1), batch["slice_mask"])[:, perm]
    for k in ("target_mask", "labels"):
        out[k] = batch[k][:, perm]
    st = batch["slice_target"]
    out["slice_target"] = torch.where(sag[..., 0] & (st >= 0), x.shape[2] - 1 - st, st)[:, perm]
    return out


@torch.no_grad()
def sample_probs(models: list[nn.Module], cfg: GradeConfig, samples: pd.DataFrame, batch_size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Fold-averaged softmax per sample and slot [N, T, 3], and the target mask [N, T]."""
    probs, masks = [], []
    for i in range(0, len(samples), batch_size):
        part = samples.iloc[i : i + batch_size]
        batch = collate_samples(cfg, {c: part[c].to_numpy() for c in part.columns}, None)
        views = [batch] + ([flip_batch(cfg, batch)] if cfg.tta_flip else [])
        perm = _slot_permutation([c for c, _, _ in cfg.slots])
        acc = 0.0
        for m in models:
            device = next(m.parameters()).device
            for v, b in enumerate(views):
                p = forward(m, {k: t.to(device) for k, t in b.items()})["logits"].float().softmax(-1).cpu().numpy()
                acc = acc + (p[:, perm] if v else p)  # a mirrored slot's prediction belongs to its mirror
        probs.append(acc / (len(models) * len(views)))
        masks.append(batch["target_mask"].numpy())
    t = len(cfg.slots)
    if not probs:
        return np.zeros((0, t, 3)), np.zeros((0, t), bool)
    return np.concatenate(probs), np.concatenate(masks)


def _per_target(cfg: GradeConfig, samples: pd.DataFrame, probs: np.ndarray, masks: np.ndarray) -> list[tuple[int, str, np.ndarray]]:
    """(study, label column, probabilities) per predicted target; the two spinal views are averaged."""
    out = []
    for j, (study, lv) in enumerate(zip(samples["study_id"], samples["level"], strict=True)):
        for i, (cond, _, _) in enumerate(SLOTS):
            idx = [i] + ([len(SLOTS)] if cond == CONDITIONS[0] and cfg.multiview_spinal else [])
            idx = [s for s in idx if masks[j, s]]
            if idx:
                out.append((int(study), f"{cond}_{lv}", probs[j, idx].mean(0)))
    return out


def predict_study(models: list[nn.Module], cfg: GradeConfig, volumes: pd.DataFrame, points: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """One study's volume rows and stage-1 points → fold-averaged probabilities [25, 3] and predicted mask [25].

    Pure PyTorch (no Ray): `models` are loaded `Grader`s in eval mode (one per fold); targets
    without a point get NaN probabilities and mask False (fill them with the prior).
    """
    samples = pd.DataFrame(study_samples(cfg, volumes, points), columns=SAMPLE_COLUMNS)
    probs = np.full((len(LABEL_COLUMNS), 3), np.nan)
    mask = np.zeros(len(LABEL_COLUMNS), bool)
    p, m = sample_probs(models, cfg, samples)
    for _, target, pr in _per_target(cfg, samples, p, m):
        probs[target_index(target)] = pr
        mask[target_index(target)] = True
    return probs, mask


class GradeStage:
    """Stage 2 for one ensemble member (the FoldJob's config is a GradeConfig)."""

    config_type = GradeConfig


    def train_config(self, job: FoldJob[GradeConfig]) -> TrainConfig:
        """The member's optimisation settings."""
        return job.config.train

    def source(self, job: FoldJob[GradeConfig]) -> str:
        """Stage 2 reads the prepared volumes."""
        return join(job.prepared, VOLUMES_DIR)

    def sample_key(self, job: FoldJob[GradeConfig], split: str) -> dict:
        """Crop geometry and slots shape a sample; validation crops sit on the stage-1 points."""
        c = job.config
        return {
            "sagittal_mm": c.sagittal_mm, "axial_mm": c.axial_mm, "out_px": c.out_px, "k": c.k, "max_shift": c.max_shift,
            "context": c.context, "multiview_spinal": c.multiview_spinal,
            # Train samples store labels, so an exclusion table's content is part of their key.
            "inputs": ["points"] if split != "train" else [n for n in ("exclude_labels",) if n in job.inputs],
        }

    def to_samples(self, job: FoldJob[GradeConfig], split: str, rows: pd.DataFrame) -> pd.DataFrame:
        """Volume rows → one sample per (study, level) with context patches for every slot."""
        cfg = job.config
        points = _points_for(job, split)
        sev = _severity(job, split)
        gt = _labels(job.prepared) if split != "test" else None
        samples: list[dict] = []
        for study, group in rows.groupby("study_id"):
            pts = points[points["study_id"] == study]
            if not len(pts):
                continue
            s_sev = dict(zip(sev.loc[sev["study_id"] == study, "target"], sev.loc[sev["study_id"] == study, "severity"], strict=True))
            gts = {}
            if gt is not None:
                g = gt[(gt["study_id"] == study) & gt["slice"].notna()]
                place = {t: (s, k) for t, s, k in zip(pts["target"], pts["series_id"], pts["stack"], strict=True)}
                gts = {t: float(sl) for t, s, k, sl in zip(g["target"], g["series_id"], g["stack"], g["slice"], strict=True)
                       if place.get(t) == (s, k)}
            for s in study_samples(cfg, group, pts, s_sev, gts):
                labelled = (np.frombuffer(s["labels"], np.int8) >= 0).any()
                if split != "train" or labelled:
                    samples.append(s)
        return pd.DataFrame(samples, columns=SAMPLE_COLUMNS)

    def augment(self, job: FoldJob[GradeConfig], rows: dict[str, np.ndarray], rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        """Re-crop every slot with jitter (slice shifts drawn from stage-1 errors when known), intensity, flip."""
        errors = _slice_errors(job.inputs["points"]) if rng is not None and "points" in job.inputs else None
        return augment_samples(job.config, rows, rng, errors)

    def to_batch(self, job: FoldJob[GradeConfig], arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """x [B, T, S, 1, H, W] and per-target ids, masks, labels."""
        return batch_tensors(job.config, arrays)

    def build_model(self, member: str, config: GradeConfig) -> nn.Module:
        """A Grader."""
        return Grader(config.model, img_size=config.out_px)

    def phases(self, job: FoldJob[GradeConfig]) -> list[FoldJob[GradeConfig]]:
        """One job per training step (two with `two_step`)."""
        return [dataclasses.replace(job, config=c) for c in job.config.steps()]

    def set_trainable(self, job: FoldJob[GradeConfig], model: nn.Module) -> None:
        """Everything trains, but the backbone (and its last N blocks) as `freeze` says."""
        unfreeze(model)
        if job.config.freeze.backbone:
            freeze_backbone(model.encoder, job.config.freeze.unfreeze_last)

    def select(self, job: FoldJob[GradeConfig]) -> str | None:
        """Two-step's step 1 keeps its best-AUC epoch."""
        ts = job.config.two_step
        return "val_auc" if ts is not None and ts.select == "auc" else None

    def validate(self, job: FoldJob[GradeConfig], model: nn.Module, samples: pd.DataFrame) -> dict[str, float]:
        """Held-out severity AUC (only for members that select by it; others skip the cost)."""
        if self.select(job) is None:
            return {}
        probs, masks = sample_probs([model], job.config, samples)
        labels = np.stack([np.frombuffer(b, np.int8) for b in samples["labels"]]) if len(samples) else np.zeros(masks.shape, np.int8)
        auc = severity_auc(probs[masks], labels[masks].astype(np.int64))
        return {"auc": auc} if np.isfinite(auc) else {}  # a split without both classes selects nothing

    def loss(self, job: FoldJob[GradeConfig], model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Severity CE weighted by class_weights (the metric's 1/2/4) + any-severe-spinal + auxiliary slice CE."""
        cfg = job.config
        out = forward(model, batch)
        parts = grader_loss(out, batch["labels"], batch["slice_target"], batch["spinal_study"], cfg.w_slice, cfg.w_any, cfg.class_weights)
        return parts["loss"], {k: float(v.detach()) for k, v in parts.items() if k != "loss"}

    def predict(self, job: FoldJob[GradeConfig], model: nn.Module, samples: pd.DataFrame) -> pd.DataFrame:
        """Held-out samples → the OOF table, one row per (study, target) predicted."""
        cfg = job.config
        probs, masks = sample_probs([model], cfg, samples)
        rows = [
            {"row_id": row_id(study, target), "study_id": study, **dict(zip(PROB_COLUMNS, map(float, p), strict=True))}
            for study, target, p in _per_target(cfg, samples, probs, masks)
        ]
        df = pd.DataFrame(rows, columns=["row_id", "study_id", *PROB_COLUMNS])
        # Each row_id once, averaged over the samples that saw it (none do twice today; cheap insurance).
        df = df.groupby(["row_id", "study_id"], as_index=False, sort=True)[list(PROB_COLUMNS)].mean()
        return df.assign(fold=job.fold, member=job.member)[OOF_COLUMNS]


__all__ = [
    "GradeConfig", "FreezeConfig", "TwoStepConfig", "MixConfig", "GradeStage", "mix_batch", "severity_auc", "SLOTS", "SAMPLE_COLUMNS", "study_samples", "collate_samples", "augment_samples", "batch_tensors",
    "flip_sample", "flip_batch", "sample_probs", "predict_study", "fake_points",
]
