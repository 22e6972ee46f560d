"""The label flags table (`label_flags.parquet`): labels that training treats as unlabelled.

Written by `spine-ray clean-labels` (`spine_ray.label_clean`), read by stage 2 when a run sets
`exclude_labels`. Columns: study_id, target (a train.csv label column), label, p_label,
p_normal_mild, p_moderate, p_severe, flagged (bool: the label is excluded from training).
"""

from __future__ import annotations

import io

import pandas as pd

from spine_ray.core.schema import LABEL_COLUMNS, SchemaError
from spine_ray.core.storage import atomic_write_parquet, read_bytes

FLAG_COLUMNS: tuple[str, ...] = (
    "study_id", "target", "label", "p_label", "p_normal_mild", "p_moderate", "p_severe", "flagged",
)


def write_flags(flags: pd.DataFrame, url: str) -> None:
    """Write the flags table atomically (Parquet)."""
    atomic_write_parquet(url, flags[list(FLAG_COLUMNS)].reset_index(drop=True))


def read_flags(url: str) -> pd.DataFrame:
    """Read and validate a flags table; a missing or malformed one raises SchemaError naming the file."""
    try:
        raw = read_bytes(url)
    except FileNotFoundError:
        raise SchemaError(url, "file not found (write it with `spine-ray clean-labels RUN_DIR`)") from None
    try:
        df = pd.read_parquet(io.BytesIO(raw))
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a file that is not Parquet
        raise SchemaError(url, f"not a readable Parquet table ({str(e).splitlines()[0]})") from None
    missing = [c for c in ("study_id", "target", "flagged") if c not in df.columns]
    if missing:
        raise SchemaError(url, f"missing columns {missing} (expected {list(FLAG_COLUMNS)})")
    unknown = ~df["target"].isin(LABEL_COLUMNS)
    if unknown.any():
        raise SchemaError(url, f"unknown target {df['target'][unknown].iloc[0]!r} (expected a train.csv label column)")
    if df["flagged"].dtype != bool or not pd.api.types.is_integer_dtype(df["study_id"]):
        raise SchemaError(url, f"flagged must be bool and study_id integer, got {df['flagged'].dtype} and {df['study_id'].dtype}")
    return df


def excluded_targets(url: str) -> pd.DataFrame:
    """The flagged (study_id, target) pairs of a flags table: the labels training must not see."""
    df = read_flags(url)
    return df.loc[df["flagged"], ["study_id", "target"]].drop_duplicates().reset_index(drop=True)
