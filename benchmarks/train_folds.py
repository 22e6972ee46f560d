"""Fold training: Ray Train overhead over the plain loop, and the fold-parallel speed-up.

In one run, on one synthetic dataset and one model of the given config (stage 1: the sagittal T2
localiser; stage 2: the first grade member, on label points with stage-1-like noise):
  plain      each fold through `stage.run_fold` in this process, one after another
  ray-seq    the same folds through Tune trial → TorchTrainer, one trial per fold, one at a time
  ray-lane   the same folds on one slot as one lane: one trial and one TorchTrainer train them in turn
  ray-par    the same folds through Tune trial → TorchTrainer, all at once
Each mode trains the same epochs on the same samples with the same threads per fold.

Besides whole-run seconds it prints the steady-state figures, which separate Ray's fixed cost per
fold (trial, controller, worker group, dataset) from its cost per epoch: the median wall time of an
epoch after the first (training plus, under Ray, the report and checkpoint persisted to storage,
timed in the worker) and the median training samples/s of those epochs.

    python benchmarks/train_folds.py --stage localize --studies 24 --folds 2 --epochs 6
    python benchmarks/train_folds.py --stage grade --studies 24 --folds 2 --epochs 6
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> None:
    """Run the three modes and print seconds and ratios."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--studies", type=int, default=24)
    ap.add_argument("--folds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--config", default="jobs/demo.yaml")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--stage", choices=("localize", "grade"), default="localize")
    args = ap.parse_args()

    import ray

    from spine_ray.core.config import from_dict, load
    from spine_ray.core.raycluster import init_ray
    from spine_ray.data.ingest import prepare
    from spine_ray.engine.fold import run_fold
    from spine_ray.engine.resources import ResourcesConfig
    from spine_ray.engine.schedule import run_folds
    from spine_ray.pipeline import fold_jobs, setup_run
    from spine_ray.run_config import PipelineConfig
    from spine_ray.stages.localize import LocalizeStage
    from spine_ray.synth.generate import generate
    from spine_ray.synth.study import SynthConfig

    tmp = Path(tempfile.mkdtemp(prefix="bench-train-"))
    cpus = os.cpu_count() or 2
    init_ray(num_cpus=cpus)
    generate(str(tmp / "data"), from_dict(SynthConfig, {"studies": args.studies, "seed": 5, "acquisition": {"image_sizes": [args.image_size]}}), workers=0)
    prepare(str(tmp / "data"), str(tmp / "prepared"), "train")
    base = load(PipelineConfig, args.config, [f"prepared={tmp / 'prepared'}", f"folds={args.folds}"])
    inputs: dict[str, str] = {}
    if args.stage == "localize":
        member, model_cfg, stage = "sag_t2", base.localize.sag_t2, LocalizeStage()
    else:
        import numpy as np

        from spine_ray.data.volumes import read_table
        from spine_ray.stages.grade.samples import fake_points
        from spine_ray.stages.grade.stage import GradeStage

        member, model_cfg, stage = base.grade[0].name, base.grade[0], GradeStage()
    model_cfg = dataclasses.replace(model_cfg, train=dataclasses.replace(model_cfg.train, epochs=args.epochs))
    if args.stage == "grade":
        points = tmp / "points.parquet"
        fake_points(read_table(base.prepared, "labels.parquet"), np.random.default_rng(0)).to_parquet(points)
        inputs = {"points": str(points)}
    threads = max(1, cpus // args.folds)  # what each fold gets when all folds run at once

    def jobs_for(mode: str):
        cfg = PipelineConfig(prepared=base.prepared, run_dir=str(tmp / mode), folds=args.folds, seed=base.seed)
        setup_run(cfg)
        return fold_jobs(cfg, args.stage, member, model_cfg, inputs)

    from spine_ray.engine.sample_cache import samples

    trained = args.epochs * sum(len(samples(stage, j, "train")) for j in jobs_for("count"))
    results: dict[str, float] = {}
    epochs: dict[str, list[tuple[float, float]]] = {}  # mode → (epoch seconds, samples/s), epochs ≥ 1
    torch.set_num_threads(threads)
    t = time.perf_counter()
    epochs["plain"] = []
    for job in jobs_for("plain"):
        last = [time.perf_counter()]

        def on_epoch_end(result, last=last) -> None:
            now = time.perf_counter()
            if result.epoch >= 1:
                epochs["plain"].append((now - last[0], result.metrics["samples_per_s"]))
            last[0] = now

        run_fold(stage, job, device=torch.device("cpu"), on_epoch_end=on_epoch_end)
    results["plain"] = time.perf_counter() - t

    timelines: dict[str, list[dict[str, float]]] = {}
    for mode, concurrent, pack in (("ray-seq", 1, "off"), ("ray-lane", 1, "on"), ("ray-par", 0, "on")):
        jobs = jobs_for(mode)
        t = time.perf_counter()
        run_folds(stage, jobs, ResourcesConfig(num_workers=1, cpus_per_worker=float(threads), max_concurrent_folds=concurrent, pack_folds=pack))
        results[mode] = time.perf_counter() - t
        epochs[mode] = _ray_epochs(tmp / mode / "ray" / "tune")
        timelines[mode] = [json.loads(p.read_text()).get("timeline", {}) for p in sorted((tmp / mode).rglob("done.json"))]

    print(f"\n{args.stage} {member}, {args.studies} studies, {args.folds} folds × {args.epochs} epochs, {threads} thread(s) per fold, {cpus} CPUs")
    for mode, sec in results.items():
        print(f"  {mode:8s} {sec:8.1f} s   {trained / sec:7.1f} training samples/s (fold set-up and prediction included)")
    print(f"  Ray Train overhead (ray-seq / plain): {results['ray-seq'] / results['plain']:.2f}x")
    for mode in ("ray-seq", "ray-lane"):
        fixed = (results[mode] - results["plain"] - (args.epochs - 1) * args.folds * (_median(epochs, mode, 0) - _median(epochs, "plain", 0))) / args.folds
        print(f"  fixed Ray cost per fold (beyond its epochs), {mode}: {fixed:.1f} s")
    print(f"  one lane vs a trial per fold (ray-seq / ray-lane): {results['ray-seq'] / results['ray-lane']:.2f}x")
    for mode in epochs:
        print(f"  {mode:8s} steady state: {_median(epochs, mode, 0):6.2f} s per epoch, {_median(epochs, mode, 1):7.1f} training samples/s (median of epochs ≥ 1)")
    print(f"  steady-state epoch time, ray-seq / plain: {_median(epochs, 'ray-seq', 0) / _median(epochs, 'plain', 0):.3f}x")
    print(f"  steady-state training samples/s, ray-seq / plain: {_median(epochs, 'ray-seq', 1) / _median(epochs, 'plain', 1):.3f}x")
    # Where a fold's wall time goes (median over folds, from each fold's done.json timeline).
    for mode, rows in timelines.items():
        gaps = {name: statistics.median(r[b] - r[a] for r in rows) for name, a, b in (
            ("trial → worker", "trial_started", "worker_started"), ("worker set-up", "worker_started", "training_started"),
            ("training", "training_started", "training_finished"), ("predict + write", "training_finished", "finished"))
            if rows and all(a in r and b in r for r in rows)}
        print(f"  {mode:8s} fold timeline, median s: " + ", ".join(f"{k} {v:.1f}" for k, v in gaps.items()))
    print(f"  fold-parallel speed-up (ray-seq / ray-par): {results['ray-seq'] / results['ray-par']:.2f}x")
    print(f"  fold-parallel vs plain sequential (plain / ray-par): {results['plain'] / results['ray-par']:.2f}x")
    ray.shutdown()


def _ray_epochs(tune_dir: Path) -> list[tuple[float, float]]:
    """(epoch seconds, samples/s) of every epoch ≥ 1 of every trial, from Tune's result.json files.

    The epoch's seconds are measured in the worker: its training (`epoch_s`) plus the report that
    followed it (carried as `report_s` by the next epoch's metrics), because Tune's own
    time_this_iter_s is quantised by the Train controller's polling interval.
    """
    out = []
    for path in sorted(tune_dir.rglob("result.json")):
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row, after in zip(rows, rows[1:], strict=False):
            if row.get("epoch", 0) >= 1:
                out.append((float(row["epoch_s"]) + float(after["report_s"]), float(row["samples_per_s"])))
    return out


def _median(epochs: dict[str, list[tuple[float, float]]], mode: str, i: int) -> float:
    return statistics.median(e[i] for e in epochs[mode]) if epochs[mode] else float("nan")


if __name__ == "__main__":
    main()
