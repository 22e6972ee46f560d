"""The prior model: the loss-optimal constant prediction per target.

Under a log loss with sample weights w(k) = 1/2/4, the constant p minimising
sum_i w(y_i) * -log p(y_i) is p(k) ∝ w(k) × n(k), not the class frequency n(k). This is the floor
every trained model must beat and the fallback for studies that cannot be scored.
"""

from __future__ import annotations

import numpy as np

from spine_ray.core.schema import N_TARGETS, SEVERITY_WEIGHTS

# One pseudo-count per class keeps a class never seen in a small training set above zero.
PSEUDO_COUNT = 1.0


def fit_prior(labels: np.ndarray, pseudo_count: float = PSEUDO_COUNT) -> np.ndarray:
    """Fit on int labels [n_studies, 25] (-1 = empty); returns probabilities [25, 3]."""
    labels = np.asarray(labels)
    counts = np.stack([(labels == k).sum(axis=0) for k in range(3)], axis=1).astype(np.float64)
    mass = (counts + pseudo_count) * np.asarray(SEVERITY_WEIGHTS)
    return mass / mass.sum(axis=1, keepdims=True)


def predict_prior(prior: np.ndarray, n_studies: int) -> np.ndarray:
    """The prior repeated for n studies: [n_studies, 25, 3]."""
    assert prior.shape == (N_TARGETS, 3)
    return np.broadcast_to(prior, (n_studies, N_TARGETS, 3)).copy()


def oof_prior(labels: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Out-of-fold prior predictions: each study scored by the prior fitted on the other folds."""
    out = np.empty((len(labels), N_TARGETS, 3))
    for f in np.unique(folds):
        held = folds == f
        out[held] = fit_prior(labels[~held])
    return out
