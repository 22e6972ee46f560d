"""Samples built once, shared by every fold: a cache of Parquet shards per (data, stage config, split).

A stage's samples (stored crops, resampled stacks) cost most of its CPU time and bytes. Every
study is a training study in K−1 folds and the validation study of one, so building samples per
fold builds each one K times and holds K copies. Here each split kind is built once over all
studies of the run:

- `train` samples (label points) for every study; a fold reads those of its training studies;
- `val` samples (stage-1 out-of-fold points, what inference sees) for every study; a fold reads
  those of its held-out studies.

Layout of one cache (`{root}/{stage}-{split}-{key}/`, local or `s3://`):

    part-00000.parquet …   the samples of a chunk of studies, one row group per study, in study order
    manifest.json          written last: key, what made it, per part its studies and their sample counts

The key is a hash of what made the samples: the stage's `sample_key` (config fields that shape a
sample, and the names of the input tables it reads), the prepared data's manifest and the content of
those input tables. A changed config or new stage-1 points give a new key, hence a new cache;
re-runs and other members with the same key reuse it. Building is resumable: parts are written
atomically and a re-run builds only the missing ones; the manifest marks a finished cache.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from concurrent.futures import Executor
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from spine_ray.core.storage import (
    atomic_write_bytes,
    atomic_write_text,
    exists,
    fs_for,
    join,
    read_bytes,
    read_parquet,
    read_text,
)
from spine_ray.engine.stage import FoldJob, Stage

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SPLITS = ("train", "val")


def split_studies(job: FoldJob, split: str) -> list[int]:
    """Study ids of a fold's `train` (other folds) or `val` (this fold) split; `all` for every study."""
    folds = read_parquet(join(job.run_dir, "folds.parquet"))
    held = folds["fold"] == job.fold
    chosen = folds if split == "all" else folds.loc[held if split == "val" else ~held]
    return sorted(chosen["study_id"].astype(int).tolist())


def source_rows(stage: Stage, job: FoldJob, studies: list[int]) -> pd.DataFrame:
    """The stage's source rows of some studies (a filtered Parquet read)."""
    fs, path = fs_for(stage.source(job))
    return pd.read_parquet(path, filesystem=fs, filters=[("study_id", "in", studies)])


def samples(stage: Stage, job: FoldJob, split: str) -> pd.DataFrame:
    """A fold's samples of a split: from its sample cache when the job has one, else built in-process."""
    studies = split_studies(job, split)
    if cache_input(split) in job.inputs:
        return read_cache(job.inputs[cache_input(split)], studies)
    return stage.to_samples(job, split, source_rows(stage, job, studies))


def cache_input(split: str) -> str:
    """The `FoldJob.inputs` name under which a split's cache URL travels."""
    return f"samples:{split}"


def _digest(url: str) -> str:
    return hashlib.sha256(read_bytes(url)).hexdigest()


def cache_key(stage: Stage, job: FoldJob, split: str) -> tuple[str, dict[str, Any]]:
    """(hex key, what it hashes) of a split's samples for this job's stage config and inputs."""
    from spine_ray.data.volumes import MANIFEST as PREPARED_MANIFEST

    made_by = stage.sample_key(job, split)
    made_by = {
        "stage": job.stage, "split": split, **made_by,
        "prepared": _digest(join(job.prepared, PREPARED_MANIFEST)),
        "input_digests": {name: _digest(job.inputs[name]) for name in made_by.get("inputs", ()) if name in job.inputs},
    }
    text = json.dumps(made_by, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20], made_by


def cache_url(root: str, stage: Stage, job: FoldJob, split: str) -> str:
    """Where a split's cache for this job lives under `root`."""
    key, _ = cache_key(stage, job, split)
    return join(root, f"{job.stage}-{split}-{key}")


def chunks(studies: list[int], size: int) -> list[list[int]]:
    """Studies in fixed chunks: part i always holds the same studies, so a re-run can skip it."""
    return [studies[i : i + size] for i in range(0, len(studies), size)]


def build_part(stage: Stage, job: FoldJob, split: str, studies: list[int], url: str) -> dict[str, int]:
    """Build one part's samples and write it; returns study → samples."""
    return write_part(stage.to_samples(job, split, source_rows(stage, job, studies)), studies, url)


def write_part(df: pd.DataFrame, studies: list[int], url: str) -> dict[str, int]:
    """Write one part's samples atomically, one row group per study in the given order; returns study → samples."""
    counts = {str(s): 0 for s in studies}
    buf = io.BytesIO()
    table = pa.Table.from_pandas(df, preserve_index=False)
    with pq.ParquetWriter(buf, table.schema, compression="none") as writer:
        for study in studies:
            rows = table.filter(pc.equal(table["study_id"], study)) if len(df) else table
            counts[str(study)] = rows.num_rows if len(df) else 0
            if rows.num_rows:
                writer.write_table(rows)
        if table.num_rows == 0:
            writer.write_table(table)
    atomic_write_bytes(url, buf.getvalue())
    return counts


