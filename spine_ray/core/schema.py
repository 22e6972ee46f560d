"""The competition's data contract: names, label tables, coordinates, series lists and submissions.

Every reader validates what it reads and raises `SchemaError` naming the file, the row and the
problem. Readers take a local path or any fsspec URL (s3://, gs://, memory://).
"""

from __future__ import annotations

import io
from collections.abc import Iterable

import numpy as np
import pandas as pd

from spine_ray.core.storage import atomic_write_bytes, read_bytes

CONDITIONS: tuple[str, ...] = (
    "spinal_canal_stenosis",
    "left_neural_foraminal_narrowing",
    "right_neural_foraminal_narrowing",
    "left_subarticular_stenosis",
    "right_subarticular_stenosis",
)
LEVELS: tuple[str, ...] = ("l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1")
LEVEL_TITLES: tuple[str, ...] = ("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1")
CONDITION_TITLES: tuple[str, ...] = (
    "Spinal Canal Stenosis",
    "Left Neural Foraminal Narrowing",
    "Right Neural Foraminal Narrowing",
    "Left Subarticular Stenosis",
    "Right Subarticular Stenosis",
)
SEVERITIES: tuple[str, ...] = ("Normal/Mild", "Moderate", "Severe")
PROB_COLUMNS: tuple[str, ...] = ("normal_mild", "moderate", "severe")
# Every out-of-fold table (a fold's oof.parquet, the run's oof.parquet): one row per (study, target, member).
OOF_COLUMNS: list[str] = ["row_id", "study_id", "fold", "member", *PROB_COLUMNS]
SEVERITY_WEIGHTS: tuple[float, ...] = (1.0, 2.0, 4.0)

SAGITTAL_T1 = "Sagittal T1"
SAGITTAL_T2 = "Sagittal T2/STIR"
AXIAL_T2 = "Axial T2"
SERIES_DESCRIPTIONS: tuple[str, ...] = (SAGITTAL_T1, SAGITTAL_T2, AXIAL_T2)

# Which series each condition is annotated on in train_label_coordinates.csv.
CONDITION_SERIES: dict[str, str] = {
    "spinal_canal_stenosis": SAGITTAL_T2,
    "left_neural_foraminal_narrowing": SAGITTAL_T1,
    "right_neural_foraminal_narrowing": SAGITTAL_T1,
    "left_subarticular_stenosis": AXIAL_T2,
    "right_subarticular_stenosis": AXIAL_T2,
}
# Metric groups: the index of each condition's group in GROUPS.
GROUPS: tuple[str, ...] = ("spinal", "foraminal", "subarticular")
CONDITION_GROUP: tuple[int, ...] = (0, 1, 1, 2, 2)

# The 25 label columns of train.csv, in the file's order (condition-major, level-minor).
LABEL_COLUMNS: tuple[str, ...] = tuple(f"{c}_{lv}" for c in CONDITIONS for lv in LEVELS)
N_TARGETS = len(LABEL_COLUMNS)

COORDINATE_COLUMNS: tuple[str, ...] = (
    "study_id", "series_id", "instance_number", "condition", "level", "x", "y",
)
SERIES_COLUMNS: tuple[str, ...] = ("study_id", "series_id", "series_description")
SUBMISSION_COLUMNS: tuple[str, ...] = ("row_id", *PROB_COLUMNS)


class SchemaError(ValueError):
    """Input that does not follow the competition's data contract."""

    def __init__(self, source: str, problem: str, row: int | None = None) -> None:
        where = f"{source}" if row is None else f"{source}, row {row}"
        super().__init__(f"{where}: {problem}")
        self.source, self.row, self.problem = source, row, problem


