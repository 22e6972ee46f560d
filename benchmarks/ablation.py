"""Ablation of the top teams' methods (issue 14): each switch on vs off, ≥ 2 seeds, CV and held-out test.

    PYTHONPATH=$PWD RAY_USAGE_STATS_ENABLED=0 python benchmarks/ablation.py --out runs/ablation \\
        --studies 60 --test-studies 24 --preset realistic --seeds 0 1

One fixed synthetic set (synthesised once into OUT/data, the preset you name), prepared once. Per
seed, ONE training run whose stage-2 members are the arms (the base member with one switch on, each
named after its switch), so every arm shares the folds and the stage-1 points; stage-1 variants
(cross-ensembling) and the one-stage model enter the same run when their arms are on. Label
cleaning is a second run per seed (the base member retrained without the labels that
`spine-ray clean-labels` flags on the first run's OOF). By default (`--share-stage1`) the seeds are
paired: every seed's run keeps the first seed's folds and stage-1 models (copied, so not
retrained) and only the stage-2 and one-stage members train with their own seed, which halves
the CPU and leaves the arms' differences free of fold-split noise. Every member is then scored:

- out-of-fold CV (the run's cv.json, exact metric);
- on the held-out test studies: each member's own probabilities (`StudyPredictor.member_probs`,
  prior where it predicted nothing), scored against the test labels;
- blends: `tune-ensemble` on all members, and on all members but one (for each), applied to the
  test members' probabilities: the blend with and without each member.

Prints one table (mean ± spread over seeds; prior and oracle beside them) and writes
OUT/ablation.json. A method that does not help on the synthetic data shows as such.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

BASE = "base"
# arm → overrides of the base grade member (keys under grade.N.…), or a special arm.
ARMS: dict[str, list[str]] = {
    BASE: [],
    "two_step": ["two_step={epochs: 2, lr: 0.001, warmup_frac: 0.0, select: last}"],  # step 2 on the frozen backbone
    "freeze": ["freeze={backbone: true, unfreeze_last: 2}"],
    "cutmix": ["mix={cutmix_p: 1.0, mixup_p: 0.0, alpha: 1.0}"],
    "mixup": ["mix={cutmix_p: 0.0, mixup_p: 1.0, alpha: 0.4}"],
}


def _batch_arm(factor: int, rule: str | None, epochs: int = 1) -> Callable[[dict], list[str]]:
    """`factor`× the base member's batch and `epochs`× its epochs (1: 1/factor the steps), its lr by the batch rule, or unchanged."""

    def overrides(base: dict) -> list[str]:
        b, e = int(base["train"]["batch_size"]), int(base["train"]["epochs"])
        return [f"train.batch_size={factor * b}", f"train.epochs={epochs * e}", *([f"train.lr_batch={b}", f"train.lr_rule={rule}"] if rule else [])]

    return overrides


# More work per GPU step (issue 28): not run by default; name them in --arms.
BATCH_ARMS: dict[str, Callable[[dict], list[str]]] = {
    "batch4x_sqrt": _batch_arm(4, "sqrt"), "batch4x_linear": _batch_arm(4, "linear"), "batch4x_same_lr": _batch_arm(4, None),
    # twice the epochs at 4x the batch: about the GPU time of the base where a 4x batch runs 1.9x the samples/s (the H200's bare loop)
    "batch4x_sqrt_2xep": _batch_arm(4, "sqrt", epochs=2),
}
# cross: a second stage-1 member (another seed) and every grader on its points; onestage: the
# one-stage member (stage-1-sized stacks of the base recipe); label_clean: a rerun of the base member
# without the labels the first run's OOF flags.
SPECIAL = ("cross", "onestage", "label_clean")


def arm_members(base: dict, arms: list[str]) -> list[dict]:
    """The grade members of one run: the base member, then one per switch arm (dicts for the config loader)."""
    from spine_ray.core.config import parse_override, set_in

    out = []
    for arm in arms:
        member = json.loads(json.dumps(base))
        member["name"] = arm
        for o in ARMS[arm] if arm in ARMS else BATCH_ARMS[arm](base):
            set_in(member, *parse_override(o))
        out.append(member)
    return out


def reuse_stage1(src: str, dst: str) -> None:
    """Give run `dst` the folds and finished stage-1 folds of run `src` (once): training `dst` skips stage 1."""
    if not os.path.exists(os.path.join(dst, "localize")):
        shutil.copytree(os.path.join(src, "localize"), os.path.join(dst, "localize"))
        shutil.copy(os.path.join(src, "folds.parquet"), os.path.join(dst, "folds.parquet"))


