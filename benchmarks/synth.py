"""Synthetic-data throughput: studies/second/core in-process (baseline) vs Ray tasks, per preset and image size.

    python benchmarks/synth.py --studies 8 --sizes 128,384 --workers 2
    python benchmarks/synth.py --studies 3 --sizes 384 --presets simple,realistic --workers 1

Each preset × size generates the same studies into temporary folders: once in-process on one
core (the baseline; its CPU seconds are printed too, as wall time on a shared machine is not
the generator's), and, with `--workers` > 1, as one Ray task per study, and prints both rates
and their ratio. With several presets, each one's in-process CPU time is also given as a
ratio to the first preset's at the same size. Ray is started before timing.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from dataclasses import replace

from spine_ray.core.config import load
from spine_ray.synth.generate import generate
from spine_ray.synth.study import PRESETS, SynthConfig


def timed(out: str, cfg: SynthConfig, workers: int) -> tuple[float, float]:
    """Wall and this process's CPU seconds to generate `cfg` into `out`."""
    t, c = time.perf_counter(), time.process_time()
    generate(out, cfg, workers=workers)
    return time.perf_counter() - t, time.process_time() - c


def main() -> None:
    """Run the benchmark and print one line per image size."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=8)
    ap.add_argument("--sizes", default="128,384")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--presets", default="simple")
    args = ap.parse_args()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    if args.workers > 1:
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
    print(f"{args.studies} studies per run, Ray workers: {args.workers}, host cores: {os.cpu_count()}")
    print(f"{'preset':>10} {'size':>5} {'1 core s/study':>15} {'CPU s/study':>12} {'vs first':>9} {'studies/s/core (Ray)':>21} {'speed-up':>9}")
    first: dict[int, float] = {}
    for preset in args.presets.split(","):
        for size in (int(s) for s in args.sizes.split(",")):
            cfg = load(SynthConfig, None, [*PRESETS[preset], f"studies={args.studies}", f"seed={size}"])
            cfg = replace(cfg, acquisition=replace(cfg.acquisition, image_sizes=(size,)))
            with tempfile.TemporaryDirectory() as tmp:
                base, cpu = timed(os.path.join(tmp, "base"), cfg, workers=1)
                par = 0.0
                if args.workers > 1:
                    generate(os.path.join(tmp, "warm"), replace(cfg, studies=args.workers), workers=args.workers)
                    par, _ = timed(os.path.join(tmp, "ray"), cfg, workers=args.workers)
            first.setdefault(size, cpu)
            ray_cols = f"{args.studies / par / args.workers:>21.3f} {base / par:>8.2f}x" if par else f"{'-':>21} {'-':>9}"
            print(f"{preset:>10} {size:>5} {base / args.studies:>15.2f} {cpu / args.studies:>12.2f} {cpu / first[size]:>8.2f}x {ray_cols}")
    if ray.is_initialized():
        ray.shutdown()


if __name__ == "__main__":
    main()
