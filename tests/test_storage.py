"""Storage helpers against a real S3-compatible server on loopback."""

from __future__ import annotations

import os

import numpy as np
import pytest

from spine_ray.schema import label_matrix, labels_from_matrix, read_labels
from spine_ray.storage import (
    StorageError,
    atomic_write_bytes,
    atomic_write_parquet,
    atomic_write_parquet_stream,
    exists,
    listdir,
    read_bytes,
    read_parquet,
    with_retries,
)


def test_s3_round_trip_of_a_label_table(s3_bucket):
    import fsspec

    url = f"{s3_bucket}/data/train.csv"
    df = labels_from_matrix([1, 2], np.ones((2, 25), dtype=np.int8))
    atomic_write_bytes(url, df.to_csv(index=False).encode())
    assert exists(url) and listdir(f"{s3_bucket}/data") == ["train.csv"]
    assert (label_matrix(read_labels(url)) == 1).all()
    fsspec.filesystem("s3").invalidate_cache()
    assert read_bytes(url).startswith(b"study_id,")


def test_parquet_tables_round_trip_on_s3_without_their_index(s3_bucket):
    import pandas as pd

    url = f"{s3_bucket}/run/folds.parquet"
    df = pd.DataFrame({"study_id": [3, 1], "fold": [0, 1]}, index=[7, 9])
    atomic_write_parquet(url, df)
    pd.testing.assert_frame_equal(read_parquet(url), df.reset_index(drop=True))


def test_local_atomic_write_leaves_no_temporary(tmp_path):
    atomic_write_bytes(str(tmp_path / "a" / "b.txt"), b"x")
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.txt"]


def test_arrow_tables_keep_their_schema_and_codec(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("study_id", pa.int64()), ("reason", pa.string())])
    url = str(tmp_path / "errors.parquet")
    atomic_write_parquet(url, pa.Table.from_pylist([], schema=schema), compression="zstd")  # empty: types from the schema
    assert pq.read_schema(url).remove_metadata() == schema
    assert pq.ParquetFile(url).metadata.row_group(0).column(0).compression == "ZSTD"


def test_streamed_parquet_appears_whole_or_not_at_all(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("x", pa.int64())])
    url = str(tmp_path / "out" / "part.parquet")

    def tables(fail: bool):
        yield pa.table({"x": [1, 2]}, schema=schema)
        if fail:
            raise RuntimeError("decode failed mid-shard")
        yield pa.table({"x": [3]}, schema=schema)

    with pytest.raises(RuntimeError, match="mid-shard"):
        atomic_write_parquet_stream(url, schema, tables(fail=True))
    assert list((tmp_path / "out").iterdir()) == []  # no shard, no temporary
    size = atomic_write_parquet_stream(url, schema, tables(fail=False), compression="none")
    assert size == (tmp_path / "out" / "part.parquet").stat().st_size
    assert pq.read_table(url)["x"].to_pylist() == [1, 2, 3]


def test_retries_transient_errors_then_names_the_object():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset")
        return 42

    assert with_retries(flaky, "read s3://b/k", retries=3) == 42 and len(calls) == 3

    def broken():
        raise TimeoutError("timed out")

    with pytest.raises(StorageError, match="read s3://b/x: failed after 2 attempts"):
        with_retries(broken, "read s3://b/x", retries=1)

    def missing():
        raise FileNotFoundError("nope")

    with pytest.raises(FileNotFoundError):
        with_retries(missing, "read s3://b/y")


def test_local_paths_are_made_absolute_urls_are_not(tmp_path, monkeypatch):
    from spine_ray.pipeline import PipelineConfig, resolved
    from spine_ray.storage import absolute

    monkeypatch.chdir(tmp_path)
    assert absolute("runs/x") == str(tmp_path / "runs" / "x")
    assert absolute("s3://bucket/runs/x") == "s3://bucket/runs/x"
    cfg = resolved(PipelineConfig(prepared="p", run_dir="s3://b/run"))
    assert cfg.prepared == str(tmp_path / "p") and cfg.run_dir == "s3://b/run"


def test_a_streamed_shard_can_start_its_write_back(tmp_path, monkeypatch):
    """write_back=True hands the finished temporary file to the kernel (DONTNEED) before it is published."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise on this platform")
    advised = []
    real = os.posix_fadvise

    def record(fd, offset, length, advice):
        advised.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), advice))
        return real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    schema = pa.schema([("x", pa.int64())])
    url = str(tmp_path / "part.parquet")
    atomic_write_parquet_stream(url, schema, [pa.table({"x": [1, 2, 3]}, schema=schema)])
    assert advised == []  # off by default
    size = atomic_write_parquet_stream(url, schema, [pa.table({"x": [4, 5]}, schema=schema)], write_back=True)
    assert [a for _, a in advised] == [os.POSIX_FADV_DONTNEED] and advised[0][0].startswith(".part.parquet.tmp-")
    assert size == os.path.getsize(url) and pq.read_table(url)["x"].to_pylist() == [4, 5]
