"""A synthetic training run directory: labels, folds, prior and an OOF ensemble of imperfect members.

Members are the label model's oracle probabilities seen through different faults, each with its own
noise so that blending them genuinely helps. `MEMBERS` (the default): an over-confident one, an
under-confident one, one biased towards Normal/Mild that also misses some rows (a missing series),
and a weak noisy one. `STRESS_MEMBERS`: seven members shaped like a real competition ensemble, each
predicting one condition group only (the others come from the prior), with near-equal pairs that
averaging helps and one near-duplicate that it cannot. Used by the blend tests and benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from spine_ray.core.schema import N_TARGETS, PROB_COLUMNS, labels_from_matrix, row_ids
from spine_ray.core.storage import atomic_write_bytes, atomic_write_parquet, join
from spine_ray.engine.folds import assign_folds
from spine_ray.ensemble.baseline import write_prior
from spine_ray.ensemble.metric import TARGET_GROUP
from spine_ray.ensemble.prior import fit_prior
from spine_ray.synth.labels import sample_labels


@dataclass(frozen=True)
class MemberSpec:
    """How one synthetic member sees the oracle."""

    noise: float  # logit noise sd (added to the twin's noisy logits when twin_of is set)
    temperature: float = 1.0
    bias: float = 0.0  # added to the Normal/Mild logit
    missing: float = 0.0  # share of studies whose foraminal rows it lacks (a missing sagittal T1)
    groups: tuple[int, ...] = (0, 1, 2)  # condition groups it predicts at all
    twin_of: str | None = None  # a near-duplicate of this (earlier) member


MEMBERS: dict[str, MemberSpec] = {
    "sharp": MemberSpec(0.6, 0.6),
    "soft": MemberSpec(0.6, 1.8),
    "biased": MemberSpec(0.5, 1.0, 0.6, 0.05),
    "weak": MemberSpec(1.2, 1.0),
}
STRESS_MEMBERS: dict[str, MemberSpec] = {
    "spinal_a": MemberSpec(0.6, 0.7, groups=(0,)),
    "spinal_b": MemberSpec(0.6, 1.3, groups=(0,)),
    "foraminal_a": MemberSpec(0.7, 1.0, groups=(1,)),
    "foraminal_a2": MemberSpec(0.05, 1.0, groups=(1,), twin_of="foraminal_a"),
    "foraminal_b": MemberSpec(0.7, 1.0, groups=(1,)),
    "subarticular_a": MemberSpec(0.6, 0.8, 0.3, groups=(2,)),
    "subarticular_b": MemberSpec(0.8, 1.2, groups=(2,)),
}


def _faulty(logits: np.ndarray, temperature: float, bias: float) -> np.ndarray:
    """Noisy logits [n, 25, 3] → probabilities with a Normal/Mild bias and a temperature."""
    logits = logits.copy()
    logits[..., 0] += bias
    logits /= temperature
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return p / p.sum(axis=-1, keepdims=True)


def synthetic_run(
    run_dir: str, n_studies: int = 400, n_folds: int = 5, seed: int = 0, members: dict[str, MemberSpec] | None = None,
) -> dict[str, int]:
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
    frames, dropped, noisy = [], {}, {}
    for name, spec in (members or MEMBERS).items():
        base = noisy[spec.twin_of] if spec.twin_of else np.log(np.clip(oracle, 1e-6, 1.0))
        noisy[name] = base + spec.noise * rng.standard_normal(oracle.shape)
        p = _faulty(noisy[name], spec.temperature, spec.bias).reshape(-1, 3)
        keep = np.ones((n_studies, N_TARGETS), dtype=bool)
        keep[rng.random(n_studies) < spec.missing, 5:15] = False  # a missing sagittal T1: no foraminal rows
        keep[:, ~np.isin(TARGET_GROUP, spec.groups)] = False
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