def score_test(run: str, prepared_test: str, labels: pd.DataFrame) -> tuple[dict[str, float], dict[str, np.ndarray], np.ndarray]:
    """Every member's test score, its [n, 25, 3] probabilities, and the prior's [n, 25, 3]."""
    from spine_ray.core.schema import label_matrix
    from spine_ray.data.volumes import read_volumes
    from spine_ray.ensemble.metric import score_arrays
    from spine_ray.infer import StudyPredictor

    predictor = StudyPredictor(run)
    studies = labels["study_id"].astype(int).tolist()
    vols = read_volumes(prepared_test)
    probs: dict[str, list[np.ndarray]] = {}
    for s in studies:
        members, _ = predictor.member_probs(vols[vols["study_id"] == s].reset_index(drop=True))
        for m, p in members.items():
            probs.setdefault(m, []).append(p)
    y = label_matrix(labels)
    stacked = {m: np.stack(p) for m, p in probs.items()}
    prior = np.broadcast_to(predictor.prior, (len(studies), *predictor.prior.shape))
    return {m: score_arrays(y, p).score for m, p in stacked.items()}, stacked, prior


def blend_scores(run: str, members: list[str], test_probs: dict[str, np.ndarray], y: np.ndarray, work: str, seed: int) -> dict[str, dict]:
    """`tune-ensemble` on every member and on every member but one: CV (held-out halves) and test score of each blend."""
    from spine_ray.ensemble.blend import apply_blend, load_blend
    from spine_ray.ensemble.metric import score_arrays
    from spine_ray.ensemble.tune_ensemble import tune_ensemble

    out = {}
    oof = pd.read_parquet(Path(run) / "oof.parquet")
    for left_out in [None, *members]:
        keep = [m for m in members if m != left_out]
        if not keep:
            continue
        sub = Path(work) / f"blend-without-{left_out or 'none'}"
        sub.mkdir(parents=True, exist_ok=True)
        for f in ("folds.parquet", "train_labels.csv", "prior.csv"):
            shutil.copy(Path(run) / f, sub / f)
        oof[oof["member"].isin(keep)].to_parquet(sub / "oof.parquet", index=False)
        rep = tune_ensemble(str(sub), seed=seed)
        blend = load_blend(str(sub / "blend.json"))
        test = score_arrays(y, apply_blend(blend, {m: test_probs[m] for m in blend.members})).score
        out[left_out or "(none)"] = {"cv_held_out": rep["scores"]["blend, halves (held-out)"]["score"], "test": test}
    return out


