"""Storage helpers against a real S3-compatible server on loopback."""

from __future__ import annotations

import os

import numpy as np
import pytest

from spine_ray.core.schema import label_matrix, labels_from_matrix, read_labels
from spine_ray.core.storage import (
    DirectFile,
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
    from spine_ray.core.storage import absolute
    from spine_ray.pipeline import resolved
    from spine_ray.run_config import PipelineConfig

    monkeypatch.chdir(tmp_path)
    assert absolute("runs/x") == str(tmp_path / "runs" / "x")
    assert absolute("s3://bucket/runs/x") == "s3://bucket/runs/x"
    cfg = resolved(PipelineConfig(prepared="p", run_dir="s3://b/run"))
    assert cfg.prepared == str(tmp_path / "p") and cfg.run_dir == "s3://b/run"


def test_a_streamed_shard_can_start_its_write_back(tmp_path, monkeypatch):
    """write_back=True without O_DIRECT hands the finished temporary file to the kernel (DONTNEED) before it is published."""
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
    size = atomic_write_parquet_stream(url, schema, [pa.table({"x": [4, 5]}, schema=schema)], write_back=True, direct=False)
    assert [a for _, a in advised] == [os.POSIX_FADV_DONTNEED] and advised[0][0].startswith(".part.parquet.tmp-")
    assert size == os.path.getsize(url) and pq.read_table(url)["x"].to_pylist() == [4, 5]


def _needs_o_direct(path) -> None:
    f = DirectFile.open(str(path / "probe"))
    if f is None:
        pytest.skip("this platform or filesystem refuses O_DIRECT")
    f.close()


def _big_table(rows: int = 200_000):
    import pyarrow as pa

    rng = np.random.default_rng(0)
    return pa.table({"x": rng.integers(0, 1 << 40, rows), "y": rng.random(rows)})


def test_a_direct_file_holds_exactly_what_was_written(tmp_path):
    """Small buffers make many full blocks, a hand-off to the writer thread each, and an unaligned tail."""
    _needs_o_direct(tmp_path)
    data = np.random.default_rng(1).integers(0, 256, 5 * 65536 + 1234, dtype=np.uint8).tobytes()
    f = DirectFile.open(str(tmp_path / "a.bin"), buffer_bytes=65536)
    with f:
        for i in range(0, len(data), 9999):  # writes that straddle the buffers
            assert f.write(data[i:i + 9999]) == len(data[i:i + 9999])
        assert f.tell() == len(data)
    assert f.direct and (tmp_path / "a.bin").read_bytes() == data
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_direct_shard_is_byte_identical_to_a_page_cache_shard(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    _needs_o_direct(tmp_path)
    monkeypatch.setattr(DirectFile, "BUFFER_BYTES", 65536)
    table = _big_table()
    opened = []
    real = DirectFile.open.__func__

    def spy(cls, path, buffer_bytes=65536):
        f = real(cls, path, buffer_bytes)
        opened.append(f)
        return f

    monkeypatch.setattr(DirectFile, "open", classmethod(spy))
    direct = atomic_write_parquet_stream(str(tmp_path / "d.parquet"), table.schema, [table], write_back=True, compression="none")
    assert len(opened) == 1 and opened[0].direct
    cached = atomic_write_parquet_stream(str(tmp_path / "c.parquet"), table.schema, [table], write_back=True, direct=False, compression="none")
    assert len(opened) == 1  # direct=False never opens a DirectFile
    assert direct == cached > 65536 * 5
    assert (tmp_path / "d.parquet").read_bytes() == (tmp_path / "c.parquet").read_bytes()
    assert pq.read_table(tmp_path / "d.parquet").equals(table)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.parquet", "d.parquet", "probe"]  # no temporaries


def test_a_filesystem_that_refuses_o_direct_at_open_gets_the_page_cache(tmp_path, monkeypatch):
    """O_DIRECT refused at open (EINVAL: tmpfs on older kernels, some FUSE mounts): buffered write, then DONTNEED."""
    import errno

    import pyarrow.parquet as pq

    real_open, advised = os.open, []

    def refuse(path, flags, mode=0o777, **kw):
        if flags & getattr(os, "O_DIRECT", 0):
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode, **kw)

    monkeypatch.setattr(os, "open", refuse)
    if hasattr(os, "posix_fadvise"):
        real_advise = os.posix_fadvise
        monkeypatch.setattr(os, "posix_fadvise", lambda fd, o, n, a: (advised.append(a), real_advise(fd, o, n, a)))
    table = _big_table(1000)
    assert DirectFile.open(str(tmp_path / "x")) is None
    size = atomic_write_parquet_stream(str(tmp_path / "p.parquet"), table.schema, [table], write_back=True)
    assert size == (tmp_path / "p.parquet").stat().st_size and pq.read_table(tmp_path / "p.parquet").equals(table)
    if hasattr(os, "posix_fadvise"):
        assert advised == [os.POSIX_FADV_DONTNEED]


def test_a_write_refused_under_o_direct_is_rewritten_through_the_page_cache(tmp_path, monkeypatch):
    """A filesystem that opens with O_DIRECT but refuses the aligned write (EINVAL): the file drops O_DIRECT, same bytes."""
    import errno
    import fcntl

    _needs_o_direct(tmp_path)
    real = os.pwrite

    def refuse_direct(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", refuse_direct)
    data = bytes(range(256)) * 1000 + b"tail"
    f = DirectFile.open(str(tmp_path / "b.bin"), buffer_bytes=65536)
    with f:
        f.write(data)
    assert not f.direct and (tmp_path / "b.bin").read_bytes() == data


def test_a_full_disk_in_the_writer_thread_fails_the_shard_and_leaves_nothing(tmp_path, monkeypatch):
    import errno

    _needs_o_direct(tmp_path)
    monkeypatch.setattr(DirectFile, "BUFFER_BYTES", 65536)
    calls = []

    def full(fd, data, offset):
        calls.append(offset)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    table = _big_table()
    with pytest.raises(OSError, match="No space left"):
        atomic_write_parquet_stream(str(tmp_path / "out" / "p.parquet"), table.schema, [table], write_back=True)
    assert calls and list((tmp_path / "out").iterdir()) == []
