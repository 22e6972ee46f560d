"""`spine-ray prepare`: decode every series of a Kaggle-layout tree with Ray Data into Parquet volumes.

Plan → decode → finalise. The plan (written once to `OUT/_progress/plan.json`) lists every series
with its files and cuts the series list into groups of about `shard_mb` of pixels; a group is one
Ray Data task and one shard `volumes/part-{key}.parquet`, `key` a hash of the series it holds.
Each task writes its shard (atomically: local rename / one object-store upload), then its
errors, then a done marker. A re-run reuses the plan and skips groups with a marker, so an
interrupted job finishes without duplicating or losing a series. Finalising gathers errors,
builds labels.parquet (train split) and writes manifest.json last.

Tasks run over series, not files: a series is decoded where its files are read, so no shuffle
is needed to regroup slices.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from spine_ray.core.raycluster import init_ray
from spine_ray.core.schema import (
    SchemaError,
    labels_long,
    read_coordinates,
    read_labels,
    read_series,
    with_target,
)
from spine_ray.core.storage import (
    atomic_write_parquet,
    atomic_write_parquet_stream,
    atomic_write_text,
    exists,
    fs_for,
    join,
    listdir,
    read_text,
    remove,
    with_retries,
)
from spine_ray.data import dicom, geometry
from spine_ray.data.volumes import (
    ERROR_SCHEMA,
    ERRORS_FILE,
    LABELS_FILE,
    MANIFEST,
    SCHEMA_VERSION,
    VOLUME_SCHEMA,
    VOLUMES_DIR,
    rows_to_table,
    stack_row,
)

log = logging.getLogger(__name__)

PROGRESS_DIR = "_progress"
PLAN_FILE = "plan.json"
# RLE Lossless MR slices are ~2x smaller than their pixels; used only to size groups.
RLE_RATIO = 2.0
CODECS = ("none", "lz4", "snappy", "zstd")
# Object-store settings the decode tasks need; passed on so workers of an already-running local
# Ray see the same endpoint and credentials as the driver.
STORAGE_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE",
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
)


def _leaves(path: str, t: pa.DataType) -> list[str]:
    return _leaves(f"{path}.list.element", t.value_type) if pa.types.is_list(t) else [path]


@dataclass(frozen=True)
class VolumeCodec:
    """Parquet compression of the volumes' pixel column (the metadata columns are always zstd).

    Default "none": every codec costs more CPU per image than decoding its RLE (docs/BENCHMARKS.md,
    Ingest); zstd level 1 halves the shards for ~1.6x the CPU of decoding and writing without it.
    """

    name: str = "none"
    level: int | None = None

    def __post_init__(self) -> None:
        if self.name not in CODECS:
            raise ValueError(f"codec must be one of {', '.join(CODECS)}, got {self.name!r}")
        if self.level is not None and self.name != "zstd":
            raise ValueError(f"a codec level applies to zstd only, not {self.name!r}")

    def parquet_options(self) -> dict[str, Any]:
        """Keyword arguments for `pq.ParquetWriter` with `VOLUME_SCHEMA`."""
        # Per-column options name Parquet leaf columns; a list column's leaf is "name.list.element".
        meta = [leaf for f in VOLUME_SCHEMA if f.name != "volume" for leaf in _leaves(f.name, f.type)]
        options: dict[str, Any] = {
            "compression": {**dict.fromkeys(meta, "zstd"), "volume": self.name},
            # Dictionary encoding and min/max statistics of multi-megabyte pixel blobs are pure cost.
            "use_dictionary": meta,
            "write_statistics": meta,
        }
        if self.level is not None:
            options["compression_level"] = {"volume": self.level}
        return options

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for the manifest)."""
        return asdict(self)


@dataclass(frozen=True)
class Summary:
    """What one `prepare` produced."""

    out: str
    split: str
    series_listed: int
    series_decoded: int
    stacks: int
    images: int
    errors: int
    volume_bytes: int
    shards: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """Plain dict (for the manifest and JSON output)."""
        return asdict(self)