def main() -> None:
    """Synthesise, prepare, train each seed's arms, score; print and write the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--config", default="jobs/demo.yaml", help="the base recipe: its first grade member is the base arm")
    ap.add_argument("--studies", type=int, default=60)
    ap.add_argument("--test-studies", type=int, default=24)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--preset", default="realistic")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--arms", nargs="+", default=[*ARMS, *SPECIAL], choices=[*ARMS, *BATCH_ARMS, *SPECIAL])
    ap.add_argument("--share-stage1", action=argparse.BooleanOptionalAction, default=True,
                    help="every seed reuses the first seed's folds, stage-1 models (main and cross) and sample caches; "
                         "only the stage-2 and one-stage members' seeds change (paired arms, half the CPU)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override for every run, e.g. grade.0.train.epochs=2")
    args = ap.parse_args()

    from spine_ray.core.config import from_dict, load, to_dict
    from spine_ray.core.schema import label_matrix, read_labels, read_submission
    from spine_ray.data.ingest import prepare
    from spine_ray.ensemble.metric import score_arrays, score_frames
    from spine_ray.label_clean import clean_labels
    from spine_ray.pipeline import train
    from spine_ray.run_config import PipelineConfig
    from spine_ray.synth.generate import generate
    from spine_ray.synth.study import SynthConfig

    out = os.path.abspath(args.out)
    data, prepared, prepared_test = (os.path.join(out, d) for d in ("data", "prepared", "prepared_test"))
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(data, "manifest.json")):
        generate(data, from_dict(SynthConfig, {"studies": args.studies, "test_studies": args.test_studies, "preset": args.preset,
                                               "acquisition": {"image_sizes": [args.image_size]}}), workers=0)
    for dst, split in ((prepared, "train"), (prepared_test, "test")):
        if not os.path.exists(os.path.join(dst, "manifest.json")):
            prepare(data, dst, split)
    labels = read_labels(os.path.join(data, "test_labels.csv"))
    y = label_matrix(labels)
    oracle = score_frames(labels, read_submission(os.path.join(data, "oracle_submission.csv"))).score
    switch_arms = [a for a in args.arms if (a in ARMS or a in BATCH_ARMS) and a != BASE]
    results: dict = {"arms": args.arms, "seeds": {}, "oracle_test": oracle, "preset": args.preset, "studies": args.studies,
                     "test_studies": args.test_studies}
    first = args.seeds[0]
    for seed in args.seeds:
        pipe_seed = first if args.share_stage1 else seed  # folds and stage-1 models
        base_cfg = load(PipelineConfig, args.config, args.overrides)
        base_member = to_dict(base_cfg.grade[0])
        members = arm_members(base_member, [BASE, *switch_arms])
        for m in members:
            m["train"]["seed"] = seed
        run = os.path.join(out, f"seed{seed}", "run")
        over = [f"prepared={prepared}", f"run_dir={run}", f"seed={pipe_seed}", f"oracle={os.path.join(data, 'oracle_train.csv')}",
                f"grade={json.dumps(members)}"]
        if pipe_seed != seed:
            run0 = os.path.join(out, f"seed{pipe_seed}", "run")
            reuse_stage1(run0, run)
            over.append(f"samples_dir={os.path.join(run0, 'samples')}")
        if "cross" in args.arms:
            loc = to_dict(base_cfg.localize)
            for view in loc.values():
                view["train"]["seed"] = pipe_seed + 100
            over.append(f"localize_variants={json.dumps([{'name': 'cross', 'localize': loc}])}")
        if "onestage" in args.arms:
            sag = base_cfg.localize.sag_t2
            net = {**to_dict(sag.model), "n_points": 15}
            over.append("onestage=" + json.dumps([{"name": "onestage", "model": {"net": net}, "slices": sag.slices, "size": sag.size,
                                                   "train": {**to_dict(sag.train), "seed": seed}}]))
        cfg = load(PipelineConfig, args.config, [*args.overrides, *over])
        report = train(cfg)
        cv = {m: s["score"] for m, s in report["grade"]["members"].items()}
        test, probs, prior = score_test(run, prepared_test, labels)
        seed_res = {"cv": cv, "test": test, "prior_cv": report["grade"]["prior"]["score"],
                    "prior_test": score_arrays(y, np.ascontiguousarray(prior)).score}
        if "label_clean" in args.arms:
            flags = clean_labels(run, synthetic=data)
            seed_res["label_flags"] = {"flagged": int(flags.counts["flagged"].sum()), "judged": int(flags.counts["judged"].sum()),
                                       **({k: float(getattr(flags.recovery, k)) for k in ("flipped", "hits", "precision", "recall")} if flags.recovery else {})}
            run2 = os.path.join(out, f"seed{seed}", "run_cleaned")
            reuse_stage1(run, run2)
            members2 = [dict(members[0], name="label_clean")]
            cfg2 = load(PipelineConfig, args.config, [*args.overrides, f"prepared={prepared}", f"run_dir={run2}", f"seed={pipe_seed}",
                                                      "localize_variants=[]", "onestage=[]",
                                                      f"grade={json.dumps(members2)}", f"exclude_labels={os.path.join(run, 'label_flags.parquet')}"])
            rep2 = train(cfg2)
            cv["label_clean"] = rep2["grade"]["members"]["label_clean"]["score"]
            t2, p2, _ = score_test(run2, prepared_test, labels)
            test["label_clean"] = t2["label_clean"]
            probs["label_clean"] = p2["label_clean"]
            # The cleaned member joins the first run's OOF so the blends can weigh it too.
            oof = pd.concat([pd.read_parquet(os.path.join(run, "oof.parquet")), pd.read_parquet(os.path.join(run2, "oof.parquet"))])
            oof.to_parquet(os.path.join(run, "oof.parquet"), index=False)
        seed_res["blends"] = blend_scores(run, sorted(cv), probs, y, os.path.join(out, f"seed{seed}", "blends"), seed)
        results["seeds"][seed] = seed_res
        Path(out, "ablation.json").write_text(json.dumps(results, indent=2))
    results["seconds"] = time.perf_counter() - t0
    Path(out, "ablation.json").write_text(json.dumps(results, indent=2))
    print(table(results))


def table(results: dict) -> str:
    """Mean ± half-range over seeds: each arm's CV and test score, each blend with / without a member."""
    seeds = list(results["seeds"].values())

    def stat(values: list[float]) -> str:
        v = np.asarray(values, dtype=float)
        return f"{v.mean():.4f} ± {np.ptp(v) / 2:.4f}"

    lines = [f"{len(seeds)} seeds, {results['studies']} training / {results['test_studies']} test studies, preset {results['preset']}",
             f"{'':28}{'OOF CV':>20}{'test':>20}",
             f"{'prior':28}{stat([s['prior_cv'] for s in seeds]):>20}{stat([s['prior_test'] for s in seeds]):>20}",
             f"{'oracle':28}{'':>20}{results['oracle_test']:>20.4f}"]
    for m in sorted(seeds[0]["test"]):
        lines.append(f"{'member ' + m:28}{stat([s['cv'][m] for s in seeds]):>20}{stat([s['test'][m] for s in seeds]):>20}")
    for k in seeds[0]["blends"]:
        name = "blend, all members" if k == "(none)" else f"blend without {k}"
        lines.append(f"{name:28}{stat([s['blends'][k]['cv_held_out'] for s in seeds]):>20}{stat([s['blends'][k]['test'] for s in seeds]):>20}")
    for i, s in enumerate(seeds):
        if "label_flags" in s:
            f = s["label_flags"]
            lines.append(f"label cleaning, seed {i}: flagged {f['flagged']} of {f['judged']}"
                         + (f"; precision {f['precision']:.2f}, recall {f['recall']:.2f} against the {f['flipped']:.0f} flipped" if "precision" in f else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
