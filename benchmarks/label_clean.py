"""OOF label cleaning on synthetic labels whose noise is known: flagged count, precision and recall vs the base rate.

    nice -n 10 .venv/bin/python benchmarks/label_clean.py --studies 2000 --seed 0

Three stand-ins for an out-of-fold ensemble, all on the same draw of the label model:
- `oracle`: the label model's exact P(label | latent), the ideal OOF (a perfect model of the images);
- `ensemble`: the mean of the four faulty members of `spine_ray.synth.oof` (over- and under-confident,
  biased with missing rows, weak and noisy), written as a run directory and flagged by the same
  `clean_labels` that `spine-ray clean-labels` runs;
- `noisy`: one member with logit noise sd 2.0 (a poorly calibrated single model), same path;
- `prior`: the out-of-fold prior (no image information), the baseline a flagger must beat.
A label is flipped when it differs from its noiseless grade (latent thresholded at 0, 1). Precision is
reported with its lift over the base rate (the precision of flagging at random, same run). Under the
oracle a correct label always keeps p(label) ≥ ~0.42 (it is the modal grade of its latent), so the
oracle's precision is 100% below that by construction; its recall is the ceiling for a threshold.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from spine_ray.core.schema import LABEL_COLUMNS, label_matrix, labels_from_matrix, read_labels
from spine_ray.engine.folds import assign_folds
from spine_ray.ensemble.prior import oof_prior
from spine_ray.label_clean import clean_labels, flag_labels, noise_recovery
from spine_ray.synth.labels import sample_labels
from spine_ray.synth.oof import MemberSpec, synthetic_run

THRESHOLDS = (0.02, 0.05, 0.1, 0.2, 0.3)


def main() -> None:
    """Flag each stand-in OOF at every threshold and print count, precision, recall, base rate and lift."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        run, data = f"{tmp}/run", f"{tmp}/data"
        t0 = time.perf_counter()
        synthetic_run(run, n_studies=args.studies, seed=args.seed)
        synthetic_run(f"{tmp}/noisy", n_studies=args.studies, seed=args.seed, members={"noisy": MemberSpec(2.0)})
        # synthetic_run draws the labels first from default_rng(seed): the same draw gives its latents.
        labels, latent, oracle = sample_labels(args.studies, np.random.default_rng(args.seed))
        assert (label_matrix(read_labels(f"{run}/train_labels.csv")) == labels).all(), "synthetic_run drew other labels"
        studies = list(range(1000, 1000 + args.studies))
        lat = pd.DataFrame(latent, columns=list(LABEL_COLUMNS))
        lat.insert(0, "study_id", studies)
        Path(data).mkdir()
        lat.to_csv(f"{data}/latent.csv", index=False)
        folds = assign_folds(labels_from_matrix(studies, labels), 5, args.seed)["fold"].to_numpy()
        prior = oof_prior(labels, folds)
        setup_s = time.perf_counter() - t0

        print(f"{args.studies} synthetic studies, seed {args.seed} (set-up {setup_s:.1f} s)")
        print(f"{'OOF':<9} {'threshold':>9} {'flagged':>8} {'precision':>9} {'recall':>7} {'base rate':>9} {'lift':>6} {'judged':>7} {'flipped':>7}")
        for thr in THRESHOLDS:
            rows = {
                "oracle": noise_recovery(flag_labels(oracle, labels, studies, thr), lat),
                "ensemble": clean_labels(run, thr, synthetic=data).recovery,
                "noisy": clean_labels(f"{tmp}/noisy", thr, synthetic=data).recovery,
                "prior": noise_recovery(flag_labels(prior, labels, studies, thr), lat),
            }
            for name, r in rows.items():
                lift = r.precision / r.base_rate if r.flagged else float("nan")
                print(f"{name:<9} {thr:>9.2f} {r.flagged:>8d} {r.precision:>9.1%} {r.recall:>7.1%} {r.base_rate:>9.1%} {lift:>5.1f}x {r.judged:>7d} {r.flipped:>7d}")


if __name__ == "__main__":
    main()
