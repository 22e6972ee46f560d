"""The one-stage point-masking member (7th place): spinal and foraminal grades without stage-1 points.

One sample per study holds its whole Sagittal T2/STIR and Sagittal T1 stacks, each resampled to a
fixed [slices, size, size] exactly as stage 1 does it (`spine_ray.stages.localize` builds the volumes and
label points; this module reuses them). `OneStageNet` predicts, per view, one heatmap per level
point and a per-voxel grade map; the heatmap-pooled grade map gives [levels, 3] logits per point.
Loss: JS + DSNT on the heatmaps (as stage 1), metric-weighted CE 1/2/4 + any-severe-spinal on the
pooled grades. With `gt_heatmap` the grades are pooled by the labelled point's Gaussian instead,
in training and in validation: an upper bound for the grade branch, scored in cv.json but never
blended or submitted (the pipeline keeps it out of oof.parquet, `infer` skips it).

Targets: the 5 spinal and 10 foraminal label columns (`TARGETS` order). Subarticular targets are
not predicted (the blend fills them from the prior). A study missing a view is a zero volume for
it: its targets are masked (label −1, no OOF row). With several stacks of a view, the one holding
most label points is used (the first when there are none, as at test time).

The left–right flip reverses the slice order (sagittal slices run left–right) and swaps the left
and right foramen channels with their points and labels (`flip_arrays`).

OOF table (`onestage/<member>/fold{k}/oof.parquet`, joined into the run's oof.parquet): row_id,
study_id, fold, member, normal_mild, moderate, severe.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch import nn

from spine_ray.core.schema import (
    LABEL_COLUMNS,
    OOF_COLUMNS,
    PROB_COLUMNS,
    row_id,
    target_index,
    with_target,
)
from spine_ray.core.storage import join, read_parquet
from spine_ray.data.transforms import mirror_name
from spine_ray.data.volumes import LABELS_FILE
from spine_ray.engine.stage import FoldJob, VolumeStage, columns
from spine_ray.engine.train_loop import TrainConfig, precision
from spine_ray.models.heatmap import gaussian_heatmap, keypoint_loss, scale_coords
from spine_ray.models.onestage import OneStageNet, OneStageNetConfig
from spine_ray.stages.localize import (
    FORAMINAL,
    SPINAL,
    VIEWS,
    ViewConfig,
    sagittal_sample,
    view_arrays,
    view_tensors,
)
from spine_ray.stages.losses import IGNORE, any_severe_spinal_loss, severity_loss

VIEW_NAMES = ("sag_t2", "sag_t1")
TARGETS = SPINAL + FORAMINAL  # the member's 15 targets: slot i of `labels` and of the logits
# Slot → the slot of its mirror image: spinal stays, left and right foramina trade places.
MIRROR = np.asarray([TARGETS.index(mirror_name(t)) for t in TARGETS], np.int64)
SAMPLE_COLUMNS = ["study_id", "labels"] + [f"{k}_{v}" for v in VIEW_NAMES for k in ("x", "coords", "visible", "has", "series")]


@dataclass(frozen=True)
class OneStageConfig:
    """One one-stage ensemble member: network, training, resampled volume and loss weights."""

    name: str = "onestage"
    model: OneStageNetConfig = field(default_factory=OneStageNetConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=10, batch_size=4, lr=3e-4))
    slices: int = 16  # resampled depth of each sagittal stack
    size: int = 128  # resampled in-plane size
    sigma: float = 1.5  # Gaussian target width in heatmap voxels
    w_js: float = 1.0  # heatmap terms, as stage 1
    w_coord: float = 1.0
    w_heat: float = 1.0  # the heatmap loss's weight against the grade loss
    w_any: float = 1.0  # any-severe-spinal term
    intensity_aug: bool = True
    flip_prob: float = 0.5
    tta_flip: bool = True  # predict as the mean of the sample and its left–right mirror
    gt_heatmap: bool = False  # pool grades with the ground-truth Gaussian (diagnostic upper bound)

    def __post_init__(self) -> None:
        if self.model.views != VIEW_NAMES or self.model.points != tuple(len(VIEWS[v][1]) for v in VIEW_NAMES):
            raise ValueError(f"the one-stage member needs views {VIEW_NAMES} with points (5, 10), got {self.model.views} {self.model.points}")
        if self.slices < 1 or self.size % self.model.net.out_stride:
            raise ValueError(f"slices must be ≥ 1 and size ({self.size}) a multiple of out_stride ({self.model.net.out_stride})")
        if not 0.0 <= self.flip_prob <= 1.0 or self.sigma <= 0:
            raise ValueError("flip_prob must be in [0, 1] and sigma > 0")

    @property
    def view(self) -> ViewConfig:
        """The stage-1 view settings that resample a stack the same way."""
        return ViewConfig(slices=self.slices, size=self.size, sigma=self.sigma)

    @property
    def heat_shape(self) -> tuple[int, int, int]:
        """The heatmap grid (slice, row, col)."""
        h = self.size // self.model.net.out_stride
        return (self.slices, h, h)


@functools.lru_cache(maxsize=4)
def _labels(prepared: str) -> pd.DataFrame:
    return with_target(read_parquet(join(prepared, LABELS_FILE)))


_NO_POINTS = pd.DataFrame({c: pd.Series(dtype=t) for c, t in
                           {"target": str, "series_id": "int64", "stack": "int64", "slice": float, "row": float, "col": float}.items()})


def _pick_stack(rows: pd.DataFrame, targets: tuple[str, ...], points: pd.DataFrame) -> pd.Series:
    """The stack of a view holding most of its label points (the first on ties or with none)."""
    pts = points[points["target"].isin(targets)]
    counts = [int(((pts["series_id"] == r["series_id"]) & (pts["stack"] == r["stack"])).sum()) for _, r in rows.iterrows()]
    return rows.iloc[int(np.argmax(counts))]


def study_sample(cfg: OneStageConfig, volumes: pd.DataFrame, points: pd.DataFrame, severity: dict[str, int]) -> dict | None:
    """One study's volume rows → its sample (pure apart from reading the volumes); None without any sagittal series.

    points: label points (target, series_id, stack, slice, row, col; empty at test time);
    severity: label column → 0/1/2 (absent: unlabelled).
    """
    vcfg = cfg.view
    out: dict = {"study_id": int(volumes["study_id"].iloc[0])}
    labels = np.full(len(TARGETS), IGNORE, np.int8)
    present = False
    for v in VIEW_NAMES:
        description, targets = VIEWS[v]
        rows = volumes[volumes["series_description"] == description]
        if rows.empty:
            n = len(targets)
            out |= {f"x_{v}": np.zeros((cfg.slices, cfg.size, cfg.size), np.float16).tobytes(), f"coords_{v}": np.zeros((n, 3), np.float32).tobytes(),
                    f"visible_{v}": np.zeros(n, bool).tobytes(), f"has_{v}": False, f"series_{v}": -1}
            continue
        s = sagittal_sample(_pick_stack(rows, targets, points), targets, points, vcfg)
        out |= {f"x_{v}": s["x"], f"coords_{v}": s["coords"], f"visible_{v}": s["visible"], f"has_{v}": True, f"series_{v}": s["series_id"]}
        present = True
        for t in targets:
            labels[TARGETS.index(t)] = severity.get(t, IGNORE)
    if not present:
        return None
    out["labels"] = labels.tobytes()
    return out


def flip_arrays(a: dict[str, np.ndarray], which: np.ndarray, slices: int) -> dict[str, np.ndarray]:
    """Mirror the samples `which` [B] left–right: slice order reversed, left/right point channels and labels swapped."""
    a = dict(a)
    idx = np.flatnonzero(which)
    if not len(idx):
        return a
    for v in VIEW_NAMES:
        x, coords, vis = a[f"x_{v}"].copy(), a[f"coords_{v}"].copy(), a[f"visible_{v}"].copy()
        x[idx] = x[idx, ::-1]
        coords[idx, :, 0] = slices - 1 - coords[idx, :, 0]
        perm = np.asarray([VIEWS[v][1].index(mirror_name(t)) for t in VIEWS[v][1]], np.int64)
        coords[idx] = coords[idx][:, perm]
        vis[idx] = vis[idx][:, perm]
        a[f"x_{v}"], a[f"coords_{v}"], a[f"visible_{v}"] = x, coords, vis
    labels = a["labels"].copy()
    labels[idx] = labels[idx][:, MIRROR]
    a["labels"] = labels
    return a


def augment_samples(cfg: OneStageConfig, rows: dict[str, np.ndarray], rng: np.random.Generator | None) -> dict[str, np.ndarray]:
    """Sample rows → x_{view} [B, S, H, W] float16, coords_/visible_{view}, has_{view} [B], labels [B, 15]; augmented when rng is given."""
    vcfg = cfg.view
    n = len(rows["study_id"])
    shape = np.asarray([[cfg.slices, cfg.size, cfg.size]] * n)
    out: dict[str, np.ndarray] = {"study_id": np.asarray(rows["study_id"], np.int64)}
    for v in VIEW_NAMES:
        a = view_arrays(v, vcfg, {"x": rows[f"x_{v}"], "shape": shape, "coords": rows[f"coords_{v}"], "visible": rows[f"visible_{v}"]},
                        rng if cfg.intensity_aug else None)
        out |= {f"x_{v}": a["x"], f"coords_{v}": a["coords"], f"visible_{v}": a["visible"], f"has_{v}": np.asarray(rows[f"has_{v}"], bool)}
    out["labels"] = np.stack([np.frombuffer(b, np.int8) for b in rows["labels"]]).astype(np.int64) if n else np.zeros((0, len(TARGETS)), np.int64)
    if rng is not None and cfg.flip_prob > 0:
        out = flip_arrays(out, rng.random(n) < cfg.flip_prob, cfg.slices)
    return out


def batch_tensors(a: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Arrays → x_{view} [B, S, 1, H, W] float32, coords_/visible_{view}, has_{view}, labels [B, 15], spinal_study [B, 15]."""
    out: dict[str, torch.Tensor] = {}
    for v in VIEW_NAMES:
        t = view_tensors({"x": a[f"x_{v}"], "coords": a[f"coords_{v}"], "visible": a[f"visible_{v}"]})
        out |= {f"x_{v}": t["x"], f"coords_{v}": t["coords"], f"visible_{v}": t["visible"], f"has_{v}": torch.from_numpy(np.array(a[f"has_{v}"], bool))}
    labels = np.asarray(a["labels"], np.int64)
    b = len(labels)
    spinal = np.array([t in SPINAL for t in TARGETS])
    out["labels"] = torch.from_numpy(labels)
    # The sample's index in the batch names its study (one sample per study) for the any-severe term.
    out["spinal_study"] = torch.from_numpy(np.where(spinal[None], np.arange(b)[:, None], -1).astype(np.int64))
    return out


