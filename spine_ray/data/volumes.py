"""The prepared-volumes table: its Arrow schema, stack ↔ row conversion and the readers later stages use.

Pure (no Ray). Columns are documented in docs/tables.md. Readers refuse an output without
manifest.json: `prepare` writes it last, so its presence means every shard is complete.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from spine_ray.core.storage import exists, fs_for, join, read_text
from spine_ray.data.geometry import (
    Stack,  # not data.dicom: readers of the table need no DICOM libraries
)

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
VOLUMES_DIR = "volumes"
LABELS_FILE = "labels.parquet"
ERRORS_FILE = "errors.parquet"

VOLUME_SCHEMA = pa.schema(
    [
        ("study_id", pa.int64()),
        ("series_id", pa.int64()),
        ("series_description", pa.string()),
        ("stack", pa.int32()),
        ("n_slices", pa.int32()),
        ("rows", pa.int32()),
        ("cols", pa.int32()),
        ("volume", pa.large_binary()),
        ("dtype", pa.string()),
        ("instance_numbers", pa.list_(pa.int64())),
        ("positions", pa.list_(pa.list_(pa.float64()))),
        ("orientation", pa.list_(pa.float64())),
        ("pixel_spacing", pa.list_(pa.float64())),
        ("slice_spacing", pa.float64()),
        ("affine", pa.list_(pa.float64())),
        ("intensity_p01", pa.float64()),
        ("intensity_p99", pa.float64()),
    ]
)
META_COLUMNS: tuple[str, ...] = tuple(n for n in VOLUME_SCHEMA.names if n != "volume")
_META_SCHEMA = pa.schema([VOLUME_SCHEMA.field(n) for n in META_COLUMNS])

ERROR_SCHEMA = pa.schema(
    [("study_id", pa.int64()), ("series_id", pa.int64()), ("path", pa.string()), ("reason", pa.string())]
)


class IncompleteOutput(FileNotFoundError):
    """A prepare output without manifest.json: not finished (or not a prepare output at all)."""


def intensity_percentiles(volume: np.ndarray) -> tuple[float, float]:
    """1st and 99th percentile (inverted-CDF) of a 16-bit volume's every 2nd row and column, by histogram."""
    sample = volume[:, ::2, ::2].ravel()
    lo = int(sample.min())
    cum = np.cumsum(np.bincount(sample.astype(np.int32) - lo))
    p01, p99 = np.searchsorted(cum, [0.01 * cum[-1], 0.99 * cum[-1]])
    return float(p01 + lo), float(p99 + lo)


def stack_row(study_id: int, series_id: int, description: str, index: int, s: Stack) -> dict[str, Any]:
    """One volumes-table row for a decoded stack."""
    p01, p99 = intensity_percentiles(s.volume)
    return {
        "study_id": int(study_id),
        "series_id": int(series_id),
        "series_description": description,
        "stack": index,
        "n_slices": int(s.volume.shape[0]),
        "rows": s.rows,
        "cols": s.cols,
        "volume": np.ascontiguousarray(s.volume),  # rows_to_table wraps this memory; tobytes() would copy it
        "dtype": s.volume.dtype.name,
        "instance_numbers": [int(v) for v in s.instance_numbers],
        "positions": np.asarray(s.positions, dtype=np.float64).tolist(),
        "orientation": [float(v) for v in s.orientation],
        "pixel_spacing": [float(v) for v in s.pixel_spacing],
        "slice_spacing": float(s.slice_spacing),
        "affine": np.asarray(s.affine, dtype=np.float64).reshape(-1).tolist(),
        "intensity_p01": p01,
        "intensity_p99": p99,
    }


def _binary(volume: bytes | np.ndarray) -> pa.Array:
    """One large_binary value over the memory of `volume` (bytes or a C-contiguous array), not a copy of it."""
    data = pa.py_buffer(volume)
    offsets = pa.py_buffer(np.array([0, data.size], dtype=np.int64))
    return pa.Array.from_buffers(pa.large_binary(), 1, [None, offsets, data])


def rows_to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Volumes-table rows → an Arrow table with the declared schema.

    The pixels (the whole size of the table) become one chunk per row over the row's own memory:
    each copy of a volume costs as much CPU as the Parquet write of it.
    """
    meta = pa.Table.from_pylist([{k: r[k] for k in META_COLUMNS} for r in rows], schema=_META_SCHEMA)
    volume = pa.chunked_array([_binary(r["volume"]) for r in rows], type=pa.large_binary())
    return meta.add_column(VOLUME_SCHEMA.get_field_index("volume"), VOLUME_SCHEMA.field("volume"), volume)


def load_volume(row: dict[str, Any] | pd.Series) -> tuple[np.ndarray, dict[str, Any]]:
    """A volumes-table row → (volume [S, H, W] uint16/int16, metadata with numpy geometry)."""
    shape = (int(row["n_slices"]), int(row["rows"]), int(row["cols"]))
    vol = np.frombuffer(row["volume"], dtype=np.dtype(row["dtype"])).reshape(shape)
    meta = {k: row[k] for k in META_COLUMNS if k in row}
    meta["positions"] = np.array([list(p) for p in row["positions"]], dtype=np.float64).reshape(-1, 3)
    meta["affine"] = np.asarray(row["affine"], dtype=np.float64).reshape(4, 4)
    meta["orientation"] = tuple(float(v) for v in row["orientation"])
    meta["pixel_spacing"] = tuple(float(v) for v in row["pixel_spacing"])
    meta["instance_numbers"] = [int(v) for v in row["instance_numbers"]]
    return vol, meta


def read_manifest(out: str) -> dict[str, Any]:
    """The manifest of a finished prepare output; raises IncompleteOutput if there is none."""
    url = join(out, MANIFEST)
    if not exists(url):
        raise IncompleteOutput(f"{out}: no {MANIFEST}; not a finished `spine-ray prepare` output")
    manifest = json.loads(read_text(url))
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise IncompleteOutput(f"{url}: schema_version {manifest.get('schema_version')} != {SCHEMA_VERSION}")
    return manifest


def read_volumes(out: str, columns: list[str] | None = None, filters: Any = None) -> pd.DataFrame:
    """Read the volumes table of a finished output (pyarrow `filters`, e.g. [("study_id", "=", 7)])."""
    manifest = read_manifest(out)
    if not manifest["files"]["volumes"]:
        return VOLUME_SCHEMA.empty_table().select(columns or VOLUME_SCHEMA.names).to_pandas()
    fs, path = fs_for(join(out, VOLUMES_DIR))
    paths = [f"{path}/{name}" for name in manifest["files"]["volumes"]]
    table = pq.ParquetDataset(paths, filesystem=fs, filters=filters, schema=VOLUME_SCHEMA).read(columns=columns)
    return table.to_pandas()


def read_table(out: str, name: str) -> pd.DataFrame:
    """Read labels.parquet or errors.parquet of a finished output."""
    read_manifest(out)
    fs, path = fs_for(join(out, name))
    return pq.read_table(path, filesystem=fs).to_pandas()
