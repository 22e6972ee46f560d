"""The competition metric, exactly (Kaggle notebook "rsna-lumbar-metric", version 10), vectorised.

Score = mean of four sample-weighted log losses: spinal (5 targets per study), foraminal (10),
subarticular (10), and any_severe_spinal (one binary target per study). Sample weights are
1 / 2 / 4 for Normal/Mild / Moderate / Severe. Unlabelled rows are not scored. Predictions are
normalised per row and clipped away from 0 and 1 (as scikit-learn < 1.5 did inside log_loss).

The core, `score_arrays`, works on dense arrays so that Ray Tune can call it thousands of times;
`score_frames` aligns a submission table to a label table by row_id.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from spine_ray.core.schema import (
    CONDITION_GROUP,
    GROUPS,
    LABEL_COLUMNS,
    LEVELS,
    N_TARGETS,
    PROB_COLUMNS,
    SEVERITY_WEIGHTS,
    label_matrix,
    row_ids,
    validate_submission,
)

EPS = float(np.finfo(np.float64).eps)
_WEIGHTS = np.asarray(SEVERITY_WEIGHTS)
TARGET_GROUP: np.ndarray = np.repeat(np.asarray(CONDITION_GROUP), len(LEVELS))  # [25] group of each target
SPINAL: np.ndarray = TARGET_GROUP == 0  # [25] (the blend shares these)


@dataclass(frozen=True)
class Score:
    """The metric's four parts and their mean."""

    spinal: float
    foraminal: float
    subarticular: float
    any_severe_spinal: float
    score: float

    def as_dict(self) -> dict[str, float]:
        """Plain dict, for JSON and tables."""
        return asdict(self)


def normalise(p: np.ndarray) -> np.ndarray:
    """Rows summing to 1, clipped to [eps, 1-eps] and renormalised (sklearn's old log_loss)."""
    p = np.asarray(p, dtype=np.float64)
    p = p / p.sum(axis=-1, keepdims=True)
    p = np.clip(p, EPS, 1 - EPS)
    return p / p.sum(axis=-1, keepdims=True)


def _weighted_logloss(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> float:
    """Sample-weighted multi-class log loss of int labels y [n] under normalised probs p [n, k]."""
    if len(y) == 0 or w.sum() == 0:
        return float("nan")
    nll = -np.log(np.take_along_axis(p, y[:, None], axis=1)[:, 0])
    return float((w * nll).sum() / w.sum())


def score_arrays(labels: np.ndarray, probs: np.ndarray, any_severe_scalar: float = 1.0) -> Score:
    """Score dense predictions.

    labels: int [n_studies, 25], 0/1/2 per severity, -1 where unlabelled (not scored).
    probs:  float [n_studies, 25, 3], any positive scale per row.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[1] != N_TARGETS:
        raise ValueError(f"labels must be [n_studies, {N_TARGETS}], got {labels.shape}")
    if probs.shape != (*labels.shape, 3):
        raise ValueError(f"probs must be {(*labels.shape, 3)}, got {probs.shape}")
    p = normalise(probs)
    scored = labels >= 0
    y = np.where(scored, labels, 0)
    w = np.where(scored, _WEIGHTS[y], 0.0)

    parts = []
    for g in range(len(GROUPS)):
        cols = TARGET_GROUP == g
        m = scored[:, cols]
        parts.append(_weighted_logloss(y[:, cols][m], p[:, cols][m], w[:, cols][m]))

    # any_severe_spinal: per study with at least one scored spinal row.
    sm = scored[:, SPINAL]
    has = sm.any(axis=1)
    sev_label = ((y[:, SPINAL] == 2) & sm).any(axis=1)[has].astype(np.int64)
    sev_pred = np.where(sm, p[:, SPINAL, 2], -np.inf).max(axis=1)[has]
    sev_weight = np.where(sm, w[:, SPINAL], 0.0).max(axis=1)[has]
    binary = normalise(np.stack([1 - sev_pred, sev_pred], axis=1))
    parts.append(_weighted_logloss(sev_label, binary, sev_weight))

    weights = np.array([1.0, 1.0, 1.0, any_severe_scalar])
    vals = np.array(parts)
    ok = np.isfinite(vals)
    total = float((vals[ok] * weights[ok]).sum() / weights[ok].sum()) if ok.any() else float("nan")
    return Score(*map(float, parts), score=total)


def score_frames(labels: pd.DataFrame, submission: pd.DataFrame) -> Score:
    """Score a submission table against a wide label table (train.csv format)."""
    submission = validate_submission(submission)
    lm = label_matrix(labels)
    studies = labels["study_id"].astype(int).tolist()
    # Rows of studies that are entirely unlabelled need not be present.
    keep = (lm >= 0).any(axis=1)
    studies = [s for s, k in zip(studies, keep, strict=True) if k]
    lm = lm[keep]
    # Only labelled rows must be predicted; unlabelled ones get a placeholder.
    want = pd.Index(row_ids(studies))
    indexed = submission.set_index("row_id")
    present = want.isin(indexed.index)
    needed = lm.reshape(-1) >= 0
    if (needed & ~present).any():
        first = want[np.flatnonzero(needed & ~present)[0]]
        raise ValueError(f"submission lacks {int((needed & ~present).sum())} scored row_ids, e.g. {first}")
    probs = np.ones((len(want), 3))
    probs[present] = indexed.loc[want[present], list(PROB_COLUMNS)].to_numpy(dtype=np.float64)
    return score_arrays(lm, probs.reshape(len(studies), N_TARGETS, 3))


__all__ = ["EPS", "SPINAL", "TARGET_GROUP", "Score", "score_arrays", "score_frames", "normalise", "LABEL_COLUMNS"]
