"""Stage-2 augmentation per CPU core: the CPU path (baseline) against `augment_on: device`, in the same run (issue 28).

At the recipe's sizes (the grade members of jobs/rsna2024.yaml, one per distinct augmentation:
the plain members and the CutMix one), on random stored patches of the real shape, one thread:
  cpu before       the CPU path with the code before the fast conversions (`augment_before.before`): the baseline
  cpu              `augment` of one part (Ray Data task) + shuffle pool + `to_batch` (trainer): today's CPU work per sample
  device CPU       the same with `augment_on: device`: parameters drawn, stored patches and draws collated
    of which draw  `draw_params` alone (mostly the intensity noise, 2k+1 × out_px² normals per slot)
  + noise_on dev   the same with `noise_on: device` (a seed per slot in place of the noise field)
  torch CPU        `on_device`, the batched torch apply, on this CPU (one thread); "+ noise" with `noise_on: device`
  torch CUDA       the same on the GPU, when there is one (the batch already there)
CPU figures are CPU-seconds of the process (they hold under load; GPU figures are wall time),
with samples/s per core, the ratio against the baseline, and the cores one GPU needs at
`--gpu-rate` samples/s (≈ 250 on an H200 for the grade model, from the issue). Then each localiser
member's intensity augmentation + `to_batch` per sample, before and now. Not counted: the
Parquet read of the stored patches, which every path pays alike. The machine may be shared: the
ratios, not the seconds, are the result.

    python benchmarks/augment.py --reps 3
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks.augment_before import before  # noqa: E402
from benchmarks.train_switches import sample_rows, stack_rows  # noqa: E402
from spine_ray.core.config import load  # noqa: E402
from spine_ray.engine.stage import FoldJob  # noqa: E402
from spine_ray.engine.stream import EPOCH, ShufflePool  # noqa: E402
from spine_ray.run_config import PipelineConfig  # noqa: E402
from spine_ray.stages.grade.augment import draw_params  # noqa: E402
from spine_ray.stages.grade.config import GradeConfig  # noqa: E402
from spine_ray.stages.grade.stage import GradeStage  # noqa: E402
from spine_ray.stages.localize import VIEWS, ViewConfig, view_arrays, view_tensors  # noqa: E402

RECIPE = Path(__file__).resolve().parents[1] / "jobs" / "rsna2024.yaml"


def timed(fns: dict[str, Callable[[], object]], reps: int, clock: Callable[[], float] = time.process_time) -> dict[str, float]:
    """Median seconds per call of each function (CPU-seconds of this process by default: they hold on a shared machine), after a warm-up call."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():  # calls alternate, so drifts hit all alike
            t = clock()
            fn()
            times[k].append(clock() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def members(path: Path) -> list[GradeConfig]:
    """The recipe's grade members, one per distinct augmentation (crop geometry, switches, mix)."""
    seen: dict[tuple, GradeConfig] = {}
    for m in load(PipelineConfig, path).grade:
        key = dataclasses.replace(m, name="", model=GradeConfig().model, train=GradeConfig().train, two_step=None, freeze=GradeConfig().freeze)
        seen.setdefault(repr(key), m)
    return list(seen.values())


def pipeline(stage: GradeStage, job: FoldJob, rows: dict[str, np.ndarray], seed: int) -> tuple[list[dict], int]:
    """One part through the CPU side of training: augment (a Ray Data task), shuffle pool, to_batch; the batches and bytes per sample."""
    rng = np.random.default_rng(seed)
    block = stage.augment(job, rows, rng)
    n = len(rows["study_id"])
    block[EPOCH] = np.zeros(n, np.int64)
    nbytes = sum(v.nbytes for v in block.values()) // n
    pool, out = ShufflePool(), []
    pool.add(block)
    while len(pool):
        arrays = pool.take(job.config.train.batch_size, rng)
        out.append(stage.to_batch(job, {k: v for k, v in arrays.items() if k != EPOCH}))
    return out, nbytes


def measure(stage: GradeStage, cfg: GradeConfig, part: int, reps: int) -> tuple[dict[str, float], dict[str, int]]:
    """Seconds per sample of each path for one member, and bytes per sample through the pipeline."""
    cfgs = {"cpu": cfg, "device": dataclasses.replace(cfg, augment_on="device")}
    cfgs["noise"] = dataclasses.replace(cfgs["device"], noise_on="device")
    jobs = {k: FoldJob("grade", c.name, 0, 5, c, "", "", {}) for k, c in cfgs.items()}
    rows = sample_rows(cfg, part, np.random.default_rng(0))
    out = {k: pipeline(stage, j, rows, 1) for k, j in jobs.items()}
    def cpu_before() -> None:
        with before():
            pipeline(stage, jobs["cpu"], rows, 1)

    secs = timed({
        "cpu before": cpu_before,
        "cpu": lambda: pipeline(stage, jobs["cpu"], rows, 1),
        "device CPU": lambda: pipeline(stage, jobs["device"], rows, 1),
        "  of which draw": lambda: draw_params(cfgs["device"], rows, np.random.default_rng(1)),
        "+ noise_on dev": lambda: pipeline(stage, jobs["noise"], rows, 1),
    }, reps)
    per = {k: v / part for k, v in secs.items()}
    applies = {"torch CPU": "device", "torch CPU + noise": "noise"}
    if torch.cuda.is_available():
        applies.update({"torch CUDA": "device", "torch CUDA + noise": "noise"})

    def apply(key: str, on: str) -> Callable[[], None]:
        batches = [{n: v.to(on) for n, v in b.items()} for b in out[key][0]]

        def run() -> None:
            for b in batches:
                stage.on_device(jobs[key], b)
            if on == "cuda":
                torch.cuda.synchronize()

        return run

    for on, clock in (("cpu", time.process_time), ("cuda", time.perf_counter)):  # a GPU's time is wall time
        fns = {k: apply(key, on) for k, key in applies.items() if on.upper() in k}
        per.update({k: v / part for k, v in timed(fns, reps, clock).items()})
    return per, {k: v[1] for k, v in out.items()}


def localisers(path: Path, n: int, reps: int) -> None:
    """Each localiser member's CPU work per sample (intensity augmentation of the stored stack, `to_batch`), before and now."""
    print(f"localisers: intensity augmentation + to_batch of {n} stored stacks; 1 thread, median of {reps}")
    print(f"  {'member':<19}{'shape':>16}{'before ms':>11}{'now ms':>9}{'× before':>10}")
    loc = load(PipelineConfig, path).localize
    for name in VIEWS:
        cfg = getattr(loc, name)
        shape = (cfg.slices, cfg.size, cfg.size)
        rows = stack_rows(name, cfg, n, np.random.default_rng(0))

        def now(name: str = name, cfg: ViewConfig = cfg, rows: dict = rows) -> None:
            view_tensors(view_arrays(name, cfg, rows, np.random.default_rng(1)))

        def then(now: Callable[[], None] = now) -> None:
            with before():
                now()

        t = timed({"before": then, "now": now}, reps)
        print(f"  {name:<19}{' × '.join(map(str, shape)):>16}{t['before'] / n * 1e3:11.2f}{t['now'] / n * 1e3:9.2f}{t['before'] / t['now']:10.2f}")


def main() -> None:
    """Print ms and samples/s per core of each path and the ratio against the CPU path."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default=str(RECIPE))
    ap.add_argument("--part", type=int, default=0, help="samples per part (default: the recipe's chunk_studies × 5 levels)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gpu-rate", type=float, default=250.0, help="samples/s one GPU trains the grade model at")
    ap.add_argument("--stacks", type=int, default=4, help="stored stacks per localiser measurement")
    args = ap.parse_args()
    torch.set_num_threads(1)
    part = args.part or load(PipelineConfig, Path(args.recipe)).resources.chunk_studies * 5
    stage = GradeStage()
    for cfg in members(Path(args.recipe)):
        s, kk = 2 * cfg.k + 1, 2 * (cfg.k + cfg.max_shift) + 1
        print(f"{cfg.name}: {len(cfg.slots)} slots × {s} slices × {cfg.out_px}² from stored {kk} × {cfg.patch_px}², "
              f"mix {'on' if cfg.mix.enabled else 'off'}; part {part}, batch {cfg.train.batch_size}; 1 thread, median of {args.reps}")
        per, nbytes = measure(stage, cfg, part, args.reps)
        print(f"  {'path':<19}{'ms/sample':>10}{'samples/s':>11}{'× cpu':>8}{'cores/GPU':>11}")
        for k, v in per.items():
            cores = f"{args.gpu_rate * v:11.2f}" if k in ("cpu before", "cpu", "device CPU", "+ noise_on dev") else " " * 11
            unit = "GPU" if "CUDA" in k else "core"
            print(f"  {k:<19}{v * 1e3:10.2f}{1 / v:11.1f}{per['cpu'] / v:8.2f}{cores}  (per {unit})")
        mib = {k: v / 2**20 for k, v in nbytes.items()}
        print(f"  bytes per sample through the pipeline: cpu {mib['cpu']:.2f} MiB, device {mib['device']:.2f} MiB "
              f"(×{mib['device'] / mib['cpu']:.1f}), noise_on device {mib['noise']:.2f} MiB (×{mib['noise'] / mib['cpu']:.1f})")
    localisers(Path(args.recipe), args.stacks, args.reps)


if __name__ == "__main__":
    main()
