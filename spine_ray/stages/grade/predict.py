"""Stage 2's predictions: the grader's forward pass, flip test-time augmentation, per-target probabilities and the severity AUC."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import nn

from spine_ray.core.schema import CONDITIONS, LABEL_COLUMNS, target_index
from spine_ray.engine.train_loop import precision
from spine_ray.stages.grade.augment import collate_samples, slot_permutation
from spine_ray.stages.grade.config import SAGITTAL_VIEWS, SAMPLE_COLUMNS, SLOTS, GradeConfig
from spine_ray.stages.grade.samples import study_samples


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


def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch through a Grader: logits [B, T, 3], slice logits and attention [B, T, S]."""
    # Slices beyond a volume are masked; a fully masked (padding) target keeps one slice so softmax stays finite.
    sm = batch["slice_mask"].clone()
    sm[..., sm.shape[-1] // 2] |= ~sm.any(-1)
    return model(batch["x"], batch["level"], batch["condition"], batch["view"], batch["target_mask"], sm)


def flip_batch(cfg: GradeConfig, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A collated batch mirrored left–right (as `flip_sample`, on tensors); slot ids stay, crops and per-slot data swap."""
    conditions = [c for c, _, _ in cfg.slots]
    perm = torch.from_numpy(slot_permutation(conditions))
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
        perm = slot_permutation([c for c, _, _ in cfg.slots])
        acc = 0.0
        for m in models:
            device = next(m.parameters()).device
            for v, b in enumerate(views):
                with precision(cfg.train, device):  # the member's training precision (bf16 on CUDA in the recipe)
                    logits = forward(m, {k: t.to(device) for k, t in b.items()})["logits"]
                p = logits.float().softmax(-1).cpu().numpy()
                acc = acc + (p[:, perm] if v else p)  # a mirrored slot's prediction belongs to its mirror
        probs.append(acc / (len(models) * len(views)))
        masks.append(batch["target_mask"].numpy())
    t = len(cfg.slots)
    if not probs:
        return np.zeros((0, t, 3)), np.zeros((0, t), bool)
    return np.concatenate(probs), np.concatenate(masks)


def target_probs(cfg: GradeConfig, samples: pd.DataFrame, probs: np.ndarray, masks: np.ndarray) -> list[tuple[int, str, np.ndarray]]:
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
    for _, target, pr in target_probs(cfg, samples, p, m):
        probs[target_index(target)] = pr
        mask[target_index(target)] = True
    return probs, mask
