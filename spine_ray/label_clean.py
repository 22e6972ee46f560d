"""Out-of-fold label cleaning (the 2nd-place team's method): flag labels the ensemble disbelieves.

For every labelled (study, target) that the ensemble predicted out of fold, the probability it gave
the labelled grade is `p_label`; a label is flagged when `p_label < threshold`. A user retrains with
`--set exclude_labels=RUN_DIR/label_flags.parquet`: training treats the flagged targets as
unlabelled (label −1, no loss), while validation and the OOF scores keep every label so that CV
stays comparable with the run the flags came from.

The ensemble is the plain mean of the members' probabilities over the members that predicted the
row, not the blend of blend.json: the blend's weights and temperatures were fitted to these very
labels (its temperature in particular widens to make room for the noisy ones), and its log-linear
pool lets one confidently wrong member veto the rest; a linear mean is a purely out-of-fold
quantity and needs no tuning step. Rows no member predicted are not judged (not in the table).

On synthetic data the noise is known: the noiseless grade is the latent severity z thresholded at
(0, 1) (`spine_ray.synth.labels`), and a label is *flipped* when the drawn label differs from it.
`noise_recovery` scores the flagged set against the flipped set. Pure pandas/numpy, no Ray.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pandas as pd

from spine_ray.core.schema import (
    CONDITIONS,
    LABEL_COLUMNS,
    N_TARGETS,
    PROB_COLUMNS,
    SchemaError,
    label_matrix,
    read_labels,
)
from spine_ray.core.storage import exists, join, read_bytes, read_text
from spine_ray.data.label_flags import FLAG_COLUMNS, write_flags
from spine_ray.ensemble.blend import member_matrix

FLAGS_FILE = "label_flags.parquet"
# Conservative: a calibrated ensemble keeps ~100% precision up to 0.3 on synthetic data, but a noisy
# model's flags are half correct labels already at 0.1 (docs/BENCHMARKS.md), and a wrongly dropped
# label is usually a rare, informative grade.
DEFAULT_THRESHOLD = 0.1
OOF_NEEDS: tuple[str, ...] = ("row_id", "member", *PROB_COLUMNS)
_CONDITION_OF = np.repeat(np.array(CONDITIONS), N_TARGETS // len(CONDITIONS))  # [25] condition of each target


def ensemble_probs(oof: pd.DataFrame, study_ids: list[int]) -> np.ndarray:
    """Mean of the members' OOF probabilities per study × target: [n, 25, 3], NaN where no member predicted."""
    members = sorted(oof["member"].astype(str).unique())
    oof = oof.assign(member=oof["member"].astype(str))
    mm = member_matrix(oof, study_ids, members, np.full((N_TARGETS, 3), np.nan))
    probs = mm.probs.copy()  # [M, n, 25, 3]
    probs[~mm.covered] = np.nan
    with np.errstate(invalid="ignore"):
        counted = np.isfinite(probs).all(axis=-1).sum(axis=0)[..., None]  # [n, 25, 1]
        mean = np.nansum(probs, axis=0) / counted
        mean /= mean.sum(axis=-1, keepdims=True)
    return mean


def flag_labels(probs: np.ndarray, labels: np.ndarray, study_ids: list[int], threshold: float = DEFAULT_THRESHOLD) -> pd.DataFrame:
    """Ensemble probabilities [n, 25, 3] and labels [n, 25] (−1 empty) → the flags table, one row per judged label."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    judged = (labels >= 0) & np.isfinite(probs).all(axis=-1)  # [n, 25]
    s, t = np.nonzero(judged)
    lab = labels[s, t].astype(np.int64)
    p = probs[s, t]  # [k, 3]
    p_label = p[np.arange(len(lab)), lab]
    return pd.DataFrame({
        "study_id": np.asarray(study_ids, dtype=np.int64)[s],
        "target": np.asarray(LABEL_COLUMNS)[t],
        "label": lab.astype(np.int8),
        "p_label": p_label,
        "p_normal_mild": p[:, 0], "p_moderate": p[:, 1], "p_severe": p[:, 2],
        "flagged": p_label < threshold,
    }, columns=list(FLAG_COLUMNS))


def flag_counts(flags: pd.DataFrame) -> pd.DataFrame:
    """Judged and flagged labels per condition (and in total), with the flagged share."""
    cond = flags["target"].map(dict(zip(LABEL_COLUMNS, _CONDITION_OF, strict=True)))
    g = flags.groupby(cond, sort=False)["flagged"].agg(judged="size", flagged="sum")
    g = g.reindex([c for c in CONDITIONS if c in g.index])
    g.loc["total"] = [len(flags), int(flags["flagged"].sum())]
    g = g.astype(np.int64)
    g["share"] = g["flagged"] / g["judged"].clip(lower=1)
    g.index.name = "condition"
    return g


def noiseless_grades(latent: np.ndarray) -> np.ndarray:
    """The synthetic label model's grade without reader noise: latent z thresholded at 0 and 1."""
    from spine_ray.synth.labels import THRESHOLDS

    z = np.asarray(latent, dtype=np.float64)
    return ((z >= THRESHOLDS[0]).astype(np.int8) + (z >= THRESHOLDS[1]).astype(np.int8))


