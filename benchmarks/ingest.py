"""Ingest benchmark: the public-notebook DICOM loop vs `prepare`'s decode, its Parquet codecs and 1 vs 2 workers.

    PYTHONPATH=. python benchmarks/ingest.py --root /tmp/spine-ray-bench --studies 6 18

Generates (once, cached under --root) synthetic RLE Lossless studies of realistic size with
`tests/dicomfiles.write_study`, then on each size, in one run:
- naive (the baseline): `pydicom.dcmread(f)` per file, sort by InstanceNumber,
  `np.stack(pixel_array)`, `np.save`; naive_pydicom_rle: the same with pydicom's own RLE decoder;
- floor: read each file, `pydicom.dcmread`, decode its RLE frame with pylibjpeg-rle, nothing else
  (the work no ingest can skip); floor_write: the same plus writing the decoded pixels uncompressed
  with O_DIRECT, as prepare writes its shards (the work no ingest that keeps raw pixels can skip,
  disk included); `_2proc`: in two plain processes;
- decode_only: prepare's decode path in this process without Ray and without writing;
- write_{codec}: the same plus its Parquet shards with the pixel column in that codec (none is the
  default), and the size ratio pixels / shards;
- prepare_1w / prepare_2w: `prepare` with 1 and 2 workers on one local Ray (num_cpus=2), started
  after the in-process runs and warmed up on the small set before timing; with --page-cache also
  prepare_1w_pagecache / prepare_2w_pagecache, its shards written through the page cache
  (`prepare --page-cache`, the write path before O_DIRECT), interleaved with the others.
Every run is repeated `--repeats` times, interleaved, and the fastest is kept (other load on a
shared machine only ever adds time); before each, untimed, its old output is removed and `sync`
flushes the page cache, so no run pays for another's gigabytes. `--max-groups-per-task 1` gives
prepare's dispatch before issue 13 (one Ray task per group). CPU seconds are those of the whole
process tree (Ray's processes included). Also reports images/s, images per CPU-second, the ratio
to naive per CPU-second, input MB/s and the peak RSS of the driver and of the largest Ray worker.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import multiprocessing
import os
import shutil
import threading
import time
from collections.abc import Callable

import numpy as np
import pydicom
from pydicom.encaps import generate_frames
from rle.utils import decode_frame

from spine_ray.core.schema import read_series
from spine_ray.core.storage import DirectFile
from spine_ray.data import ingest
from spine_ray.data.dicom import decode_series
from spine_ray.data.ingest import VolumeCodec, decode_group, make_plan, prepare
from tests.dicomfiles import write_series_csv, write_study  # run from the repository root


def make_dataset(root: str, n_studies: int, seed: int = 0) -> str:
    """n_studies synthetic studies: 256–384 px, 15–20 sagittal and 30–40 axial slices, RLE Lossless."""
    data = os.path.join(root, f"studies-{n_studies}")
    if os.path.exists(os.path.join(data, "train_series_descriptions.csv")):
        return data
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_studies):
        size = int(rng.choice([256, 320, 384]))
        slices = (int(rng.integers(15, 21)), int(rng.integers(15, 21)), int(rng.integers(30, 41)))
        rows += write_study(data, "train", 1000 + i, size, size, slices, rng)
    write_series_csv(data, "train", rows)
    return data


def dataset_stats(data: str) -> tuple[int, int, int]:
    """(images, DICOM bytes, pixel bytes) of a dataset."""
    files = glob.glob(os.path.join(data, "train_images", "*", "*", "*.dcm"))
    pixels = 0
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        pixels += ds.Rows * ds.Columns * 2
    return len(files), sum(os.path.getsize(f) for f in files), pixels


def naive(data: str, out: str, plugin: str = "") -> float:
    """The loop every public notebook uses; returns seconds. plugin="pydicom": pydicom's own RLE decoder
    (what a notebook gets without pylibjpeg-rle installed); "": pydicom's default choice (pylibjpeg-rle here)."""
    os.makedirs(out, exist_ok=True)
    series = read_series(os.path.join(data, "train_series_descriptions.csv"))
    start = time.perf_counter()
    for r in series.itertuples():
        files = glob.glob(os.path.join(data, "train_images", str(r.study_id), str(r.series_id), "*.dcm"))
        dss = sorted((pydicom.dcmread(f) for f in files), key=lambda d: int(d.InstanceNumber))
        if plugin:
            for d in dss:
                d.pixel_array_options(decoding_plugin=plugin)
        vol = np.stack([d.pixel_array for d in dss])
        np.save(os.path.join(out, f"{r.study_id}_{r.series_id}.npy"), vol)
    return time.perf_counter() - start


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every descendant of pid, from /proc (Linux)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        for child, ppid in parent.items():
            if ppid == p:
                frontier.append(child)
                try:
                    with open(f"/proc/{child}/cmdline", "rb") as f:
                        out.append((child, f.read().replace(b"\0", b" ").decode(errors="replace")))
                except OSError:
                    pass
    return out


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class PeakRSS:
    """Samples the RSS of this process and of every descendant (Ray workers included)."""

    def __init__(self) -> None:
        self.driver = 0
        self.worker = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            self.driver = max(self.driver, _rss(me))
            for pid, cmd in _descendants(me):
                if "ray::" in cmd or "default_worker" in cmd:
                    self.worker = max(self.worker, _rss(pid))
            self._stop.wait(0.05)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _cpu_seconds(pid: int) -> float:
    """utime + stime of one process, seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def tree_cpu() -> float:
    """CPU seconds used so far by this process, its live descendants (Ray's included) and its reaped children."""
    me = os.getpid()
    reaped = os.times().children_user + os.times().children_system
    return _cpu_seconds(me) + reaped + sum(_cpu_seconds(p) for p, _ in _descendants(me))


def timed(fn: Callable[[], object]) -> tuple[float, float, PeakRSS]:
    """Run fn(); returns (wall s, CPU s of the whole process tree, peak RSS)."""
    with PeakRSS() as peak:
        cpu0, t0 = tree_cpu(), time.perf_counter()
        fn()
        wall, cpu = time.perf_counter() - t0, tree_cpu() - cpu0
    return wall, cpu, peak


def _floor_files(job: tuple[list[str], str | None]) -> None:
    """Read, parse and RLE-decode the files; append their pixels to `out` when one is given."""
    files, out = job
    with (DirectFile.open(out) or open(out, "wb")) if out else contextlib.nullcontext() as sink:
        for f in files:
            with open(f, "rb") as fh:
                ds = pydicom.dcmread(fh)
            frame = next(generate_frames(ds.PixelData, number_of_frames=1))
            pixels = decode_frame(frame, ds.Rows * ds.Columns, ds.BitsAllocated, "<")
            if sink is not None:
                sink.write(pixels)


def floor(data: str, procs: int = 1, out: str | None = None) -> None:
    """Read, parse and RLE-decode every file, nothing more: what any ingest of this data must spend.

    procs=2: the files split over two forked processes, no Ray: the most two workers can gain here.
    out: also write the decoded pixels there (uncompressed, one file per process, O_DIRECT where the
    filesystem allows, no fsync, as prepare's shards): what any ingest that keeps uncompressed pixels
    must spend, disk included.
    """
    if out:
        os.makedirs(out, exist_ok=True)
    files = sorted(glob.glob(os.path.join(data, "train_images", "*", "*", "*.dcm")))
    jobs = [(files[i::procs], os.path.join(out, f"part-{i}.bin") if out else None) for i in range(procs)]
    if procs == 1:
        _floor_files(jobs[0])
        return
    with multiprocessing.get_context("fork").Pool(procs) as pool:
        pool.map(_floor_files, jobs)


def decode_only(data: str, out: str, codec: VolumeCodec | None) -> None:
    """The decode path of `prepare` in this process, no Ray: every group, with its Parquet write unless codec is None."""
    plan = make_plan(data, "train", 16.0)
    for g in plan["groups"]:
        if codec is not None:
            decode_group(g, data, out, codec)
        else:
            for s in g["series"]:
                decode_series([(f, open(f, "rb").read()) for f in s["files"]])


def shard_bytes(out: str) -> int:
    """Bytes of the volumes shards under out."""
    return sum(os.path.getsize(f) for f in glob.glob(os.path.join(out, "volumes", "*.parquet")))


CODECS = {
    "none": VolumeCodec("none"),
    "lz4": VolumeCodec("lz4"),
    "snappy": VolumeCodec("snappy"),
    "zstd-3": VolumeCodec("zstd", -3),
    "zstd1": VolumeCodec("zstd", 1),
    "zstd3": VolumeCodec("zstd", 3),
}


Run = tuple[Callable[[], object], str]  # (the timed call, the output directory it writes)


def measure(runs: dict[str, Run], repeats: int, images: int) -> dict[str, dict[str, float]]:
    """Each run `repeats` times, interleaved; per run the fastest wall and CPU, every wall, the largest RSS.

    Before each timed call, untimed: its previous output is removed and the page cache is flushed
    (`sync`), so no run pays for deleting or writing back another run's gigabytes.
    """
    out: dict[str, dict] = {}
    for _ in range(repeats):
        for name, (fn, target) in runs.items():
            shutil.rmtree(target, ignore_errors=True)
            os.sync()
            wall, cpu, peak = timed(fn)
            m = out.setdefault(name, {"wall_s": wall, "cpu_s": cpu, "walls_s": [], "driver_rss_mb": 0.0, "worker_rss_mb": 0.0})
            m["wall_s"], m["cpu_s"] = min(m["wall_s"], wall), min(m["cpu_s"], cpu)
            m["walls_s"].append(round(wall, 3))
            m["driver_rss_mb"] = max(m["driver_rss_mb"], peak.driver / 1e6)
            m["worker_rss_mb"] = max(m["worker_rss_mb"], peak.worker / 1e6)
    for m in out.values():
        m["img_per_s"], m["img_per_cpu_s"] = images / m["wall_s"], images / m["cpu_s"]
    return out


def main() -> None:
    """Run the benchmark and print a Markdown table (and JSON with --json)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/spine-ray-bench")
    ap.add_argument("--studies", type=int, nargs=2, default=[6, 18])
    ap.add_argument("--shard-mb", type=float, default=128.0, help="pixels per shard, MB (prepare's default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--worker-niceness", type=int, default=15, help="nice level of Ray's workers (Ray's default 15)")
    ap.add_argument("--workers-only", action="store_true", help="only the 1 -> 2 worker runs and the floor (large collections)")
    ap.add_argument("--max-groups-per-task", type=int, default=getattr(ingest, "MAX_GROUPS_PER_TASK", 1),
                    help="groups (shards) one decode task may take; 1 = one task per group (the dispatch before issue 13)")
    ap.add_argument("--page-cache", action="store_true",
                    help="also time prepare with its shards written through the page cache (prepare --page-cache)")
    args = ap.parse_args()
    ingest.MAX_GROUPS_PER_TASK = args.max_groups_per_task  # read by prepare's driver when it cuts the tasks

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray starts its workers at nice 15, below its driver, raylet and GCS, as `prepare` runs for a
    # user: on 2 cores that lets the driver hand out the next task while both workers decode
    # (1 -> 2 workers 1.44x at nice 0, 1.68x at 15, 72 studies). The in-process runs come first,
    # before any Ray process exists. `--worker-niceness 0` puts the workers level with the driver.
    os.environ.setdefault("RAY_worker_niceness", str(args.worker_niceness))
    sets = {n: make_dataset(args.root, n) for n in args.studies}
    load0 = os.getloadavg()
    results = []
    for n, data in sets.items():  # in-process runs first, before Ray's processes exist
        images, dicom_bytes, pixel_bytes = dataset_stats(data)
        rec: dict = {"studies": n, "images": images, "dicom_mb": dicom_bytes / 1e6, "pixel_mb": pixel_bytes / 1e6}
        scratch = os.path.join(args.root, f"scratch-{n}")
        runs: dict[str, Run] = {
            "floor": (lambda d=data: floor(d), scratch),
            "floor_2proc": (lambda d=data: floor(d, procs=2), scratch),
            "floor_write": (lambda d=data, o=scratch: floor(d, out=o), scratch),
            "floor_write_2proc": (lambda d=data, o=scratch: floor(d, procs=2, out=o), scratch),
        }
        if not args.workers_only:
            runs |= {
                "naive": (lambda d=data, o=scratch: naive(d, o), scratch),
                "naive_pydicom_rle": (lambda d=data, o=scratch: naive(d, o, plugin="pydicom"), scratch),
                "decode_only": (lambda d=data, o=scratch: decode_only(d, o, None), scratch),
            }
            for name, codec in CODECS.items():
                o = os.path.join(args.root, f"w-{n}-{name}")
                runs[f"write_{name}"] = (lambda d=data, c=codec, o=o: decode_only(d, o, c), o)
        rec["runs"] = measure(runs, args.repeats, images)
        for name in CODECS if not args.workers_only else ():
            rec["runs"][f"write_{name}"]["size_ratio"] = pixel_bytes / shard_bytes(os.path.join(args.root, f"w-{n}-{name}"))
        results.append(rec)

    if args.json:  # the in-process figures survive a Ray that cannot start
        with open(args.json, "w") as f:
            json.dump({"load_start": load0, "results": results}, f, indent=2)
    for attempt in range(3):  # on a heavily loaded machine the raylet can miss Ray's fixed 30 s start-up wait
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
            break
        except Exception:
            if attempt == 2:
                raise
            ray.shutdown()
    small = sets[min(args.studies)]
    for w in (1, 2):  # start and import into Ray's workers before timing anything
        shutil.rmtree(os.path.join(args.root, "warmup"), ignore_errors=True)
        prepare(small, os.path.join(args.root, "warmup"), "train", workers=w, shard_mb=args.shard_mb)
    for rec, (n, data) in zip(results, sets.items(), strict=True):
        runs: dict[str, Run] = {}
        for w in (1, 2):
            for direct in (True, False) if args.page_cache else (True,):
                name, out = f"prepare_{w}w" + ("" if direct else "_pagecache"), os.path.join(args.root, f"out-{n}-w{w}")
                runs[name] = (lambda d=data, o=out, w=w, io=direct: prepare(
                    d, o, "train", workers=w, shard_mb=args.shard_mb, direct_io=io), out)
        rec["runs"] |= measure(runs, args.repeats, rec["images"])
    ray.shutdown()

    load = os.getloadavg()
    print(f"load average at the start {load0[0]:.1f}, at the end: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} cores\n")
    print("| studies | images | run | wall s | images/s | CPU s | images per CPU-s | vs naive (floor with --workers-only) per CPU-s | pixels / shard bytes | input MB/s | peak RSS MB (driver / largest Ray worker) |")
    print("|" + "---|" * 11)
    for r in results:
        base = r["runs"].get("naive", r["runs"]["floor"])["img_per_cpu_s"]  # --workers-only: per CPU-s vs the floor
        for name, m in r["runs"].items():
            size = f"{m['size_ratio']:.2f}" if "size_ratio" in m else ""
            rss = f"{m['driver_rss_mb']:.0f} / {m['worker_rss_mb']:.0f}" if name.startswith("prepare") else f"{m['driver_rss_mb']:.0f} / –"
            print(f"| {r['studies']} | {r['images']} | {name} | {m['wall_s']:.2f} | {m['img_per_s']:.0f} | {m['cpu_s']:.2f} | "
                  f"{m['img_per_cpu_s']:.0f} | {m['img_per_cpu_s'] / base:.2f}x | {size} | {r['dicom_mb'] / m['wall_s']:.1f} | {rss} |")
    print()
    for r in results:
        m = r["runs"]
        median = float(np.median(m["prepare_1w"]["walls_s"]) / np.median(m["prepare_2w"]["walls_s"]))
        scaling = (f"2w/1w wall {m['prepare_1w']['wall_s'] / m['prepare_2w']['wall_s']:.2f}x (medians {median:.2f}x) "
                   f"(floor in 2 plain processes / 1: {m['floor']['wall_s'] / m['floor_2proc']['wall_s']:.2f}x; "
                   f"with the pixels written: {m['floor_write']['wall_s'] / m['floor_write_2proc']['wall_s']:.2f}x)")
        if "prepare_1w_pagecache" in m:
            for w in (1, 2):
                d, c = m[f"prepare_{w}w"], m[f"prepare_{w}w_pagecache"]
                scaling += (f"; {w}w O_DIRECT vs page cache: wall {c['wall_s'] / d['wall_s']:.2f}x faster "
                            f"(medians {np.median(c['walls_s']) / np.median(d['walls_s']):.2f}x), CPU {c['cpu_s'] / d['cpu_s']:.2f}x less")
            scaling += f"; page cache 2w/1w {m['prepare_1w_pagecache']['wall_s'] / m['prepare_2w_pagecache']['wall_s']:.2f}x"
        if "naive" not in m:
            print(f"{r['studies']} studies: {scaling}")
            continue
        print(f"{r['studies']} studies: prepare 1w vs naive per CPU-s {m['prepare_1w']['img_per_cpu_s'] / m['naive']['img_per_cpu_s']:.2f}x "
              f"(floor {m['floor']['img_per_cpu_s'] / m['naive']['img_per_cpu_s']:.2f}x), "
              f"vs naive with pydicom's RLE {m['prepare_1w']['img_per_cpu_s'] / m['naive_pydicom_rle']['img_per_cpu_s']:.2f}x; {scaling}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load_start": load0, "load_end": load, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
