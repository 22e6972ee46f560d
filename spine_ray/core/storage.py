"""Paths as fsspec URLs: local paths, s3://, gs://, memory://. Atomic writes and retried reads.

A finished output must never be confused with a half-written one: every file is written to a
temporary name (local) or in one PUT (object stores, where an object appears only when complete),
and transient object-store errors are retried with exponential backoff.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import logging
import mmap
import os
import posixpath
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import fsspec
from fsspec.core import url_to_fs

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRIES = 5
BACKOFF_S = float(os.environ.get("SPINE_RAY_BACKOFF_S", "0.2"))


class StorageError(OSError):
    """An object-store operation failed after its retries; says which object and why."""


def _transient(e: BaseException) -> bool:
    if isinstance(e, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError):
        return False
    text = f"{type(e).__name__} {e}".lower()
    return isinstance(e, OSError | TimeoutError | ConnectionError) or any(
        k in text for k in ("timeout", "throttl", "slowdown", "503", "500", "connection", "reset")
    )


def with_retries(fn: Callable[[], T], what: str, retries: int = RETRIES) -> T:
    """Call fn, retrying transient errors with exponential backoff; name `what` on final failure."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - classified below
            if not _transient(e):
                raise
            if attempt == retries:
                raise StorageError(f"{what}: failed after {retries + 1} attempts: {e}") from e
            delay = BACKOFF_S * 2**attempt
            log.warning("%s: %s; retrying in %.1fs", what, e, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def fs_for(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for a URL or local path."""
    return url_to_fs(url)


def is_local(url: str) -> bool:
    """True for plain paths and file:// URLs."""
    return "://" not in url or url.startswith("file://")


def absolute(url: str) -> str:
    """Local paths made absolute (Ray Tune runs trials in their own working directories); URLs as they are."""
    if url and is_local(url) and not url.startswith("file://"):
        return os.path.abspath(url)
    return url


def join(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URL."""
    if is_local(base):
        return os.path.join(base, *parts)
    return posixpath.join(base, *parts)


def exists(url: str) -> bool:
    """Whether a file or directory exists at url."""
    fs, path = fs_for(url)
    return with_retries(lambda: fs.exists(path), f"exists {url}")


def read_bytes(url: str) -> bytes:
    """Read a whole file."""
    fs, path = fs_for(url)
    return with_retries(lambda: fs.cat_file(path), f"read {url}")


def read_text(url: str) -> str:
    """Read a whole text file as UTF-8."""
    return read_bytes(url).decode("utf-8")


def makedirs(url: str) -> None:
    """Create a directory (no-op on object stores)."""
    fs, path = fs_for(url)
    if is_local(url):
        fs.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def _replaced_when_done(path: str) -> Iterator[str]:
    """A temporary file beside local `path` that replaces it only if the block completes."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(url: str, data: bytes) -> None:
    """Write a file so that readers see either the old file, nothing, or the whole new one."""
    fs, path = fs_for(url)
    if is_local(url):
        with _replaced_when_done(path) as tmp, open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return
    # Object stores publish an object only when its upload completes.
    with_retries(lambda: fs.pipe_file(path, data), f"write {url}")


def atomic_write_text(url: str, text: str) -> None:
    """Atomically write UTF-8 text."""
    atomic_write_bytes(url, text.encode("utf-8"))


def read_parquet(url: str) -> pd.DataFrame:
    """A whole Parquet table from a path or URL."""
    import pandas as pd

    return pd.read_parquet(io.BytesIO(read_bytes(url)))


def atomic_write_parquet(url: str, table: pd.DataFrame | pa.Table, compression: str = "snappy") -> None:
    """Atomically write a DataFrame (no index) or an Arrow table (its schema kept) as Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=compression)
    atomic_write_bytes(url, sink.getvalue().to_pybytes())


def _start_writeback(path: str) -> None:
    """Ask the kernel to write a finished local file to disk now and drop it from the page cache.

    For files of hundreds of MB written once and read much later (the volumes shards). Without this they
    pile up as dirty pages until the kernel throttles every writer at once; with it the disk works
    while the next shard decodes (docs/BENCHMARKS.md, Ingest). Only a hint: no-op where unsupported.
    """
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class DirectFile(io.RawIOBase):
    """A local file written with O_DIRECT: from page-aligned buffers straight to the disk, no page cache.

    For the volumes shards, gigabytes written once and read much later: through the page cache each
    byte is copied into cache pages the kernel must allocate, clear and later write back, which cost
    more CPU than the disk itself on the machines measured (docs/BENCHMARKS.md, Ingest). Two buffers
    of `buffer_bytes` alternate: the caller fills one while one writer thread writes the other, so the
    disk works while the next series decodes. The tail is padded to the block size, written, and the
    file truncated to its real length. Buffers are kept for the process's next file (a decode worker
    writes many). A filesystem that refuses O_DIRECT at open gets None from `open`; one that refuses a
    write (EINVAL) has O_DIRECT dropped on the file and the block rewritten through the page cache
    (`direct` then reads False). Errors of the writer thread (a full disk) are raised by the next
    `write` or by `close`.
    """

    ALIGN = 4096
    BUFFER_BYTES = 8 << 20
    _spare: list[mmap.mmap] = []  # buffers of BUFFER_BYTES, reused by this process's next file
    _spare_lock = threading.Lock()

    def __init__(self, fd: int, buffer_bytes: int = BUFFER_BYTES) -> None:
        super().__init__()
        if buffer_bytes % self.ALIGN:
            raise ValueError(f"buffer_bytes must be a multiple of {self.ALIGN}, got {buffer_bytes}")
        self._fd = fd
        self._size = buffer_bytes
        self._bufs = [self._take(), self._take()]
        self._fill = 0  # bytes in the current buffer, self._bufs[0]
        self._offset = 0  # file offset of the current buffer
        self._pending: threading.Thread | None = None
        self._error: BaseException | None = None
        self.direct = True

    @classmethod
    def open(cls, path: str, buffer_bytes: int = BUFFER_BYTES) -> DirectFile | None:
        """A new (truncated) file at path written with O_DIRECT, or None where the platform or filesystem refuses it."""
        if not hasattr(os, "O_DIRECT"):
            return None
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o666)
        except OSError as e:
            if e.errno == errno.EINVAL:
                return None
            raise
        return cls(fd, buffer_bytes)

    def _take(self) -> mmap.mmap:
        with self._spare_lock:
            for i, buf in enumerate(self._spare):
                if len(buf) == self._size:
                    return self._spare.pop(i)
        return mmap.mmap(-1, self._size)  # anonymous maps are page-aligned

    def _pwrite(self, buf: mmap.mmap, length: int, offset: int) -> None:
        view = memoryview(buf)[:length]
        try:
            try:
                done = os.pwrite(self._fd, view, offset)
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct:
                    raise
                # The filesystem opened the file for O_DIRECT but refuses this write: go through the page cache.
                fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
                self.direct = False
                done = os.pwrite(self._fd, view, offset)
            while done < length:  # short writes: only at the end of a device
                done += os.pwrite(self._fd, view[done:], offset + done)
        finally:
            view.release()

    def _background(self, buf: mmap.mmap, length: int, offset: int) -> None:
        try:
            self._pwrite(buf, length, offset)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread by _wait
            self._error = e

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._error is not None:
            raise self._error

    def _flush_full(self) -> None:
        """Hand the full current buffer to the writer thread and continue in the other one."""
        self._wait()  # the other buffer's write has finished: it is free
        buf = self._bufs[0]
        self._pending = threading.Thread(target=self._background, args=(buf, self._size, self._offset), daemon=True)
        self._pending.start()
        self._bufs.reverse()
        self._offset += self._size
        self._fill = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._offset + self._fill

    def write(self, b: Any) -> int:
        if self.closed:
            raise ValueError("write to a closed DirectFile")
        data = memoryview(b).cast("B")
        pos = 0
        while pos < len(data):
            n = min(len(data) - pos, self._size - self._fill)
            self._bufs[0][self._fill:self._fill + n] = data[pos:pos + n]
            self._fill += n
            pos += n
            if self._fill == self._size:
                self._flush_full()
        return len(data)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._wait()
            if self._fill:
                padded = -(-self._fill // self.ALIGN) * self.ALIGN
                self._bufs[0][self._fill:padded] = bytes(padded - self._fill)
                self._pwrite(self._bufs[0], padded, self._offset)
                os.ftruncate(self._fd, self._offset + self._fill)
        finally:
            if self._pending is not None:  # an error above: let the writer finish before its buffer is reused
                self._pending.join()
            os.close(self._fd)
            with self._spare_lock:
                self._spare[:] = (self._spare + self._bufs)[-2:]
            self._bufs = []
            super().close()


def atomic_write_parquet_stream(
    url: str,
    schema: pa.Schema,
    tables: Iterable[pa.Table],
    write_back: bool = False,
    direct: bool = True,
    **options: Any,
) -> int:
    """Stream Arrow tables into one Parquet file that appears only when complete; returns its size in bytes.

    For outputs too large to hold as one buffer (the volumes shards); `options` go to `pq.ParquetWriter`.
    write_back: a local file goes to disk as it is written and stays out of the page cache: with O_DIRECT
    (`DirectFile`) when `direct` and the filesystem allows it, else through the page cache with its
    write-back started at once when the file is complete (`_start_writeback`).
    """
    fs, path = fs_for(url)
    if is_local(url):
        with _replaced_when_done(path) as tmp:
            sink = DirectFile.open(tmp) if write_back and direct else None
            with sink or contextlib.nullcontext():  # closed after the writer: its last block goes to disk
                _write_tables(sink or tmp, schema, tables, options)
            if write_back and sink is None:
                _start_writeback(tmp)
            size = os.path.getsize(tmp)
        return size
    # Object stores: a multipart upload becomes visible only when the writer closes successfully.
    with fs.open(path, "wb") as f:
        _write_tables(f, schema, tables, options)
    return int(with_retries(lambda: fs.info(path)["size"], f"size of {url}"))


def _write_tables(where: Any, schema: pa.Schema, tables: Iterable[pa.Table], options: dict[str, Any]) -> None:
    """Write `tables` as one Parquet file to `where` (a local path or an open binary file, left open)."""
    import pyarrow.parquet as pq

    with pq.ParquetWriter(where, schema, **options) as w:
        for t in tables:
            w.write_table(t)


def remove(url: str, recursive: bool = False) -> None:
    """Remove a file or directory if it exists."""
    fs, path = fs_for(url)
    if with_retries(lambda: fs.exists(path), f"exists {url}"):
        with_retries(lambda: fs.rm(path, recursive=recursive), f"remove {url}")


def listdir(url: str) -> list[str]:
    """Names (not paths) of the entries directly under a directory; [] if it does not exist."""
    fs, path = fs_for(url)
    if not with_retries(lambda: fs.exists(path), f"exists {url}"):
        return []
    entries = with_retries(lambda: fs.ls(path, detail=False), f"list {url}")
    return sorted(posixpath.basename(e.rstrip("/")) for e in entries)