def write_manifest(url: str, key: str, made_by: dict[str, Any], names: list[str], counts: list[dict[str, int]], built: int, build_s: float) -> dict[str, Any]:
    """Finish a cache: its manifest, written last (a cache without one is unfinished)."""
    manifest = {
        "key": key, "made_by": made_by, "built_parts": built, "reused_parts": len(names) - built, "build_s": round(build_s, 3),
        "samples": sum(sum(c.values()) for c in counts),
        "parts": [{"file": n, "studies": c} for n, c in zip(names, counts, strict=True)],
    }
    atomic_write_text(join(url, MANIFEST), json.dumps(manifest, indent=1))
    return manifest


def _part_counts(url: str) -> dict[str, int]:
    ids = pq.read_table(io.BytesIO(read_bytes(url)), columns=["study_id"])["study_id"].to_pylist()
    out: dict[str, int] = {}
    for s in ids:
        out[str(s)] = out.get(str(s), 0) + 1
    return out


def ensure_cache(
    stage: Stage, job: FoldJob, split: str, root: str, chunk: int = 8, parallel: bool = True, pool: Executor | None = None,
) -> tuple[str, dict[str, Any]]:
    """The finished cache of a split (built now if missing, resumed if partial); returns (url, manifest).

    With `parallel`, parts are built by Ray tasks (one CPU each); else by `pool` where given (e.g. a
    process pool on a machine without Ray); otherwise in this process.
    """
    url = cache_url(root, stage, job, split)
    if exists(join(url, MANIFEST)):
        return url, json.loads(read_text(join(url, MANIFEST)))
    key, made_by = cache_key(stage, job, split)
    studies = split_studies(job, "all")
    parts = chunks(studies, chunk)
    names = [f"part-{i:05d}.parquet" for i in range(len(parts))]
    counts: dict[int, dict[str, int]] = {}
    todo = []
    for i, name in enumerate(names):
        if exists(join(url, name)):
            counts[i] = {str(s): 0 for s in parts[i]} | _part_counts(join(url, name))
        else:
            todo.append(i)
    t0 = time.perf_counter()
    if todo and parallel:
        import ray

        build = ray.remote(num_cpus=1)(build_part)
        refs = {i: build.remote(stage, job, split, parts[i], join(url, names[i])) for i in todo}
        counts.update({i: ray.get(r) for i, r in refs.items()})
    elif todo and pool is not None:
        futures = {i: pool.submit(build_part, stage, job, split, parts[i], join(url, names[i])) for i in todo}
        counts.update({i: f.result() for i, f in futures.items()})
    else:
        for i in todo:
            counts[i] = build_part(stage, job, split, parts[i], join(url, names[i]))
    manifest = write_manifest(url, key, made_by, names, [counts[i] for i in range(len(parts))], len(todo), time.perf_counter() - t0)
    log.info("%s: %d samples in %d parts (%d built)", url, manifest["samples"], len(parts), len(todo))
    return url, manifest


def read_manifest(url: str) -> dict[str, Any]:
    """A finished cache's manifest."""
    return json.loads(read_text(join(url, MANIFEST)))


def count_samples(url: str, studies: list[int], manifest: dict[str, Any] | None = None) -> int:
    """How many samples some studies have in a cache (from its manifest; no data read)."""
    manifest = manifest or read_manifest(url)
    wanted = {str(s) for s in studies}
    return sum(n for p in manifest["parts"] for s, n in p["studies"].items() if s in wanted)


def read_cache(url: str, studies: list[int], manifest: dict[str, Any] | None = None) -> pd.DataFrame:
    """The samples of some studies, in the given study order: only the parts (and row groups) that hold them are read."""
    manifest = manifest or read_manifest(url)
    wanted = {str(s) for s in studies}
    fs, root = fs_for(url)
    frames = []
    for p in manifest["parts"]:
        mine = [int(s) for s, n in p["studies"].items() if s in wanted and n]
        if mine:
            frames.append(pd.read_parquet(f"{root.rstrip('/')}/{p['file']}", filesystem=fs, filters=[("study_id", "in", mine)]))
    if not frames:
        first = manifest["parts"][0]["file"]
        return pd.read_parquet(f"{root.rstrip('/')}/{first}", filesystem=fs).iloc[:0]
    df = pd.concat(frames, ignore_index=True)
    order = {s: i for i, s in enumerate(studies)}
    return df.iloc[df["study_id"].map(order).argsort(kind="stable")].reset_index(drop=True)


def with_caches(stage: Stage, jobs: list[FoldJob], root: str, parallel: bool = True) -> list[FoldJob]:
    """The jobs with their sample caches built (once per distinct key) and named in their inputs.

    A job that `needs` other folds reads their outputs, which do not exist yet: its validation
    samples, when they read inputs, are built by the fold itself once its needs are done (its
    held-out studies only, so nothing is built twice). Its training samples must not read them.
    """
    import dataclasses

    done: dict[str, str] = {}
    out = []
    for job in jobs:
        inputs = dict(job.inputs)
        for split in SPLITS:
            if split == "val" and job.needs and stage.sample_key(job, split).get("inputs"):
                continue
            key_url = cache_url(root, stage, job, split)
            if key_url not in done:
                done[key_url] = ensure_cache(stage, job, split, root, parallel=parallel)[0]
            inputs[cache_input(split)] = done[key_url]
        out.append(dataclasses.replace(job, inputs=inputs))
    return out
