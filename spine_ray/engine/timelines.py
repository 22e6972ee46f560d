"""What a run's finished folds say about their time: the `done.json` timelines, read back (pure reads, no Ray).

Every fold job of a run, of any stage, writes `{stage}/{member}/fold{k}/done.json` last, with its
timeline (epoch seconds: `trial_started, worker_started, job_started, training_started,
training_finished, finished`, and the `slot` that ran it). `spine-ray report` draws them as the
run's timeline; `measured_hours` turns them into per-member fold times, which set the priorities of
a later run's schedule (`resources.plan_from`) and which `benchmarks/schedule.py --run-dir` replays.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pandas as pd

from spine_ray.core.storage import fs_for
from spine_ray.engine.plan import assign_slots


def fold_files(run_dir: str, name: str) -> Iterator[tuple[str, str, int, Any]]:
    """(stage, member, fold, the open file) for every fold folder of the run that has file `name`, by stage, member and fold."""
    fs, root = fs_for(run_dir)
    for path in sorted(fs.glob(f"{root.rstrip('/')}/*/*/fold*/{name}")):
        stage, member, fold = path.split("/")[-4:-1]
        if fold.removeprefix("fold").isdigit():
            with fs.open(path, "rt") as f:
                yield stage, member, int(fold.removeprefix("fold")), f


def fold_timelines(run_dir: str) -> pd.DataFrame:
    """Every finished fold's span from its done.json: stage, member, fold, start and end (epoch seconds), slot.

    A fold starts when its turn came (its lane's trial or worker start for older markers) and ends
    when its marker was written. Rows are the schedule's slots (`slot` in the timeline) when every
    marker names one, else rows of folds that never overlap (`engine.plan.assign_slots`).
    """
    rows = []
    for stage, member, fold, f in fold_files(run_dir, "done.json"):
        t = json.load(f).get("timeline", {})
        start = t.get("job_started", t.get("worker_started", t.get("trial_started")))
        if start is not None and "finished" in t:
            rows.append({"stage": stage, "member": member, "fold": fold, "start": start, "end": t["finished"], "name": t.get("slot")})
    df = pd.DataFrame(rows, columns=["stage", "member", "fold", "start", "end", "name"])
    if len(df) and df["name"].notna().all():
        names = sorted(df["name"].unique(), key=lambda n: (len(n), n))  # slot2 before slot10
        return df.assign(slot=df["name"].map({n: i for i, n in enumerate(names)})).drop(columns="name")
    return df.drop(columns="name").assign(slot=assign_slots(list(zip(df["start"], df["end"], strict=True))) if len(df) else [])


def measured_hours(run_dir: str) -> dict[tuple[str, str], float]:
    """(stage, member) → the mean wall time of its finished folds in hours, from the run's done.json timelines."""
    t = fold_timelines(run_dir)
    hours = (t["end"] - t["start"]) / 3600
    return {k: float(v) for k, v in hours.groupby([t["stage"], t["member"]]).mean().items()}


__all__ = ["fold_files", "fold_timelines", "measured_hours"]
