"""Replay a run's job graph on N GPUs: stage barriers (today's stage-by-stage order) against one graph.

Usage:
    python benchmarks/schedule.py [--config jobs/rsna2024.yaml] [--gpus 8 5] [--scale 1.0] [--target-gpu-hours 12]
    python benchmarks/schedule.py --run-dir runs/demo/run --gpus 2 [--target-gpu-hours 0]

The graph is the config's fold jobs (`spine_ray.pipeline.plan_jobs`): every view of every
stage-1 member, every grader, every one-stage member and every cross prediction, per fold, with
per-fold needs (axial fold k after sagittal T2 fold k; grader fold k after the three views of the
main localisers' fold k; a cross prediction after its grader fold and the variant's fold k; the
one-stage members need nothing). Durations are GPU-hours per fold (`UNIT_HOURS`, measured on one
H200 in the GPU-throughput issue; the effnet localisers assumed 1.3x the convnext ones); `--scale`
multiplies them all, and `--target-gpu-hours` adds the rates scaled to that total (12: the
GPU-throughput issue's target for the recipe, 27.5 GPU-hours today). `--run-dir` takes the config
and the durations from a finished run instead: each member's mean fold time (job start to done
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
from spine_ray.engine.timelines import measured_hours
from spine_ray.pipeline import plan_jobs
from spine_ray.run_config import Member, PipelineConfig

ROOT = Path(__file__).resolve().parents[1]
BARRIERS = ("sagittal", "axial", "grade", "onestage", "cross")
# GPU-hours per fold on one H200 (2026-12, the GPU-throughput issue): convnext_small localisers,
# graders from their measured samples/s (convnext_small 90.6, efficientnet_b3 69.2 at 20 epochs),
# the one-stage member; a cross prediction is one inference pass over a fold's held-out studies.
UNIT_HOURS = {"sag_t2": 0.34, "sag_t1": 0.34, "axial": 0.51, "convnext": 0.40, "efficientnet": 0.52, "onestage": 0.96, "cross": 0.02}
VARIANT_FACTOR = 1.3  # the effnet stage-1 variant against the convnext localisers (unmeasured)


def unit_hours(member: Member) -> float:
    """GPU-hours of one fold of a member (cross predictions are priced by `plan_jobs`)."""
    if member.stage == "localize":
        view, _, variant = member.name.partition("@")
        return UNIT_HOURS[view] * (VARIANT_FACTOR if variant else 1.0)
    if member.stage == "onestage":
        return UNIT_HOURS["onestage"]
    return UNIT_HOURS["efficientnet" if "efficientnet" in member.config.model.backbone else "convnext"]


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
    ap.add_argument("--json", default="", help="Also write the figures here.")
    args = ap.parse_args()
    hours, cross = unit_hours, UNIT_HOURS["cross"]
    if args.run_dir:
        cfg = load(PipelineConfig, str(Path(args.run_dir) / "config.yaml"))
        measured = measured_hours(args.run_dir)
        crosses = [v for (stage, _), v in measured.items() if stage == "cross"]
        cross = sum(crosses) / len(crosses) if crosses else 0.0
        hours = lambda m: measured[(m.stage, m.name)]  # noqa: E731
        print(f"{args.run_dir}: measured fold times " + ", ".join(f"{s}/{m} {v * 3600:.1f} s" for (s, m), v in measured.items()))
    else:
        cfg = load(PipelineConfig, args.config)
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
