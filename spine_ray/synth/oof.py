"""A synthetic training run directory: labels, folds, prior and an OOF ensemble of imperfect members.

Members are the label model's oracle probabilities seen through different faults, each with its own
noise so that blending them genuinely helps: an over-confident one, an under-confident one, one
biased towards Normal/Mild that also misses some rows (a missing series), and a weak noisy one.
Used by the blend tests and benchmark until `spine-ray train` writes real run directories.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from spine_ray.baseline import write_prior
from spine_ray.folds import assign_folds
from spine_ray.prior import fit_prior
from spine_ray.schema import N_TARGETS, PROB_COLUMNS, labels_from_matrix, row_ids
from spine_ray.storage import atomic_write_bytes, atomic_write_parquet, join
from spine_ray.synth.labels import sample_labels

# name → (logit noise sd, temperature, Normal/Mild logit bias, fraction of studies missing foraminal rows)
MEMBERS: dict[str, tuple[float, float, float, float]] = {
    "sharp": (0.6, 0.6, 0.0, 0.0),
    "soft": (0.6, 1.8, 0.0, 0.0),
    "biased": (0.5, 1.0, 0.6, 0.05),
    "weak": (1.2, 1.0, 0.0, 0.0),
}


def member_probs(oracle: np.ndarray, rng: np.random.Generator, noise: float, temperature: float, bias: float) -> np.ndarray:
    """Oracle [n, 25, 3] → a faulty member's probabilities: logit noise, temperature, Normal/Mild bias."""
    logits = np.log(np.clip(oracle, 1e-6, 1.0)) + noise * rng.standard_normal(oracle.shape)
    logits[..., 0] += bias
    logits /= temperature
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def synthetic_run(run_dir: str, n_studies: int = 400, n_folds: int = 5, seed: int = 0) -> dict[str, int]:
    """Write train_labels.csv, folds.parquet, prior.csv and oof.parquet under run_dir; returns rows dropped per member."""
    rng = np.random.default_rng(seed)
    labels, _, oracle = sample_labels(n_studies, rng)
    studies = list(range(1000, 1000 + n_studies))
    table = labels_from_matrix(studies, labels)
    atomic_write_bytes(join(run_dir, "train_labels.csv"), table.to_csv(index=False).encode())
    folds = assign_folds(table, n_folds, seed)
    atomic_write_parquet(join(run_dir, "folds.parquet"), folds)
    write_prior(fit_prior(labels), join(run_dir, "prior.csv"))

    fold_of = np.repeat(folds["fold"].to_numpy(), N_TARGETS)
    rid = np.asarray(row_ids(studies))
    study_col = np.repeat(np.asarray(studies, dtype=np.int64), N_TARGETS)
    frames, dropped = [], {}
    for name, (noise, temperature, bias, missing) in MEMBERS.items():
        p = member_probs(oracle, rng, noise, temperature, bias).reshape(-1, 3)
        keep = np.ones((n_studies, N_TARGETS), dtype=bool)
        keep[rng.random(n_studies) < missing, 5:15] = False  # a missing sagittal T1: no foraminal rows
        keep = keep.reshape(-1)
        df = pd.DataFrame(p[keep], columns=list(PROB_COLUMNS))
        df.insert(0, "member", name)
        df.insert(0, "fold", fold_of[keep])
        df.insert(0, "study_id", study_col[keep])
        df.insert(0, "row_id", rid[keep])
        frames.append(df)
        dropped[name] = int((~keep).sum())
    atomic_write_parquet(join(run_dir, "oof.parquet"), pd.concat(frames, ignore_index=True))
    return dropped
