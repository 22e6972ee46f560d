"""Batch inference: Ray Data `spine-ray infer` vs the same models in a plain PyTorch loop.

In one run, on a trained run directory (e.g. the demo's) and two study collections (the test
split and the larger train split of the same data):
  plain     one process: decode each study, `StudyPredictor.predict`, collect (the baseline)
  ray-1     `spine_ray.infer.infer` with one predictor actor
  ray-2     the same with two predictor actors
Prints studies/s, seconds per study, the ratio against the plain loop, and the peak memory
(proportional set size of this process and all its children, sampled every second).

    python benchmarks/infer.py --data runs/demo/data --run runs/demo/run
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time

import psutil

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


class PeakMemory:
    """Peak memory of this process tree while the block runs (MB), and how many processes then.

    Proportional set size (PSS) where the OS gives it: every Ray worker maps the same torch
    libraries and object store, and summing resident sets would count those pages once per process.
    """

    def __enter__(self) -> PeakMemory:
        self.peak, self.procs, self._stop = 0.0, 0, False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop:
            procs = [me, *me.children(recursive=True)]
            total = 0
            for p in procs:
                try:
                    info = p.memory_full_info()
                    total += getattr(info, "pss", info.rss)
                except psutil.Error:
                    pass
            if total / 2**20 > self.peak:
                self.peak, self.procs = total / 2**20, len(procs)
            time.sleep(1.0)  # reading PSS costs CPU: sample sparingly on a 2-core machine

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._t.join()


def plain(data: str, run: str, split: str) -> tuple[float, int]:
    """The baseline: decode and predict every study in this process."""
    import io

    import pandas as pd

    from spine_ray.core.schema import read_series
    from spine_ray.core.storage import join
    from spine_ray.infer import StudyPredictor, decode_study

    series = read_series(join(data, f"{split}_series_descriptions.csv"))
    predictor = StudyPredictor(run)
    t = time.perf_counter()
    for study, g in series.groupby("study_id"):
        vol, _ = decode_study(data, split, int(study), [(int(r.series_id), r.series_description) for r in g.itertuples()])
        predictor.predict(pd.read_parquet(io.BytesIO(vol)))
    return time.perf_counter() - t, series["study_id"].nunique()


def main() -> None:
    """Run every mode on both collections and print the table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data", default="runs/demo/data")
    ap.add_argument("--run", default="runs/demo/run")
    ap.add_argument("--splits", default="test,train")
    args = ap.parse_args()

    import ray
    import torch

    from spine_ray.core.raycluster import init_ray
    from spine_ray.infer import infer

    torch.set_num_threads(1)  # one core per predictor, in every mode
    splits = args.splits.split(",")
    rows = []
    # The plain loop runs first, before Ray starts, so its peak is its own process only; Ray's
    # peaks count the driver, the raylet and every worker (children of this process).
    for split in splits:
        with PeakMemory() as mem:
            sec, n = plain(args.data, args.run, split)
        rows.append((split, n, "plain", sec, mem.peak, mem.procs))
    init_ray()
    # Mode-major, so that each mode's larger collection runs after its own smaller one: idle Ray
    # workers outlive a run, and the peaks compared for growth must see the same worker pool.
    for actors in (1, 2):
        for split in splits:
            n = next(r[1] for r in rows if r[0] == split)
            with PeakMemory() as mem, tempfile.TemporaryDirectory() as tmp:
                rep = infer(args.data, args.run, os.path.join(tmp, "submission.csv"), split, concurrency=actors)
            rows.append((split, n, f"ray-{actors}", rep.seconds, mem.peak, mem.procs))
    rows.sort(key=lambda r: (splits.index(r[0]), r[2]))
    print(f"\n{'split':6s} {'studies':>7s} {'mode':6s} {'seconds':>8s} {'studies/s':>9s} {'s/study':>8s} {'vs plain':>8s} {'peak MB':>8s} {'processes':>9s} {'MB/proc':>8s}")
    base = {r[0]: r[3] for r in rows if r[2] == "plain"}
    for split, n, mode, sec, peak, procs in rows:
        print(f"{split:6s} {n:7d} {mode:6s} {sec:8.1f} {n / sec:9.2f} {sec / n:8.2f} {base[split] / sec:7.2f}x {peak:8.0f} {procs:9d} {peak / procs:8.0f}")
    if len(splits) == 2:
        size = {r[0]: r[1] for r in rows}
        peak = {(r[0], r[2]): r[4] for r in rows}
        a, b = splits
        for mode in ("plain", "ray-1", "ray-2"):
            print(f"peak memory {mode}: {size[a]} → {size[b]} studies ({size[b] / size[a]:.2f}x): {peak[(b, mode)] / peak[(a, mode)]:.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