def _series_dir(images_root: str, study_id: int, series_id: int) -> str:
    return posixpath.join(images_root, str(study_id), str(series_id))


def list_images(data_dir: str, split: str, study_id: int | None = None) -> dict[tuple[int, int], list[tuple[str, int]]]:
    """Files under `{split}_images/{study}/{series}/` (one study, or all) as (fs path, size), keyed by (study, series)."""
    fs, images_root = fs_for(join(data_dir, f"{split}_images"))
    images_root = images_root.rstrip("/")
    root = images_root if study_id is None else f"{images_root}/{study_id}"
    if not with_retries(lambda: fs.exists(root), f"exists {root}"):
        return {}
    return _by_series(with_retries(lambda: fs.find(root, detail=True), f"list {root}"), images_root)


def _by_series(found: dict[str, dict], root: str) -> dict[tuple[int, int], list[tuple[str, int]]]:
    out: dict[tuple[int, int], list[tuple[str, int]]] = {}
    prefix = root.rstrip("/") + "/"
    for path, info in found.items():
        parts = path[len(prefix):].split("/") if path.startswith(prefix) else []
        if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit() or parts[2].startswith("."):
            continue
        out.setdefault((int(parts[0]), int(parts[1])), []).append((path, int(info.get("size") or 0)))
    return out


def group_key(series: list[tuple[int, int]]) -> str:
    """Deterministic name of a group of (study, series) pairs."""
    text = ";".join(f"{a}:{b}" for a, b in sorted(series))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def make_plan(data_dir: str, split: str, shard_mb: float) -> dict[str, Any]:
    """Series list + files → groups of ~shard_mb of pixels each, and the series missing on disk."""
    series = read_series(join(data_dir, f"{split}_series_descriptions.csv"))
    series = series.sort_values(["study_id", "series_id"]).reset_index(drop=True)
    files = list_images(data_dir, split)
    _, images_root = fs_for(join(data_dir, f"{split}_images"))
    target = shard_mb * 1e6
    groups: list[dict[str, Any]] = []
    missing: list[dict[str, Any]] = []
    current: list[dict[str, Any]] = []
    size = 0.0
    for r in series.itertuples(index=False):
        entry = files.get((int(r.study_id), int(r.series_id)))
        if not entry:
            missing.append(
                {"study_id": int(r.study_id), "series_id": int(r.series_id),
                 "path": _series_dir(images_root, r.study_id, r.series_id),
                 "reason": f"series listed in {split}_series_descriptions.csv but no files on disk"}
            )
            continue
        current.append(
            {"study_id": int(r.study_id), "series_id": int(r.series_id),
             "series_description": str(r.series_description), "files": sorted(p for p, _ in entry)}
        )
        size += sum(s for _, s in entry) * RLE_RATIO
        if size >= target:
            groups.append(current)
            current, size = [], 0.0
    if current:
        groups.append(current)
    return {
        "data_dir": data_dir,
        "split": split,
        "shard_mb": shard_mb,
        "series_listed": len(series),
        "groups": [{"key": group_key([(s["study_id"], s["series_id"]) for s in g]), "series": g} for g in groups],
        "missing": missing,
    }


def _fetch(fs: Any, paths: list[str]) -> list[tuple[str, bytes | Exception]]:
    if len(paths) == 0:
        return []
    got = with_retries(lambda: fs.cat(paths, on_error="return"), f"read {len(paths)} files")
    if not isinstance(got, dict):  # a single path comes back as bytes
        got = {paths[0]: got}
    return [(p, got.get(p, FileNotFoundError(p))) for p in paths]


