"""Synthetic-data throughput: studies/second/core in-process (baseline) vs Ray tasks, per image size.

    python benchmarks/synth.py --studies 8 --sizes 128,384 --workers 2

Each size generates the same studies twice into temporary folders: once in-process on one core
(the baseline), once as one Ray task per study on `--workers` cores, and prints both rates and
their ratio. Ray is started before timing so that start-up is not counted.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace

from spine_ray.synth.acquisition import AcquisitionConfig
from spine_ray.synth.generate import generate
from spine_ray.synth.study import SynthConfig


def timed(out: str, cfg: SynthConfig, workers: int) -> float:
    """Seconds to generate `cfg` into `out`."""
    t = time.perf_counter()
    generate(out, cfg, workers=workers)
    return time.perf_counter() - t


def main() -> None:
    """Run the benchmark and print one line per image size."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=8)
    ap.add_argument("--sizes", default="128,384")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(f"{args.studies} studies per run, Ray workers: {args.workers}, host cores: {os.cpu_count()}")
    print(f"{'size':>5} {'1 core s/study':>15} {'studies/s/core (1 core)':>24} {'studies/s/core (Ray)':>21} {'speed-up':>9}")
    for size in (int(s) for s in args.sizes.split(",")):
        cfg = SynthConfig(studies=args.studies, seed=size, acquisition=AcquisitionConfig(image_sizes=(size,)))
        with tempfile.TemporaryDirectory() as tmp:
            generate(os.path.join(tmp, "warm"), replace(cfg, studies=args.workers), workers=args.workers)
            base = timed(os.path.join(tmp, "base"), cfg, workers=1)
            par = timed(os.path.join(tmp, "ray"), cfg, workers=args.workers)
        rate1 = args.studies / base
        rate_ray = args.studies / par / args.workers
        print(f"{size:>5} {base / args.studies:>15.2f} {rate1:>24.3f} {rate_ray:>21.3f} {base / par:>8.2f}x")
    ray.shutdown()


if __name__ == "__main__":
    main()
