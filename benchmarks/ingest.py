"""Ingest benchmark: the public-notebook DICOM loop vs `prepare` (1 and 2 workers), at two dataset sizes.

    PYTHONPATH=. python benchmarks/ingest.py --root /tmp/spine-ray-bench --studies 4 12

Generates (once, cached under --root) synthetic RLE Lossless studies of realistic size with
`spine_ray.testing.write_study`, then on each size, in one run:
- naive: `pydicom.dcmread(f)` per file, sort by InstanceNumber, `np.stack(pixel_array)`, `np.save`;
- prepare with 1 and with 2 workers on one local Ray (started before timing; a warm-up run on the
  small set excluded), output to a fresh folder each time.
Reports images/s, images/s/core, input MB/s and the peak RSS of the driver and of the largest Ray
worker process (sampled every 50 ms), which must not grow with the number of studies.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import threading
import time

import numpy as np
import pydicom

from spine_ray.ingest import prepare
from spine_ray.schema import read_series
from spine_ray.testing import write_series_csv, write_study


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


def run_prepare(data: str, out: str, workers: int, shard_mb: float) -> tuple[float, PeakRSS, int]:
    """Time one prepare into a fresh folder; returns (seconds, peak RSS, stacks)."""
    shutil.rmtree(out, ignore_errors=True)
    with PeakRSS() as peak:
        start = time.perf_counter()
        summary = prepare(data, out, "train", workers=workers, shard_mb=shard_mb)
        seconds = time.perf_counter() - start
    return seconds, peak, summary.stacks


def main() -> None:
    """Run the benchmark and print a Markdown table (and JSON with --json)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default="/tmp/spine-ray-bench")
    ap.add_argument("--studies", type=int, nargs=2, default=[4, 12])
    ap.add_argument("--shard-mb", type=float, default=16.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sets = {n: make_dataset(args.root, n) for n in args.studies}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    small = sets[min(args.studies)]
    prepare(small, os.path.join(args.root, "warmup"), "train", workers=2, shard_mb=args.shard_mb)

    results = []
    for n, data in sets.items():
        images, dicom_bytes, pixel_bytes = dataset_stats(data)
        rec = {"studies": n, "images": images, "dicom_mb": dicom_bytes / 1e6, "pixel_mb": pixel_bytes / 1e6}
        with PeakRSS() as peak:
            rec["naive_s"] = naive(data, os.path.join(args.root, f"naive-{n}"))
        rec["naive_rss_mb"] = peak.driver / 1e6
        rec["naive_pydicom_rle_s"] = naive(data, os.path.join(args.root, f"naive-{n}"), plugin="pydicom")
        for w in (1, 2):
            s, peak, stacks = run_prepare(data, os.path.join(args.root, f"out-{n}-w{w}"), w, args.shard_mb)
            rec[f"w{w}_s"], rec[f"w{w}_worker_rss_mb"], rec[f"w{w}_driver_rss_mb"] = s, peak.worker / 1e6, peak.driver / 1e6
            rec["stacks"] = stacks
        rec["speedup_1w_vs_naive"] = rec["naive_s"] / rec["w1_s"]
        rec["scaling_2w_vs_1w"] = rec["w1_s"] / rec["w2_s"]
        results.append(rec)

    print("| studies | images | DICOM MB | naive img/s | naive, pydicom RLE img/s | prepare 1w img/s | prepare 2w img/s | "
          "1w/naive | 1w/naive pydicom RLE | 2w/1w | 2w img/s/core | 2w input MB/s | naive RSS MB | worker peak RSS MB (1w / 2w) |")
    print("|" + "---|" * 14)
    for r in results:
        print(
            f"| {r['studies']} | {r['images']} | {r['dicom_mb']:.0f} | {r['images'] / r['naive_s']:.0f} | "
            f"{r['images'] / r['naive_pydicom_rle_s']:.0f} | "
            f"{r['images'] / r['w1_s']:.0f} | {r['images'] / r['w2_s']:.0f} | {r['speedup_1w_vs_naive']:.2f}x | "
            f"{r['naive_pydicom_rle_s'] / r['w1_s']:.2f}x | "
            f"{r['scaling_2w_vs_1w']:.2f}x | {r['images'] / r['w2_s'] / 2:.0f} | {r['dicom_mb'] / r['w2_s']:.1f} | "
            f"{r['naive_rss_mb']:.0f} | {r['w1_worker_rss_mb']:.0f} / {r['w2_worker_rss_mb']:.0f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    ray.shutdown()


if __name__ == "__main__":
    main()