def decode_one_series(
    fs: Any, study_id: int, series_id: int, description: str, files: list[str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Fetch and decode one series: (volumes-table rows, errors rows)."""
    sources: list[dicom.Source] = []
    errors: list[dict[str, Any]] = []
    for path, data in _fetch(fs, files):
        if isinstance(data, Exception):
            errors.append({"study_id": study_id, "series_id": series_id, "path": path, "reason": f"unreadable file ({type(data).__name__})"})
        else:
            sources.append((path, data))
    res = dicom.decode_series(sources)
    errors.extend({"study_id": study_id, "series_id": series_id, "path": p, "reason": r} for p, r in res.errors)
    if not res.stacks:
        errors.append({"study_id": study_id, "series_id": series_id, "path": posixpath.dirname(files[0]), "reason": "no usable image in series"})
    rows = [stack_row(study_id, series_id, description, i, st) for i, st in enumerate(res.stacks)]
    return rows, errors


def decode_group(
    group: dict[str, Any], data_dir: str, out: str, codec: VolumeCodec = VolumeCodec(), direct_io: bool = True
) -> dict[str, int]:
    """Decode one group of series and write its shard, errors and done marker; returns counts.

    A group whose done marker exists (a retried task that had finished it) is not decoded again.
    direct_io: a local shard is written with O_DIRECT, past the page cache (`storage.DirectFile`);
    False writes it through the page cache (same bytes).
    """
    marker = join(out, PROGRESS_DIR, f"done-{group['key']}.json")
    if exists(marker):
        return json.loads(read_text(marker))
    fs, _ = fs_for(data_dir)
    errors: list[dict[str, Any]] = []
    counts = {"series": len(group["series"]), "series_decoded": 0, "stacks": 0, "images": 0}

    def tables() -> Iterator[pa.Table]:
        for s in group["series"]:
            rows, errs = decode_one_series(fs, s["study_id"], s["series_id"], s["series_description"], s["files"])
            errors.extend(errs)
            if rows:
                counts["series_decoded"] += 1
                counts["stacks"] += len(rows)
                counts["images"] += sum(r["n_slices"] for r in rows)
                yield rows_to_table(rows)

    shard = join(out, VOLUMES_DIR, f"part-{group['key']}.parquet")
    counts["bytes"] = atomic_write_parquet_stream(
        shard, VOLUME_SCHEMA, tables(), write_back=True, direct=direct_io, **codec.parquet_options()
    )
    if counts["stacks"] == 0:  # an empty shard is noise; leave none
        remove(shard)
        counts["bytes"] = 0
    counts["errors"] = len(errors)
    atomic_write_parquet(join(out, PROGRESS_DIR, f"errors-{group['key']}.parquet"), pa.Table.from_pylist(errors, schema=ERROR_SCHEMA))
    atomic_write_text(marker, json.dumps(counts))
    return counts


def decode_study(
    data_dir: str, split: str, study_id: int, descriptions: dict[int, str] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One study decoded in this process (no Ray): (volumes rows as `read_volumes` returns them, errors).

    For inference and demos on a single study. Series descriptions by series id: `descriptions`
    when the caller has them (inference reads the series CSV once, not once per study), else the
    series CSV when present.
    """
    desc: dict[int, str] = dict(descriptions or {})
    csv = join(data_dir, f"{split}_series_descriptions.csv")
    if descriptions is None and exists(csv):
        listed = read_series(csv)
        mine = listed[listed["study_id"] == study_id]
        desc = dict(zip(mine["series_id"], mine["series_description"], strict=True))
    fs, _ = fs_for(data_dir)
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for (sid, rid), entry in sorted(list_images(data_dir, split, study_id).items()):
        r, e = decode_one_series(fs, sid, rid, desc.get(rid, ""), sorted(p for p, _ in entry))
        rows += r
        errors += e
    return rows_to_table(rows).to_pandas(), pa.Table.from_pylist(errors, schema=ERROR_SCHEMA).to_pandas()


def _decode_batch(
    batch: dict[str, np.ndarray], data_dir: str, out: str, codec: VolumeCodec, direct_io: bool
) -> dict[str, np.ndarray]:
    """Ray Data UDF: one row = one task's groups (a JSON list); returns one row of counts per group."""
    groups = [g for text in batch["groups"] for g in json.loads(text)]
    results = [decode_group(g, data_dir, out, codec, direct_io) for g in groups]
    keys = ("series", "series_decoded", "stacks", "images", "errors", "bytes")
    return {"key": np.array([g["key"] for g in groups]), **{k: np.array([r[k] for r in results], dtype=np.int64) for k in keys}}


# A decode task takes several groups (shards) when there are many per worker: each task costs
# 0.1-0.4 s of Ray Data hand-off on a busy 2-core node against ~0.7 s of work per 128 MB group
# (docs/BENCHMARKS.md, Ingest). At least TASKS_PER_WORKER tasks per worker keep the load balanced,
# and at most MAX_GROUPS_PER_TASK groups (~1 GB of pixels) keep progress reports coming (the driver
# hears of a task's groups when it ends); a retried task skips the groups it had finished.
# Tasks are of equal size (within one group) and their number is a multiple of the workers, so no
# worker is left with a last task alone while the others idle.
TASKS_PER_WORKER = 4
MAX_GROUPS_PER_TASK = 8


def task_sizes(groups: int, workers: int) -> list[int]:
    """Groups per decode task, in submission order, for `groups` groups on `workers` concurrent workers."""
    workers = max(1, workers)
    per = max(1, min(MAX_GROUPS_PER_TASK, groups // (workers * TASKS_PER_WORKER)))
    tasks = -(-groups // per)
    tasks = min(groups, -(-tasks // workers) * workers)  # up to a multiple of the workers
    return [groups // tasks + (i < groups % tasks) for i in range(tasks)]


def _run_ray(
    todo: list[dict[str, Any]],
    data_dir: str,
    out: str,
    workers: int,
    codec: VolumeCodec,
    on_done: Callable[[int], None],
    direct_io: bool,
) -> None:
    import ray

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    init_ray(num_cpus=workers, quiet=True)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    # Ray Data reserves part of the cluster per operator; on a small cluster that held this one-map
    # pipeline to about one task at a time (2 workers: 0.97x the wall time of 1 on 2 CPUs). With one
    # operator there is nothing to reserve against; restored after, for other Ray Data jobs here.
    reserve, ctx.op_resource_reservation_enabled = ctx.op_resource_reservation_enabled, False
    # Its downstream-capacity policy holds back an operator whose outputs queue up for the consumer;
    # here the outputs are a few counts and the consumer is this loop, but the policy compares the
    # queued bytes with the consumer's (empty) input queue and let one task run at a time once the
    # first tasks had ended (720 studies, 2 workers: 29-32 s with it, 20.7 s without). --workers is
    # enforced by the task pool's size, not by this policy.
    ratio, ctx.downstream_capacity_backpressure_ratio = ctx.downstream_capacity_backpressure_ratio, None
    env = {k: os.environ[k] for k in STORAGE_ENV if k in os.environ}
    extra = {"runtime_env": {"env_vars": env}} if env else {}
    items, start = [], 0
    for size in task_sizes(len(todo), workers):  # one item = one task's groups (JSON)
        items.append({"groups": json.dumps(todo[start:start + size])})
        start += size
    try:
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _decode_batch,
            fn_kwargs={"data_dir": data_dir, "out": out, "codec": codec, "direct_io": direct_io},
            batch_size=1,
            batch_format="numpy",
            num_cpus=1,
            compute=ray.data.TaskPoolStrategy(size=min(workers, len(items))),
            **extra,
        )
        for batch in ds.iter_batches(batch_size=1, batch_format="numpy"):
            on_done(int(batch["series"].sum()))
    finally:
        ctx.op_resource_reservation_enabled = reserve
        ctx.downstream_capacity_backpressure_ratio = ratio


def _load_or_make_plan(data_dir: str, out: str, split: str, shard_mb: float) -> dict[str, Any]:
    url = join(out, PROGRESS_DIR, PLAN_FILE)
    if exists(url):
        plan = json.loads(read_text(url))
        if (plan["data_dir"], plan["split"]) != (data_dir, split):
            raise SchemaError(
                out, f"holds a prepare of {plan['data_dir']} ({plan['split']}); use another OUT for {data_dir} ({split})"
            )
        listed = read_series(join(data_dir, f"{split}_series_descriptions.csv"))
        planned = {(s["study_id"], s["series_id"]) for g in plan["groups"] for s in g["series"]}
        planned |= {(m["study_id"], m["series_id"]) for m in plan["missing"]}
        if set(zip(listed["study_id"].tolist(), listed["series_id"].tolist(), strict=True)) != planned:
            raise SchemaError(out, f"the series list of {data_dir} changed since this output was planned; use a fresh OUT")
        return plan
    plan = make_plan(data_dir, split, shard_mb)
    atomic_write_text(url, json.dumps(plan))
    return plan


def build_labels(labels: pd.DataFrame, coords: pd.DataFrame | None, meta: pd.DataFrame) -> pd.DataFrame:
    """Per study × condition × level: severity and, where annotated, the point's stack/slice/pixel/patient mm.

    A target annotated on k series has k rows (severity repeated); targets without a point keep one row.
    `meta` holds the volumes table without its pixels.
    """
    long = labels_long(labels)
    cols = ["series_id", "instance_number", "stack", "slice", "row", "col", "x_mm", "y_mm", "z_mm"]
    if coords is None or coords.empty:
        for c in cols:
            long[c] = pd.array([None] * len(long), dtype="Int64" if c in cols[:4] else "Float64")
        return long
    where: dict[tuple[int, int, int], tuple[int, int, np.ndarray, tuple, tuple]] = {}
    for r in meta.itertuples(index=False):
        for k, inst in enumerate(r.instance_numbers):
            where[(int(r.study_id), int(r.series_id), int(inst))] = (int(r.stack), k, r.positions[k], tuple(r.orientation), tuple(r.pixel_spacing))
    pts = []
    for c in coords.itertuples(index=False):
        hit = where.get((int(c.study_id), int(c.series_id), int(c.instance_number)))
        row = {"study_id": int(c.study_id), "target": c.target, "series_id": int(c.series_id),
               "instance_number": int(c.instance_number), "row": float(c.y), "col": float(c.x)}
        if hit is not None:
            stack, k, pos, ori, sp = hit
            xyz = geometry.pixel_to_patient(pos, ori, sp, row=float(c.y), col=float(c.x))
            row |= {"stack": stack, "slice": k, "x_mm": xyz[0], "y_mm": xyz[1], "z_mm": xyz[2]}
        pts.append(row)
    points = pd.DataFrame(pts, columns=["study_id", "target", *cols])
    merged = with_target(long).merge(points, on=["study_id", "target"], how="left").drop(columns="target")
    for c in cols:
        merged[c] = merged[c].astype("Int64" if c in cols[:4] else "Float64")
    return merged


def finalise(plan: dict[str, Any], data_dir: str, out: str, config: dict[str, Any], seconds: float) -> Summary:
    """Gather errors, write labels (train) and, last, the manifest; returns the summary."""
    split = plan["split"]
    fs_for(out)[0].invalidate_cache()  # tasks wrote here behind this process's listing cache (s3fs)
    done = {}
    error_tables = [pa.Table.from_pylist(plan["missing"], schema=ERROR_SCHEMA)]
    for g in plan["groups"]:
        done[g["key"]] = json.loads(read_text(join(out, PROGRESS_DIR, f"done-{g['key']}.json")))
        fs, path = fs_for(join(out, PROGRESS_DIR, f"errors-{g['key']}.parquet"))
        error_tables.append(pq.read_table(path, filesystem=fs, schema=ERROR_SCHEMA))
    errors = pa.concat_tables(error_tables).to_pandas().sort_values(["study_id", "series_id", "path"], kind="stable")
    atomic_write_parquet(join(out, ERRORS_FILE), pa.Table.from_pandas(errors, schema=ERROR_SCHEMA, preserve_index=False))

    shards = sorted(n for n in listdir(join(out, VOLUMES_DIR)) if n.startswith("part-") and n.endswith(".parquet"))
    expected = {f"part-{k}.parquet" for k, c in done.items() if c["stacks"] > 0}
    shards = [s for s in shards if s in expected]
    labels_file = None
    labels_url = join(data_dir, "train.csv")
    if split == "train" and exists(labels_url):
        coords_url = join(data_dir, "train_label_coordinates.csv")
        coords = read_coordinates(coords_url) if exists(coords_url) else None
        fs, vpath = fs_for(join(out, VOLUMES_DIR))
        meta_cols = ["study_id", "series_id", "stack", "instance_numbers", "positions", "orientation", "pixel_spacing"]
        if shards:
            meta = pq.ParquetDataset([f"{vpath}/{s}" for s in shards], filesystem=fs, schema=VOLUME_SCHEMA).read(columns=meta_cols).to_pandas()
        else:
            meta = pd.DataFrame(columns=meta_cols)
        atomic_write_parquet(join(out, LABELS_FILE), build_labels(read_labels(labels_url), coords, meta))
        labels_file = LABELS_FILE

    summary = Summary(
        out=out,
        split=split,
        series_listed=int(plan["series_listed"]),
        series_decoded=sum(c["series_decoded"] for c in done.values()),
        stacks=sum(c["stacks"] for c in done.values()),
        images=sum(c["images"] for c in done.values()),
        errors=len(errors),
        volume_bytes=sum(c["bytes"] for c in done.values()),
        shards=len(shards),
        seconds=seconds,
    )
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "kind": "spine-ray prepare",
        "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data_dir": data_dir,
        "split": split,
        "counts": summary.as_dict(),
        "files": {"volumes": shards, "labels": labels_file, "errors": ERRORS_FILE},
        "config": config,
    }
    atomic_write_text(join(out, MANIFEST), json.dumps(manifest, indent=2))
    return summary


def prepare(
    data_dir: str,
    out: str,
    split: str = "train",
    workers: int | None = None,
    shard_mb: float = 128.0,
    on_progress: Callable[[int, int], None] | None = None,
    codec: VolumeCodec = VolumeCodec(),
    direct_io: bool = True,
) -> Summary:
    """Decode every series of `data_dir` (`split`) into `out`; resumes an interrupted run. Returns counts.

    direct_io: local shards are written with O_DIRECT where the filesystem allows it (`decode_group`).
    """
    if split not in ("train", "test"):
        raise SchemaError("--split", f"must be 'train' or 'test', got {split!r}")
    start = time.perf_counter()
    workers = workers or max(1, (os.cpu_count() or 1))
    plan = _load_or_make_plan(data_dir, out, split, shard_mb)
    remove(join(out, MANIFEST))  # from here until finalise, the output is unfinished
    finished = {n[len("done-"):-len(".json")] for n in listdir(join(out, PROGRESS_DIR)) if n.startswith("done-")}
    todo = [g for g in plan["groups"] if g["key"] not in finished]
    total = sum(len(g["series"]) for g in plan["groups"])
    progress = [total - sum(len(g["series"]) for g in todo)]

    def on_done(n: int) -> None:
        """Count a finished group's series and report progress."""
        progress[0] += n
        if on_progress:
            on_progress(progress[0], total)

    if on_progress:
        on_progress(progress[0], total)
    if todo:
        _run_ray(todo, data_dir, out, workers, codec, on_done, direct_io)
    config = {"workers": workers, "shard_mb": plan["shard_mb"], "angle_tol_deg": dicom.ANGLE_TOL_DEG,
              "gap_factor": dicom.GAP_FACTOR, "codec": codec.as_dict(), "direct_io": direct_io, "resumed_groups": len(plan["groups"]) - len(todo)}
    return finalise(plan, data_dir, out, config, time.perf_counter() - start)
