"""Benchmark the blend search: evaluations per second of `tune-ensemble` against two baselines, same run.

- batched (the default): each Ray Tune trial runs one whole Optuna study in its actor; three such
  studies (all folds, half A, half B) as parallel Tune trials; member matrix in the object store.
- per-trial: one Ray Tune trial per blend, suggested by OptunaSearch (the textbook Tune form).
- naive: no Tune; each evaluation re-reads oof.parquet, re-aligns it with pandas and scores.

    PYTHONPATH=$PWD RAY_USAGE_STATS_ENABLED=0 python benchmarks/tune_ensemble.py --studies 1975 --trials 1000
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np
import pandas as pd

from spine_ray.baseline import read_prior_table
from spine_ray.blend import apply_blend, make_blend, member_matrix
from spine_ray.metric import score_arrays
from spine_ray.schema import label_matrix, read_labels
from spine_ray.synth.oof import synthetic_run
from spine_ray.tune_ensemble import tune_ensemble


def naive_rate(run_dir: str, evaluations: int, seed: int) -> float:
    """Evaluations/s when every evaluation re-reads and re-aligns the OOF table with pandas."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    for _ in range(evaluations):
        labels = read_labels(os.path.join(run_dir, "train_labels.csv"))
        oof = pd.read_parquet(os.path.join(run_dir, "oof.parquet"))
        prior = read_prior_table(pd.read_csv(os.path.join(run_dir, "prior.csv")))
        members = sorted(oof["member"].unique())
        mm = member_matrix(oof, labels["study_id"].tolist(), members, prior)
        blend = make_blend(members, rng.random((3, len(members))), rng.uniform(0.5, 2.0, 3), rng.uniform(0.5, 3.0))
        score_arrays(label_matrix(labels), apply_blend(blend, dict(zip(members, mm.probs, strict=True))))
    return evaluations / (time.perf_counter() - t0)


def main() -> None:
    """Run the three ways on one synthetic run directory and print evaluations/s and ratios."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=1975)
    ap.add_argument("--trials", type=int, default=1000, help="per search, batched mode")
    ap.add_argument("--per-trial-trials", type=int, default=100, help="per search, per-trial mode")
    ap.add_argument("--naive", type=int, default=20, help="naive evaluations")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    run_dir = tempfile.mkdtemp(prefix="bench-blend-")
    synthetic_run(run_dir, n_studies=args.studies, seed=args.seed)
    rows = {}
    ways = (("batched", args.trials), ("batched", args.per_trial_trials), ("per-trial", args.per_trial_trials))
    for mode, trials in ways:
        t0 = time.perf_counter()
        r = tune_ensemble(run_dir, trials=trials, seed=args.seed, mode=mode)
        s = r["search"]
        rows[f"{mode} {trials}"] = (s["evaluations"], s["seconds"], s["evaluations_per_s"], time.perf_counter() - t0, r["scores"])
        print(f"{mode} {trials}: seconds per search {s['seconds_per_search']}")
    naive = naive_rate(run_dir, args.naive, args.seed)

    buf = io.StringIO()
    print(f"{args.studies} studies, 4 members, {os.cpu_count()} CPUs", file=buf)
    print(f"{'way (trials per search)':<24}{'evaluations':>12}{'search s':>10}{'eval/s':>9}{'wall s':>9}{'vs naive':>10}{'held-out':>10}{'all folds':>10}", file=buf)
    for way, (n, sec, rate, wall, scores) in rows.items():
        print(f"{way:<24}{n:>12}{sec:>10.1f}{rate:>9.1f}{wall:>9.1f}{rate / naive:>9.1f}×"
              f"{scores['blend, halves (held-out)']['score']:>10.4f}{scores['blend, fitted on all folds (in-sample)']['score']:>10.4f}", file=buf)
    print(f"{'naive':<24}{args.naive:>12}{args.naive / naive:>10.1f}{naive:>9.1f}{'':>9}{1.0:>9.1f}×", file=buf)
    b, p = rows[f"batched {args.per_trial_trials}"][2], rows[f"per-trial {args.per_trial_trials}"][2]
    print(f"batched / per-trial at {args.per_trial_trials} trials per search: {b / p:.1f}×", file=buf)
    print(buf.getvalue())


if __name__ == "__main__":
    main()
