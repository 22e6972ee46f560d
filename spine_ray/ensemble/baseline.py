"""Fit and score the prior baseline out-of-fold; write its tables."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from spine_ray.core.schema import LABEL_COLUMNS, PROB_COLUMNS, label_matrix
from spine_ray.core.storage import atomic_write_bytes
from spine_ray.engine.folds import assign_folds
from spine_ray.ensemble.metric import Score, score_arrays
from spine_ray.ensemble.prior import fit_prior, oof_prior


@dataclass(frozen=True)
class BaselineResult:
    """The prior fitted on all labels, its out-of-fold predictions and their score."""

    prior: np.ndarray  # [25, 3]
    folds: pd.DataFrame  # study_id, fold
    oof: np.ndarray  # [n_studies, 25, 3]
    score: Score


def run_baseline(labels: pd.DataFrame, n_folds: int = 5, seed: int = 0) -> BaselineResult:
    """Fit the prior on all studies and score it out-of-fold on study-level folds."""
    lm = label_matrix(labels)
    folds = assign_folds(labels, n_folds, seed)
    oof = oof_prior(lm, folds["fold"].to_numpy())
    return BaselineResult(fit_prior(lm), folds, oof, score_arrays(lm, oof))


def prior_table(prior: np.ndarray) -> pd.DataFrame:
    """The prior as a table: target, normal_mild, moderate, severe (one row per label column)."""
    df = pd.DataFrame(prior, columns=list(PROB_COLUMNS))
    df.insert(0, "target", list(LABEL_COLUMNS))
    return df


def read_prior_table(df: pd.DataFrame) -> np.ndarray:
    """Inverse of prior_table: [25, 3] in LABEL_COLUMNS order."""
    return df.set_index("target").loc[list(LABEL_COLUMNS), list(PROB_COLUMNS)].to_numpy(dtype=np.float64)


def read_prior(url: str) -> np.ndarray:
    """A run's prior.csv (path or URL) → [25, 3] in LABEL_COLUMNS order."""
    import io

    from spine_ray.core.storage import read_bytes

    return read_prior_table(pd.read_csv(io.BytesIO(read_bytes(url))))


def write_prior(prior: np.ndarray, dest: str) -> None:
    """Write prior.csv atomically."""
    atomic_write_bytes(dest, prior_table(prior).to_csv(index=False).encode())