def with_target(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of a long label table with its `target` column: the label column name `{condition}_{level}`."""
    return df.assign(target=df["condition"] + "_" + df["level"])


def row_id(study_id: int | str, target: str) -> str:
    """The submission key `{study_id}_{condition}_{level}` for one study and label column."""
    return f"{study_id}_{target}"


def row_ids(study_ids: Iterable[int | str]) -> list[str]:
    """All 25 row_ids of each study, study-major, targets in LABEL_COLUMNS order."""
    return [row_id(s, t) for s in study_ids for t in LABEL_COLUMNS]


def split_row_id(rid: str) -> tuple[int, str]:
    """`'123_spinal_canal_stenosis_l1_l2'` → `(123, 'spinal_canal_stenosis_l1_l2')`."""
    study, _, target = rid.partition("_")
    if not study.isdigit() or target not in _TARGET_INDEX:
        raise ValueError(f"not a valid row_id: {rid!r}")
    return int(study), target


_TARGET_INDEX = {t: i for i, t in enumerate(LABEL_COLUMNS)}
_SEVERITY_INDEX = {s: i for i, s in enumerate(SEVERITIES)}
_CONDITION_BY_TITLE = {t: c for t, c in zip(CONDITION_TITLES, CONDITIONS, strict=True)}
_LEVEL_BY_TITLE = {t: lv for t, lv in zip(LEVEL_TITLES, LEVELS, strict=True)}


def target_index(target: str) -> int:
    """Position of a label column in LABEL_COLUMNS."""
    return _TARGET_INDEX[target]


def _read_csv(source: str, dtype: dict | None = None) -> pd.DataFrame:
    try:
        raw = read_bytes(source)
    except FileNotFoundError:
        raise SchemaError(source, "file not found") from None
    try:
        return pd.read_csv(io.BytesIO(raw), dtype=dtype, keep_default_na=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise SchemaError(source, f"not a readable CSV ({str(e).splitlines()[0]})") from None


def _check_columns(df: pd.DataFrame, expected: Iterable[str], source: str) -> None:
    expected = list(expected)
    missing = [c for c in expected if c not in df.columns]
    extra = [c for c in df.columns if c not in expected]
    if missing:
        raise SchemaError(source, f"missing columns {missing}")
    if extra:
        raise SchemaError(source, f"unexpected columns {extra}")


def _check_int_ids(df: pd.DataFrame, columns: Iterable[str], source: str) -> None:
    for col in columns:
        values = pd.to_numeric(df[col], errors="coerce")
        bad = values.isna() | (values != values.round())
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise SchemaError(source, f"{col} {df[col].iloc[i]!r} is not an integer id", row=i + 2)
        df[col] = values.astype("int64")


def _check_unique(df: pd.DataFrame, columns: list[str], source: str) -> None:
    dup = df.duplicated(columns)
    if dup.any():
        i = int(np.flatnonzero(dup.to_numpy())[0])
        key = ", ".join(f"{c}={df[c].iloc[i]}" for c in columns)
        raise SchemaError(source, f"duplicate {key}", row=i + 2)


def validate_labels(df: pd.DataFrame, source: str = "train.csv") -> pd.DataFrame:
    """Validate a wide label table (study_id + 25 columns); returns it with int study ids."""
    df = df.copy()
    _check_columns(df, ("study_id", *LABEL_COLUMNS), source)
    _check_int_ids(df, ["study_id"], source)
    _check_unique(df, ["study_id"], source)
    values = df[list(LABEL_COLUMNS)]
    bad = ~(values.isna() | values.isin(SEVERITIES))
    if bad.to_numpy().any():
        i, j = (int(a[0]) for a in np.nonzero(bad.to_numpy()))
        raise SchemaError(
            source,
            f"unknown severity {values.iat[i, j]!r} in {LABEL_COLUMNS[j]} (expected one of {list(SEVERITIES)} or empty)",
            row=i + 2,
        )
    return df[["study_id", *LABEL_COLUMNS]].reset_index(drop=True)


def read_labels(source: str) -> pd.DataFrame:
    """Read and validate train.csv: study_id + 25 severity columns; empty cells stay NaN."""
    return validate_labels(_read_csv(source, dtype={c: "object" for c in LABEL_COLUMNS}), source)


def label_matrix(labels: pd.DataFrame) -> np.ndarray:
    """Wide labels → int8 array [n_studies, 25]: 0/1/2 for the severities, -1 where unlabelled."""
    codes = labels[list(LABEL_COLUMNS)].apply(lambda s: s.map(_SEVERITY_INDEX))
    return codes.fillna(-1).to_numpy(dtype=np.int8)


def labels_from_matrix(study_ids: Iterable[int], matrix: np.ndarray) -> pd.DataFrame:
    """Inverse of label_matrix: int codes [n, 25] (-1 = empty) → a wide label table."""
    sev = np.array((*SEVERITIES, None), dtype=object)
    table = pd.DataFrame(sev[np.where(matrix < 0, 3, matrix)], columns=list(LABEL_COLUMNS))
    table.insert(0, "study_id", np.asarray(list(study_ids), dtype=np.int64))
    return table


def labels_long(labels: pd.DataFrame) -> pd.DataFrame:
    """Wide labels → one row per study × target: study_id, condition, level, row_id, severity (-1 = empty)."""
    m = label_matrix(labels)
    n = len(labels)
    conds = np.repeat(np.array(CONDITIONS), len(LEVELS))
    levels = np.tile(np.array(LEVELS), len(CONDITIONS))
    study = np.repeat(labels["study_id"].to_numpy(), N_TARGETS)
    return pd.DataFrame(
        {
            "study_id": study,
            "condition": np.tile(conds, n),
            "level": np.tile(levels, n),
            "row_id": [f"{s}_{c}_{lv}" for s, c, lv in zip(study, np.tile(conds, n), np.tile(levels, n), strict=True)],
            "severity": m.reshape(-1),
        }
    )


def validate_coordinates(df: pd.DataFrame, source: str = "train_label_coordinates.csv") -> pd.DataFrame:
    """Validate label coordinates; adds snake-case `target` (e.g. `spinal_canal_stenosis_l1_l2`)."""
    df = df.copy()
    _check_columns(df, COORDINATE_COLUMNS, source)
    _check_int_ids(df, ["study_id", "series_id", "instance_number"], source)
    for col, known in (("condition", _CONDITION_BY_TITLE), ("level", _LEVEL_BY_TITLE)):
        bad = ~df[col].isin(known)
        if bad.any():
            i = int(np.flatnonzero(bad.to_numpy())[0])
            raise SchemaError(
                source, f"unknown {col} {df[col].iloc[i]!r} (expected one of {list(known)})", row=i + 2
            )
    for col in ("x", "y"):
        v = pd.to_numeric(df[col], errors="coerce")
        bad = ~np.isfinite(v.to_numpy(dtype=float))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise SchemaError(source, f"{col} {df[col].iloc[i]!r} is not a finite number", row=i + 2)
        df[col] = v.astype(float)
    _check_unique(df, ["study_id", "series_id", "condition", "level"], source)
    df["target"] = df["condition"].map(_CONDITION_BY_TITLE) + "_" + df["level"].map(_LEVEL_BY_TITLE)
    return df.reset_index(drop=True)


def read_coordinates(source: str) -> pd.DataFrame:
    """Read and validate train_label_coordinates.csv (official title-case format)."""
    return validate_coordinates(_read_csv(source), source)


def validate_series(df: pd.DataFrame, source: str = "series_descriptions.csv") -> pd.DataFrame:
    """Validate a series list: study_id, series_id, series_description."""
    df = df.copy()
    _check_columns(df, SERIES_COLUMNS, source)
    _check_int_ids(df, ["study_id", "series_id"], source)
    bad = ~df["series_description"].isin(SERIES_DESCRIPTIONS)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise SchemaError(
            source,
            f"unknown series_description {df['series_description'].iloc[i]!r} (expected one of {list(SERIES_DESCRIPTIONS)})",
            row=i + 2,
        )
    _check_unique(df, ["study_id", "series_id"], source)
    return df.reset_index(drop=True)


def read_series(source: str) -> pd.DataFrame:
    """Read and validate a `{split}_series_descriptions.csv`."""
    return validate_series(_read_csv(source), source)


def validate_submission(
    df: pd.DataFrame, source: str = "submission.csv", study_ids: Iterable[int] | None = None
) -> pd.DataFrame:
    """Validate a submission; with `study_ids`, require all 25 rows of each of those studies."""
    df = df.copy()
    _check_columns(df, SUBMISSION_COLUMNS, source)
    rid = df["row_id"].astype(str)
    for i, r in enumerate(rid):
        try:
            split_row_id(r)
        except ValueError:
            raise SchemaError(source, f"bad row_id {r!r} (expected {{study_id}}_{{condition}}_{{level}})", row=i + 2) from None
    _check_unique(df, ["row_id"], source)
    probs = df[list(PROB_COLUMNS)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    checks = (
        (~np.isfinite(probs).all(axis=1), "probabilities must be finite numbers"),
        ((probs < 0).any(axis=1), "probabilities must not be negative"),
        ((probs == 0).all(axis=1), "probabilities must not all be zero"),
    )
    for bad, problem in checks:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise SchemaError(source, f"{problem} (row_id {rid.iloc[i]})", row=i + 2)
    df[list(PROB_COLUMNS)] = probs
    if study_ids is not None:
        missing = sorted(set(row_ids(study_ids)) - set(rid))
        if missing:
            raise SchemaError(source, f"{len(missing)} row_ids missing, e.g. {missing[0]}")
    return df.reset_index(drop=True)


def read_submission(source: str, study_ids: Iterable[int] | None = None) -> pd.DataFrame:
    """Read and validate a submission CSV (row_id, normal_mild, moderate, severe)."""
    return validate_submission(_read_csv(source, dtype={"row_id": str}), source, study_ids)


def submission_frame(study_ids: Iterable[int], probs: np.ndarray) -> pd.DataFrame:
    """Probabilities [n_studies, 25, 3] → a submission table, rows normalised to sum 1."""
    study_ids = list(study_ids)
    p = np.asarray(probs, dtype=np.float64).reshape(len(study_ids) * N_TARGETS, 3)
    p = p / p.sum(axis=1, keepdims=True)
    df = pd.DataFrame(p, columns=list(PROB_COLUMNS))
    df.insert(0, "row_id", row_ids(study_ids))
    return df


def write_submission(df: pd.DataFrame, dest: str, study_ids: Iterable[int] | None = None) -> pd.DataFrame:
    """Validate, normalise and atomically write a submission; returns what was written."""
    df = validate_submission(df, dest, study_ids)
    p = df[list(PROB_COLUMNS)].to_numpy()
    df[list(PROB_COLUMNS)] = p / p.sum(axis=1, keepdims=True)
    atomic_write_bytes(dest, df.to_csv(index=False).encode())
    return df