def forward(cfg: OneStageConfig, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """A batch through a OneStageNet, per view (pooled by the labelled Gaussians with `gt_heatmap`)."""
    xs = {v: batch[f"x_{v}"] for v in VIEW_NAMES}
    if not cfg.gt_heatmap:
        return model(xs)
    stride = cfg.model.net.out_stride
    gt = {v: gaussian_heatmap(cfg.heat_shape, scale_coords(batch[f"coords_{v}"], [1.0, 1 / stride, 1 / stride]), cfg.sigma) for v in VIEW_NAMES}
    return model(xs, gt, {v: batch[f"visible_{v}"] for v in VIEW_NAMES})


def _logits(out: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
    """Pooled grade logits of every target, [B, 15, 3] in `TARGETS` order."""
    return torch.cat([out[v]["logits"] for v in VIEW_NAMES], dim=1)


def onestage_loss(cfg: OneStageConfig, out: dict[str, dict[str, torch.Tensor]], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{'loss', 'heat', 'severity', 'any_severe'}: keypoint JS + DSNT per view, weighted CE and any-severe on the pooled grades."""
    stride = cfg.model.net.out_stride
    heat = sum(
        keypoint_loss(out[v]["heat"].float(), scale_coords(batch[f"coords_{v}"], [1.0, 1 / stride, 1 / stride]), batch[f"visible_{v}"], cfg.sigma, cfg.w_js, cfg.w_coord)
        for v in VIEW_NAMES
    )
    logits = _logits(out)
    parts = {"heat": heat, "severity": severity_loss(logits, batch["labels"]), "any_severe": any_severe_spinal_loss(logits, batch["labels"], batch["spinal_study"])}
    parts["loss"] = cfg.w_heat * parts["heat"] + parts["severity"] + cfg.w_any * parts["any_severe"]
    return parts


def _flip_batch(cfg: OneStageConfig, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated batch mirrored left–right (every sample), through `flip_arrays`."""
    a = {k: t.numpy() for k, t in batch.items() if k != "spinal_study"}
    a = {k: (v[:, :, 0] if k.startswith("x_") else v) for k, v in a.items()}
    return batch_tensors(flip_arrays(a, np.ones(len(a["labels"]), bool), cfg.slices))


@torch.no_grad()
def sample_probs(models: list[nn.Module], cfg: OneStageConfig, samples: pd.DataFrame, batch_size: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Fold-averaged softmax per sample and target [N, 15, 3], and which targets were seen [N, 15]."""
    probs, masks = [], []
    view_of = np.array([0] * len(SPINAL) + [1] * len(FORAMINAL))
    for i in range(0, len(samples), batch_size):
        part = samples.iloc[i : i + batch_size]
        batch = batch_tensors(augment_samples(cfg, columns(part), None))
        views = [batch] + ([_flip_batch(cfg, batch)] if cfg.tta_flip else [])
        acc = 0.0
        for m in models:
            device = next(m.parameters()).device
            for k, b in enumerate(views):
                with precision(cfg.train, device):  # the member's training precision
                    logits = _logits(forward(cfg, m, {n: t.to(device) for n, t in b.items()}))
                p = logits.float().softmax(-1).cpu().numpy()
                acc = acc + (p[:, MIRROR] if k else p)  # a mirrored slot's prediction belongs to its mirror
        probs.append(acc / (len(models) * len(views)))
        has = np.stack([batch[f"has_{v}"].numpy() for v in VIEW_NAMES], 1)  # [B, 2]
        masks.append(has[:, view_of])
    if not probs:
        return np.zeros((0, len(TARGETS), 3)), np.zeros((0, len(TARGETS)), bool)
    return np.concatenate(probs), np.concatenate(masks)


def predict_study(models: list[nn.Module], cfg: OneStageConfig, volumes: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """One study's volume rows → fold-averaged probabilities [25, 3] and predicted mask [25] (pure PyTorch, no Ray).

    Targets this member does not predict (subarticular, or a view's series missing) are NaN, mask False.
    """
    probs = np.full((len(LABEL_COLUMNS), 3), np.nan)
    mask = np.zeros(len(LABEL_COLUMNS), bool)
    s = study_sample(cfg, volumes, _NO_POINTS, {}) if len(volumes) else None
    if s is None:
        return probs, mask
    p, m = sample_probs(models, cfg, pd.DataFrame([s], columns=SAMPLE_COLUMNS))
    for i, t in enumerate(TARGETS):
        if m[0, i]:
            probs[target_index(t)] = p[0, i]
            mask[target_index(t)] = True
    return probs, mask


class OneStageStage(VolumeStage[OneStageConfig]):
    """The one-stage member (the FoldJob's config is a OneStageConfig)."""

    config_type = OneStageConfig

    def sample_key(self, job: FoldJob[OneStageConfig], split: str) -> dict:
        """Only the resampled grid shapes a sample (the same for train and val)."""
        cfg = job.config
        return {"views": list(VIEW_NAMES), "slices": cfg.slices, "size": cfg.size, "inputs": []}

    def to_samples(self, job: FoldJob[OneStageConfig], split: str, rows: pd.DataFrame) -> pd.DataFrame:
        """Volume rows → one sample per study with a sagittal series (train: only studies with a label)."""
        cfg = job.config
        lab = _labels(job.prepared) if split != "test" else None
        out = []
        for study, group in rows.groupby("study_id"):
            if lab is None:
                points, severity = _NO_POINTS, {}
            else:
                mine = lab[lab["study_id"] == study]
                points = mine[mine["slice"].notna()]
                sev = mine.drop_duplicates("target")
                severity = {t: int(s) for t, s in zip(sev["target"], sev["severity"], strict=True) if s >= 0}
            s = study_sample(cfg, group, points, severity)
            if s is not None and (split != "train" or (np.frombuffer(s["labels"], np.int8) >= 0).any()):
                out.append(s)
        return pd.DataFrame(out, columns=SAMPLE_COLUMNS)

    def augment(self, job: FoldJob[OneStageConfig], rows: dict[str, np.ndarray], rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        """Intensity augmentation and the left–right flip (see `augment_samples`)."""
        return augment_samples(job.config, rows, rng)

    def to_batch(self, job: FoldJob[OneStageConfig], arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """See `batch_tensors`."""
        return batch_tensors(arrays)

    def build_model(self, member: str, config: OneStageConfig) -> nn.Module:
        """A OneStageNet."""
        return OneStageNet(config.model, img_size=config.size)

    def loss(self, job: FoldJob[OneStageConfig], model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """See `onestage_loss`."""
        parts = onestage_loss(job.config, forward(job.config, model, batch), batch)
        return parts["loss"], {k: v.detach() for k, v in parts.items() if k != "loss"}

    def predict(self, job: FoldJob[OneStageConfig], model: nn.Module, samples: pd.DataFrame) -> pd.DataFrame:
        """Held-out samples → OOF rows for the spinal and foraminal targets of the views each study has."""
        probs, masks = sample_probs([model], job.config, samples)
        rows = [
            {"row_id": row_id(int(study), t), "study_id": int(study), **dict(zip(PROB_COLUMNS, map(float, probs[j, i]), strict=True))}
            for j, study in enumerate(samples["study_id"]) for i, t in enumerate(TARGETS) if masks[j, i]
        ]
        df = pd.DataFrame(rows, columns=["row_id", "study_id", *PROB_COLUMNS])
        return df.assign(fold=job.fold, member=job.member)[OOF_COLUMNS]


__all__ = [
    "OneStageConfig", "OneStageStage", "TARGETS", "MIRROR", "SAMPLE_COLUMNS", "study_sample", "flip_arrays", "augment_samples",
    "batch_tensors", "onestage_loss", "sample_probs", "predict_study",
]
