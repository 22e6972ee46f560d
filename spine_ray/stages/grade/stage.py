"""Stage 2 as a `Stage`: the pieces the fold driver calls for one grade member."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import torch
from torch import nn

from spine_ray.core.schema import OOF_COLUMNS, PROB_COLUMNS, row_id
from spine_ray.engine.stage import FoldJob, VolumeStage
from spine_ray.models.freezing import freeze_backbone, unfreeze
from spine_ray.models.grader import Grader
from spine_ray.stages.grade.augment import augment_samples, batch_tensors, defer_samples
from spine_ray.stages.grade.augment_torch import device_batch
from spine_ray.stages.grade.config import SAMPLE_COLUMNS, GradeConfig
from spine_ray.stages.grade.predict import forward, sample_probs, severity_auc, target_probs
from spine_ray.stages.grade.samples import (
    label_table,
    point_urls,
    points_for,
    severity_table,
    slice_errors,
    study_samples,
)
from spine_ray.stages.losses import grader_loss


class GradeStage(VolumeStage[GradeConfig]):
    """Stage 2 for one ensemble member (the FoldJob's config is a GradeConfig)."""

    config_type = GradeConfig

    def sample_key(self, job: FoldJob[GradeConfig], split: str) -> dict:
        """Crop geometry and slots shape a sample; validation crops sit on the stage-1 points."""
        c = job.config
        return {
            "sagittal_mm": c.sagittal_mm, "axial_mm": c.axial_mm, "out_px": c.out_px, "k": c.k, "max_shift": c.max_shift,
            "context": c.context, "multiview_spinal": c.multiview_spinal,
            # Train samples store labels, so an exclusion table's content is part of their key.
            "inputs": [n for n in job.inputs if n == "points" or n.startswith("points/")] if split != "train"
            else [n for n in ("exclude_labels",) if n in job.inputs],
        }

    def to_samples(self, job: FoldJob[GradeConfig], split: str, rows: pd.DataFrame) -> pd.DataFrame:
        """Volume rows → one sample per (study, level) with context patches for every slot."""
        cfg = job.config
        points = points_for(job, split)
        sev = severity_table(job, split)
        gt = label_table(job.prepared) if split != "test" else None
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
        """Re-crop every slot with jitter (slice shifts drawn from stage-1 errors when known), intensity, flip; with `augment_on: device`, only the draws."""
        errors = slice_errors(point_urls(job)) if rng is not None and point_urls(job) else None
        if job.config.augment_on == "device":
            return defer_samples(job.config, rows, rng, errors)  # parameters drawn here, applied in `on_device`
        return augment_samples(job.config, rows, rng, errors)

    def to_batch(self, job: FoldJob[GradeConfig], arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """x [B, T, S, 1, H, W] (or the stored patches and draws `on_device` turns into it) and per-target ids, masks, labels."""
        return batch_tensors(job.config, arrays)

    def on_device(self, job: FoldJob[GradeConfig], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """With `augment_on: device`, the crops of a batch's stored patches and drawn parameters, made on its device; other batches pass."""
        return device_batch(job.config, batch) if "aug_patch" in batch else batch

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

    def loss(self, job: FoldJob[GradeConfig], model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Severity CE weighted by class_weights (the metric's 1/2/4) + any-severe-spinal + auxiliary slice CE."""
        cfg = job.config
        out = forward(model, batch)
        parts = grader_loss(out, batch["labels"], batch["slice_target"], batch["spinal_study"], cfg.w_slice, cfg.w_any, cfg.class_weights)
        return parts["loss"], {k: v.detach() for k, v in parts.items() if k != "loss"}

    def predict(self, job: FoldJob[GradeConfig], model: nn.Module, samples: pd.DataFrame) -> pd.DataFrame:
        """Held-out samples → the OOF table, one row per (study, target) predicted."""
        cfg = job.config
        probs, masks = sample_probs([model], cfg, samples)
        rows = [
            {"row_id": row_id(study, target), "study_id": study, **dict(zip(PROB_COLUMNS, map(float, p), strict=True))}
            for study, target, p in target_probs(cfg, samples, probs, masks)
        ]
        df = pd.DataFrame(rows, columns=["row_id", "study_id", *PROB_COLUMNS])
        # Each row_id once, averaged over the samples that saw it (none do twice today; cheap insurance).
        df = df.groupby(["row_id", "study_id"], as_index=False, sort=True)[list(PROB_COLUMNS)].mean()
        return df.assign(fold=job.fold, member=job.member)[OOF_COLUMNS]
