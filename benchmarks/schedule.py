"""Replay a run's job graph on N GPUs: stage barriers (today's stage-by-stage order) against one graph.

Usage:
    python benchmarks/schedule.py [--config jobs/rsna2024.yaml] [--gpus 8 5] [--scale 1.0] [--target-gpu-hours 12] [--rates gpu.json]
    python benchmarks/schedule.py --run-dir runs/demo/run --gpus 2 [--target-gpu-hours 0]

The graph is the config's fold jobs (`spine_ray.pipeline.plan_jobs`): every view of every
stage-1 member, every grader, every one-stage member and every cross prediction, per fold, with
per-fold needs (axial fold k after sagittal T2 fold k; grader fold k after the three views of the
main localisers' fold k; a cross prediction after its grader fold and the variant's fold k; the
one-stage members need nothing). Durations are GPU-hours per fold (`unit_hours`): a member's epochs
over a fold's training samples (4/5 of 1,975 studies) and its held-out fifth at a third of the cost,
predicted once, or after every epoch by the members that select their best epoch, at its unit's samples/s, measured on one H200 in the GPU-throughput issue (`H200_RATES`; `--rates` takes
benchmarks/gpu.py's JSON; the effnet localisers priced at the graders' effnet/convnext ratio); the
table of members is printed first. `--scale` multiplies them all, and `--target-gpu-hours` adds the
rates scaled to that total (12: the GPU-throughput issue's target for the recipe). `--run-dir` takes the config
and the durations from a finished run instead (`--startup-s` adds each fold job's seconds before its first step: compilation,
the worker's start; a finished run's fold times hold them already): each member's mean fold time (job start to done
marker) from the folds' `done.json` timelines, replayed on `--gpus` slots.

"barrier" runs the stage groups one after another (sagittal views, axial views, graders, one-stage
members, cross predictions), longest job first within a group, as one Tune run per stage does;
"graph" starts each job once its needs are done, longest critical path first
(`spine_ray.engine.plan`). Prints wall time, GPU busy fraction, the floor (max of critical path and
work / GPUs), the ratio of wall times, and the ratio to the floor.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from spine_ray.core.config import load
from spine_ray.engine.plan import simulate, summary
from spine_ray.engine.stage import FoldJob
from spine_ray.engine.timelines import measured_hours
from spine_ray.pipeline import plan_jobs
from spine_ray.run_config import Member, PipelineConfig
from spine_ray.stages.registry import STAGES

ROOT = Path(__file__).resolve().parents[1]
BARRIERS = ("sagittal", "axial", "grade", "onestage", "cross")
# Training samples/s per unit on one H200 (2026-12-04, the GPU-throughput issue's table: the train
# loop's `fit` at the recipe's batch, bf16, the code of that day). `--rates gpu.json` takes
# benchmarks/gpu.py's figures instead (its units' fit_samples_per_s).
H200_RATES = {"sag_t2": 38.8, "axial": 86.3, "grade_convnext": 90.6, "grade_effnet": 69.2, "onestage": 13.7}
STUDIES = 1975  # the competition's training studies
# Samples a study gives each unit (sagittal: one stack; axial and grade: one per level).
PER_STUDY = {"sag_t2": 1, "axial": 5, "grade_convnext": 5, "grade_effnet": 5, "onestage": 1}
VAL_COST = 1 / 3  # a validation sample (forward only) against a training one
CROSS_HOURS = 0.02  # a cross prediction: one inference pass over a fold's held-out studies


def unit_of(member: Member) -> str:
    """The measured unit whose rate prices a member (stage-1 variants: their view's)."""
    if member.stage == "localize":
        return "sag_t2" if member.name.partition("@")[0].startswith("sag") else "axial"
    if member.stage == "onestage":
        return "onestage"
    return "grade_effnet" if "efficientnet" in member.config.model.backbone else "grade_convnext"


def epochs_of(member: Member) -> int:
    """Epochs of a member's fold: its training, and a two-step member's second step (priced as a full step: an upper bound)."""
    two = getattr(member.config, "two_step", None)
    return member.config.train.epochs + (two.epochs if two is not None else 0)


def validates_each_epoch(member: Member) -> bool:
    """Whether a member's folds pass over their held-out samples after every epoch: only where a step keeps its best
    epoch by a validation metric (`select`; the grade stage's `validate` skips the others, the other stages have none)."""
    stage = STAGES[member.stage]
    if not (hasattr(stage, "validate") and hasattr(stage, "select")):
        return False
    return stage.select(FoldJob(member.stage, member.name, 0, 1, member.config, "", "", {})) is not None


def unit_hours(member: Member, rates: dict[str, float], folds: int, studies: int = STUDIES, startup_s: float = 0.0) -> float:
    """GPU-hours of one fold of a member at its unit's rate: its epochs over the fold's training samples, and the
    held-out samples at a third of the cost, once (the fold's OOF prediction) or after every epoch (`validates_each_epoch`);
    plus `startup_s` seconds the job holds its GPU before its first step (compilation of its batch shapes, the worker's start).

    A stage-1 variant whose backbone is an EfficientNet (unmeasured as a localiser) is priced at
    the graders' EfficientNet / ConvNeXt ratio.
    """
    unit, epochs = unit_of(member), epochs_of(member)
    val_passes = epochs if validates_each_epoch(member) else 1
    samples = PER_STUDY[unit] * studies * (epochs * (folds - 1) / folds + val_passes * VAL_COST / folds)
    hours = samples / rates[unit] / 3600
    if member.stage == "localize" and "efficientnet" in member.config.model.backbone:
        hours *= rates["grade_convnext"] / rates["grade_effnet"]
    return hours + startup_s / 3600


def read_rates(path: str) -> dict[str, float]:
    """Every unit's `fit` samples/s from benchmarks/gpu.py's JSON (the H200 table's for units it lacks)."""
    units = json.loads(Path(path).read_text())["units"]
    return {**H200_RATES, **{k: float(u["fit_samples_per_s"]) for k, u in units.items() if k in H200_RATES}}


def members_table(cfg: PipelineConfig, rates: dict[str, float], studies: int, startup_s: float = 0.0) -> str:
    """A markdown row per trained member: its unit's rate, epochs, GPU-hours per fold and for every fold."""
    lines = [f"{studies} studies, {cfg.folds} folds" + (f", {startup_s:.0f} s of start-up a fold job" if startup_s else ""), "", "| member | unit | samples/s | epochs | GPU-hours per fold | all folds |", "|---|---|---:|---:|---:|---:|"]
    total = 0.0
    for m in cfg.members():
        h = unit_hours(m, rates, cfg.folds, studies, startup_s)
        total += h * cfg.folds
        lines.append(f"| {m.stage}/{m.name} | {unit_of(m)} | {rates[unit_of(m)]:.1f} | {epochs_of(m)} | {h:.2f} | {h * cfg.folds:.2f} |")
    lines.append(f"| all members (cross predictions: {CROSS_HOURS} h a fold each, beside) | | | | | {total:.1f} |")
    return "\n".join(lines) + "\n"


def _t(hours: float) -> str:
    """Hours as `1.23 h`, or as seconds for a CPU run's short jobs."""
    return f"{hours:5.2f} h" if hours >= 0.1 else f"{hours * 3600:5.1f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "jobs" / "rsna2024.yaml"))
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 5])
    ap.add_argument("--scale", type=float, nargs="+", default=[1.0])
    ap.add_argument("--target-gpu-hours", type=float, default=12.0, help="Also the rates scaled to this total (0: not).")
    ap.add_argument("--run-dir", default="", help="Config and per-member durations from this finished run.")
    ap.add_argument("--rates", default="", help="benchmarks/gpu.py's JSON: its measured samples/s instead of the H200 table's.")
    ap.add_argument("--studies", type=int, default=STUDIES, help="training studies of the priced run")
    ap.add_argument("--startup-s", type=float, default=0.0,
                    help="seconds a fold job holds its GPU before its first step (compilation of its batch shapes, the worker's start)")
    ap.add_argument("--json", default="", help="Also write the figures here.")
    args = ap.parse_args()
    rates = read_rates(args.rates) if args.rates else H200_RATES
    cross = CROSS_HOURS
    if args.run_dir:
        cfg = load(PipelineConfig, str(Path(args.run_dir) / "config.yaml"))
        measured = measured_hours(args.run_dir)
        crosses = [v for (stage, _), v in measured.items() if stage == "cross"]
        cross = sum(crosses) / len(crosses) if crosses else 0.0
        hours = lambda m: measured[(m.stage, m.name)]  # noqa: E731
        print(f"{args.run_dir}: measured fold times " + ", ".join(f"{s}/{m} {v * 3600:.1f} s" for (s, m), v in measured.items()))
    else:
        cfg = load(PipelineConfig, args.config)
        hours = lambda m: unit_hours(m, rates, cfg.folds, args.studies, args.startup_s)  # noqa: E731
        print(members_table(cfg, rates, args.studies, args.startup_s))
    rows = []
    today = sum(j.hours for j in plan_jobs(cfg, hours, cross_hours=cross))
    scales = [*args.scale, *([args.target_gpu_hours / today] if args.target_gpu_hours > 0 else [])]
    for scale in scales:
        jobs = plan_jobs(cfg, lambda m, s=scale: s * hours(m), cross_hours=scale * cross)
        for gpus in args.gpus:
            old = summary(simulate(jobs, gpus, BARRIERS), gpus, jobs)
            new = summary(simulate(jobs, gpus), gpus, jobs)
            rows.append({"scale": scale, "gpus": gpus, "jobs": len(jobs), "barrier": old, "graph": new})
            print(f"scale {scale:.2f}, {gpus} GPUs, {len(jobs)} jobs, {_t(new['work_h'])} of work, critical path {_t(new['critical_path_h'])}, "
                  f"floor {_t(new['floor_h'])}")
            for name, s in (("barrier", old), ("graph", new)):
                print(f"  {name:8s} wall {_t(s['wall_h'])}  busy {s['busy']:5.1%}  wall / (work / GPUs) {s['wall_h'] / (s['work_h'] / gpus):.3f}")
            print(f"  graph / barrier wall: {new['wall_h'] / old['wall_h']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
