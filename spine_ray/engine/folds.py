"""Study-level K-fold assignment, stratified on the labels, fixed by a seed."""

from __future__ import annotations

import numpy as np
import pandas as pd

from spine_ray.core.schema import label_matrix


def stratum(labels: np.ndarray) -> np.ndarray:
    """A per-study stratum: any severe spinal × how many targets are moderate or worse (binned)."""
    spinal_severe = (labels[:, :5] == 2).any(axis=1).astype(int)
    burden = np.digitize((labels >= 1).sum(axis=1), [1, 3, 6, 10])
    return spinal_severe * 10 + burden


def assign_folds(labels: pd.DataFrame, n_folds: int, seed: int) -> pd.DataFrame:
    """Return `study_id, fold`: every study in exactly one fold, strata spread evenly."""
    if n_folds < 2:
        raise ValueError(f"need at least 2 folds, got {n_folds}")
    if len(labels) < n_folds:
        raise ValueError(f"{len(labels)} studies cannot fill {n_folds} folds")
    rng = np.random.default_rng(seed)
    strata = stratum(label_matrix(labels))
    order = rng.permutation(len(labels))
    # Sort by stratum (stable, so the random order survives within a stratum), then deal the
    # studies round-robin from a random starting fold.
    order = order[np.argsort(strata[order], kind="stable")]
    folds = np.empty(len(labels), dtype=np.int64)
    folds[order] = (np.arange(len(labels)) + rng.integers(n_folds)) % n_folds
    return pd.DataFrame({"study_id": labels["study_id"].to_numpy(dtype=np.int64), "fold": folds})