@dataclass(frozen=True)
class NoiseRecovery:
    """How well the flagged set finds the labels the synthetic label model flipped."""

    judged: int  # labels in the flags table
    flipped: int  # of those, drawn label ≠ noiseless grade
    flagged: int
    hits: int  # flagged and flipped

    @property
    def precision(self) -> float:
        """Share of flagged labels that were flipped (NaN when nothing is flagged)."""
        return self.hits / self.flagged if self.flagged else float("nan")

    @property
    def recall(self) -> float:
        """Share of flipped labels that were flagged (NaN when none was flipped)."""
        return self.hits / self.flipped if self.flipped else float("nan")

    @property
    def base_rate(self) -> float:
        """Share of judged labels that were flipped: the precision of flagging at random."""
        return self.flipped / self.judged if self.judged else float("nan")


def flipped_mask(flags: pd.DataFrame, latent: pd.DataFrame, source: str = "latent.csv") -> np.ndarray:
    """Per row of the flags table: whether its label differs from the noiseless grade of latent.csv."""
    missing = [c for c in ("study_id", *LABEL_COLUMNS) if c not in latent.columns]
    if missing:
        raise SchemaError(source, f"missing columns {missing}")
    wide = latent.set_index(latent["study_id"].astype(np.int64))[list(LABEL_COLUMNS)]
    absent = sorted(set(flags["study_id"]) - set(wide.index))
    if absent:
        raise SchemaError(source, f"{len(absent)} studies of the flags table have no latent row, e.g. {absent[0]}")
    grades = noiseless_grades(wide.to_numpy(dtype=np.float64))  # [n, 25]
    row = wide.index.get_indexer(flags["study_id"])
    col = pd.Index(LABEL_COLUMNS).get_indexer(flags["target"])
    return grades[row, col] != flags["label"].to_numpy()


def noise_recovery(flags: pd.DataFrame, latent: pd.DataFrame, source: str = "latent.csv") -> NoiseRecovery:
    """Precision and recall of the flagged set against the flipped labels, and the base rate."""
    flipped = flipped_mask(flags, latent, source)
    flagged = flags["flagged"].to_numpy(dtype=bool)
    return NoiseRecovery(len(flags), int(flipped.sum()), int(flagged.sum()), int((flipped & flagged).sum()))


def find_latent(run_dir: str) -> str | None:
    """The synthetic latent.csv behind a run: run config → prepared manifest → data_dir; None if not synthetic."""
    import json

    import yaml

    try:
        prepared = yaml.safe_load(read_text(join(run_dir, "config.yaml")))["prepared"]
        data_dir = json.loads(read_text(join(prepared, "manifest.json")))["data_dir"]
    except (FileNotFoundError, KeyError, TypeError, ValueError):
        return None
    url = join(data_dir, "latent.csv")
    return url if exists(url) else None


@dataclass(frozen=True)
class CleanReport:
    """What `clean_labels` wrote and found."""

    flags_url: str
    threshold: float
    counts: pd.DataFrame  # per condition: judged, flagged, share
    latent_url: str | None = None
    recovery: NoiseRecovery | None = None


def clean_labels(run_dir: str, threshold: float = DEFAULT_THRESHOLD, out: str | None = None, synthetic: str | None = None) -> CleanReport:
    """Flag RUN_DIR's labels from its oof.parquet, write the flags table; on synthetic data score it against latent.csv."""
    oof_url, labels_url = join(run_dir, "oof.parquet"), join(run_dir, "train_labels.csv")
    for url in (oof_url, labels_url):
        if not exists(url):
            raise SchemaError(url, "file not found (is RUN_DIR a finished training run?)")
    labels = read_labels(labels_url)
    try:
        oof = pd.read_parquet(io.BytesIO(read_bytes(oof_url)))
    except Exception as e:  # noqa: BLE001 - as read_flags
        raise SchemaError(oof_url, f"not a readable Parquet table ({str(e).splitlines()[0]})") from None
    missing = [c for c in OOF_NEEDS if c not in oof.columns]
    if missing:
        raise SchemaError(oof_url, f"missing columns {missing}")
    study_ids = labels["study_id"].astype(int).tolist()
    try:
        probs = ensemble_probs(oof, study_ids)
    except ValueError as e:
        raise SchemaError(oof_url, str(e)) from None
    flags = flag_labels(probs, label_matrix(labels), study_ids, threshold)
    dest = out or join(run_dir, FLAGS_FILE)
    write_flags(flags, dest)
    latent_url = join(synthetic, "latent.csv") if synthetic else find_latent(run_dir)
    recovery = None
    if latent_url:
        try:
            latent = pd.read_csv(io.BytesIO(read_bytes(latent_url)))
        except FileNotFoundError:
            raise SchemaError(latent_url, "file not found (--synthetic must be a `spine-ray synth` dataset)") from None
        recovery = noise_recovery(flags, latent, latent_url)
    return CleanReport(dest, threshold, flag_counts(flags), latent_url, recovery)


__all__ = [
    "FLAGS_FILE", "DEFAULT_THRESHOLD", "NoiseRecovery", "CleanReport", "ensemble_probs", "flag_labels",
    "flag_counts", "noiseless_grades", "flipped_mask", "noise_recovery",
    "find_latent", "clean_labels",
]
