"""Stage-2 cross-validation on a synthetic dataset: the graders against the prior and the oracle, same folds.

Trains each member of a YAML list of GradeConfigs (e.g. the `grade:` list of jobs/demo.yaml)
fold by fold with the plain loop, fills targets the graders did not predict with the fold's
prior, and reports the pooled OOF score of each member and of their mean next to the OOF prior
and the synth oracle, as the fraction of the prior → oracle gap closed, (prior − cv) / (prior − oracle).
Crop centres at validation come from `--points` (a stage-1 points table) or, by default, from
the label points plus noise (`grade.fake_points`). One-stage members (an `onestage:` list) need no
points; they predict spinal and foraminal targets only, the rest come from the prior.

    python benchmarks/grade_cv.py DATA PREPARED RUN --members members.yaml --folds 3
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def main() -> None:
    """Train every member on every fold; print per-member and ensemble scores."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="synth output (train.csv, oracle_train.csv)")
    ap.add_argument("prepared", help="its `spine-ray prepare` output")
    ap.add_argument("run", help="a folder for folds, points and OOF tables")
    ap.add_argument("--members", required=True, help="YAML: a list of GradeConfig mappings, or a mapping with `grade:` and/or `onestage:` lists")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--points", help="stage-1 points table; default: label points plus noise")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from spine_ray.core.config import from_dict
    from spine_ray.core.schema import LABEL_COLUMNS, PROB_COLUMNS, label_matrix, read_labels
    from spine_ray.engine.fold import run_fold
    from spine_ray.engine.folds import assign_folds
    from spine_ray.engine.stage import FoldJob
    from spine_ray.ensemble.metric import score_arrays, score_frames
    from spine_ray.ensemble.prior import oof_prior
    from spine_ray.stages.grade.config import GradeConfig
    from spine_ray.stages.grade.samples import fake_points
    from spine_ray.stages.grade.stage import GradeStage
    from spine_ray.stages.onestage import OneStageConfig, OneStageStage

    torch.set_num_threads(args.threads)
    run = Path(args.run)
    run.mkdir(parents=True, exist_ok=True)
    labels = read_labels(f"{args.data}/train.csv")
    folds = assign_folds(labels, args.folds, 0)
    folds.to_parquet(run / "folds.parquet")
    points = args.points
    if points is None:
        points = str(run / "points.parquet")
        fake_points(pd.read_parquet(f"{args.prepared}/labels.parquet"), np.random.default_rng(1)).to_parquet(points)
    spec = yaml.safe_load(Path(args.members).read_text())
    members = [("grade", GradeStage(), from_dict(GradeConfig, m)) for m in (spec.get("grade", []) if isinstance(spec, dict) else spec)]
    members += [("onestage", OneStageStage(), from_dict(OneStageConfig, m)) for m in (spec.get("onestage", []) if isinstance(spec, dict) else [])]

    lm = label_matrix(labels)
    fold_of = folds.set_index("study_id").loc[labels["study_id"], "fold"].to_numpy()
    prior = oof_prior(lm, fold_of)
    index = {int(s): i for i, s in enumerate(labels["study_id"])}
    oracle = score_frames(labels, pd.read_csv(f"{args.data}/oracle_train.csv")).score
    base = score_arrays(lm, prior).score

    def score(oof: pd.DataFrame):
        probs = prior.copy()
        mean = oof.groupby("row_id")[list(PROB_COLUMNS)].mean()
        for rid, p in zip(mean.index, mean.to_numpy(), strict=True):
            study, target = rid.split("_", 1)
            probs[index[int(study)], LABEL_COLUMNS.index(target)] = p
        return score_arrays(lm, probs)

    oofs = []
    pb = score_arrays(lm, prior)
    print(f"{len(labels)} studies, {args.folds} folds; prior {base:.4f} (spinal {pb.spinal:.4f}, foraminal {pb.foraminal:.4f}), oracle {oracle:.4f}")
    for kind, stage, cfg in members:
        t = time.perf_counter()
        parts = []
        for fold in range(args.folds):
            job = FoldJob(kind, cfg.name, fold, args.folds, cfg, args.prepared, str(run), {"points": points} if kind == "grade" else {})
            parts.append(run_fold(stage, job, device=torch.device("cpu"))[2])
        oof = pd.concat(parts, ignore_index=True)
        oof.to_parquet(run / f"oof_{cfg.name}.parquet")
        oofs.append(oof)
        cv = score(oof)
        print(f"  {cfg.name:20s} cv {cv.score:.4f}  gap closed {(base - cv.score) / (base - oracle):.3f}  {time.perf_counter() - t:.0f} s"
              f"  (spinal {cv.spinal:.4f}, foraminal {cv.foraminal:.4f}, any-severe {cv.any_severe_spinal:.4f})")
    if len(oofs) > 1:
        cv = score(pd.concat(oofs)).score
        print(f"  {'mean of members':20s} cv {cv:.4f}  gap closed {(base - cv) / (base - oracle):.3f}")


if __name__ == "__main__":
    main()
