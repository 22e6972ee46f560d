"""Does the real recipe learn at real size? One fold of its ConvNeXt grader and of its one-stage member (issue 28, item 6).

A prepared script for the bare GPU machine, like `benchmarks/gpu.py` (no DICOM, no pydicom; Ray only
where its archive is unpacked). It synthesises --studies studies of the `realistic` preset (its
anatomy, scanner contrast and 384-640 px acquisition; one continuous axial stack a study, every
series present, label points at the structures' true positions: `gpu.synth_study`) straight into
a prepared volumes table, deals them into --folds study-level folds, and trains fold --fold of each
--members member of `jobs/rsna2024.yaml` (networks built with pretrained=False: nothing can be
downloaded there) for as many epochs as its share of --budget-s admits at its measured rate
(`--rates gpu.json` from `benchmarks/gpu.py`'s run on the same machine, else the issue's H200
rates; capped at the recipe's epochs; --epochs fixes them). Then it scores the held-out studies
with the competition metric (`ensemble.metric.score_arrays`), each member's predictions with the
training folds' prior where it predicts nothing (the one-stage member predicts spinal and
foraminal targets only), against the prior alone and the oracle (the generator's own
probabilities), the member-minus-prior difference with a paired bootstrap over the held-out
studies (5-95 %). Grade crops sit on the label points plus stage-1-like noise (`fake_points`), as in
`benchmarks/grade_cv.py`: no stage 1 is trained.

The real path is the one `spine-ray train` runs: a one-worker Ray Train `TorchTrainer` on the fold
driver with Ray Data augmentation (`gpu.ray_fit`) where Ray is importable, else the in-process
driver (`engine.fold.run_fold`, augmentation on the training thread: slower, the same models).
Samples are built in a process pool before CUDA starts.

On the GPU machine it is the second step of `benchmarks/device_run.py` (one call: `gpu.py` first,
then this script with what is left of the deadline, its epochs sized by the rates just measured,
`--rates $OUT/gpu.json`). Alone, run timeout >= --budget-s + 60 s:

    [ -d /tmp/site ] || { mkdir -p /tmp/site && tar xJf .whl/ray-site.tar.xz -C /tmp/site; }; PYTHONPATH=/tmp/site:. RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1 python3 benchmarks/gpu_learn.py --rates gpu.json --budget-s 300 --json $OUT/learn.json 2>&1 | tee $OUT/learn.log

The one-stage member trains first: whether it learns at real size is the open question (the grader
learns at the demo's). Estimated from the H200 rates of the issue and this machine's synthesis, not
yet timed there: 100 studies synthesised and their samples built in 1-1.5 min on 16 cores (≈ 12 CPU-s
a realistic study here, mostly the renderer's texture), then each member its share of what is left,
--overhead-s (50 s) of it starting Ray Train and compiling: with --budget-s 300 the grader (400
training samples a fold) gets about 5-9 of its 20 epochs, the one-stage member (80) about 4-6 of 30;
faster compiled rates in gpu.json give more, and the recipe's full epochs need about 7 minutes.

On CPU, tiny (tests/test_gpu_learn.py runs it with Ray, pydicom, optuna, s3fs and MLflow made unimportable):

    PYTHONPATH=. python benchmarks/gpu_learn.py --size tiny --preset simple --studies 6 --folds 2 --epochs 1 --device cpu --no-ray
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks.gpu import (  # noqa: E402
    IMAGE_SIZE,
    ROOT,
    UNITS,
    fit_resources,
    ray_fit,
    ray_unusable,
    recipe,
    save_json,
    synth_ids,
    synth_labels,
    synth_prepared,
    with_epochs,
    workspace,
)
from spine_ray.core.schema import LABEL_COLUMNS, label_matrix, labels_from_matrix  # noqa: E402
from spine_ray.data.volumes import LABELS_FILE, MANIFEST  # noqa: E402
from spine_ray.engine.fold import run_fold  # noqa: E402
from spine_ray.engine.folds import assign_folds  # noqa: E402
from spine_ray.engine.sample_cache import (  # noqa: E402
    cache_input,
    count_samples,
    ensure_cache,
    split_studies,
)
from spine_ray.engine.stage import FoldJob, Stage, fold_dir, job_key  # noqa: E402
from spine_ray.engine.tracking import METRICS_FILE  # noqa: E402
from spine_ray.ensemble.blend import member_matrix  # noqa: E402
from spine_ray.ensemble.metric import score_arrays  # noqa: E402
from spine_ray.ensemble.prior import fit_prior  # noqa: E402
from spine_ray.stages.grade.samples import fake_points  # noqa: E402
from spine_ray.stages.registry import STAGES  # noqa: E402

MEMBERS = ("onestage:onestage_convnext_small", "grade:convnext_small")  # the open question first: does the one-stage member learn?
UNIT_OF = {("grade", "convnext_small"): "grade_convnext", ("onestage", "onestage_convnext_small"): "onestage"}  # gpu.py's unit keys


def build_cache(stage: Stage, job: FoldJob, split: str, root: str, workers: int) -> str:
    """A split's finished sample cache, its parts built in a process pool (before CUDA starts); its URL."""
    if workers <= 1:
        return ensure_cache(stage, job, split, root, parallel=False)[0]
    with ProcessPoolExecutor(workers) as pool:
        return ensure_cache(stage, job, split, root, parallel=False, pool=pool)[0]


def prepared_synthesis(out: Path, studies: int, image_size: int, seed: int, workers: int, preset: str) -> pd.DataFrame:
    """The synthetic prepared output at `out` (made now, or kept from an earlier run with the same settings); its wide labels."""
    manifest = out / MANIFEST  # written last: its presence means a finished synthesis
    if not manifest.exists():
        shutil.rmtree(out, ignore_errors=True)  # an unfinished one (a stopped run): start again
        return synth_prepared(out, studies, image_size, seed, workers, preset)
    made = json.loads(manifest.read_text())["config"]
    wanted = {"image_size": image_size, "seed": seed, "preset": preset, "studies": studies}
    if made != wanted:
        raise SystemExit(f"{out} holds a synthesis of {made}, not {wanted}: give another --work")
    return labels_from_matrix(synth_ids(studies), synth_labels(studies, seed)[0])


def training_subset(folds: pd.DataFrame, fold: int, n: int, seed: int) -> pd.DataFrame:
    """The folds table with the held-out fold whole and `n` of the other studies (drawn by `seed`); the rest left out."""
    held = folds["fold"] == fold
    others = folds.loc[~held, "study_id"].to_numpy()
    if not 0 < n <= len(others):
        raise SystemExit(f"--train-studies {n}: the training folds hold {len(others)} studies")
    keep = set(np.random.default_rng([seed, 7]).choice(others, n, replace=False).tolist())
    return folds[held | folds["study_id"].isin(keep)].reset_index(drop=True)


def fold_epochs(n_train: int, rate: float, seconds: float, cap: int) -> int:
    """Epochs of `n_train` samples at `rate` samples/s that fit in `seconds` (1..cap)."""
    return int(min(cap, max(1, seconds * rate // max(n_train, 1))))


def unit_rates(path: str | None, cuda: bool) -> dict[str, float]:
    """Fit samples/s per gpu.py unit: a gpu.py JSON's where given (and measured), else the issue's H200 figures on a GPU."""
    rates = {u.key: u.issue[0] for u in UNITS} if cuda else {}
    if path and Path(path).exists():
        units = json.loads(Path(path).read_text()).get("units", {})
        rates.update({k: float(r["fit_samples_per_s"]) for k, r in units.items() if r.get("fit_samples_per_s")})
    return rates


def member_probs(oof: pd.DataFrame, studies: list[int], prior: np.ndarray) -> tuple[np.ndarray, int]:
    """Probabilities [n, 25, 3] for `studies`: the member's where its OOF table has a row, the prior elsewhere
    (`ensemble.blend.member_matrix`, as the blend aligns them); and how many rows it gave."""
    member = str(oof["member"].iloc[0]) if len(oof) else ""
    m = member_matrix(oof, studies, [member], prior)
    return m.probs[0], len(studies) * len(LABEL_COLUMNS) - m.filled[member]


def paired_bootstrap(labels: np.ndarray, a: np.ndarray, b: np.ndarray, draws: int, seed: int = 0) -> tuple[float, float]:
    """5th and 95th percentiles of score(a) - score(b) over studies drawn with replacement (both scored on the same draw)."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(draws):
        i = rng.integers(0, len(labels), len(labels))
        try:
            diffs.append(score_arrays(labels[i], a[i]).score - score_arrays(labels[i], b[i]).score)
        except ValueError:  # a draw without a scored label of some condition: skip it
            continue
    return (float(np.nanpercentile(diffs, 5)), float(np.nanpercentile(diffs, 95))) if diffs else (float("nan"), float("nan"))


def train_member(stage: Stage, job: FoldJob, device: torch.device, use_ray: bool, resources: Any) -> tuple[pd.DataFrame, list[dict]]:
    """Train the fold the way `spine-ray train` would here, afresh (a reused --work's earlier fold and Ray run are removed);
    its OOF table and per-epoch metrics."""
    shutil.rmtree(fold_dir(job), ignore_errors=True)
    shutil.rmtree(Path(job.run_dir) / "ray" / job_key(job), ignore_errors=True)
    if use_ray:
        ray_fit(stage, job, resources)
        out = Path(fold_dir(job))
        return pd.read_parquet(out / "oof.parquet"), [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    epochs: list[dict] = []
    _, _, oof = run_fold(stage, job, device=device, on_epoch_end=lambda r: epochs.append(dict(r.metrics)))
    return oof, epochs


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Synthesise, train one fold of each member, score the held-out studies; returns what --json writes."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "jobs" / "rsna2024.yaml"))
    ap.add_argument("--members", nargs="+", default=list(MEMBERS), help="stage:member of the recipe")
    ap.add_argument("--studies", type=int, default=100)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--fold", type=int, default=0, help="the held-out fold")
    ap.add_argument("--train-studies", type=int, default=0, help="train on this many of the training folds' studies (0: all): a learning curve on one held-out fold")
    ap.add_argument("--preset", choices=("realistic", "simple"), default="realistic")
    ap.add_argument("--size", choices=("real", "tiny"), default="real", help="tiny: timm's test_* networks at 64 px, for CPU")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--budget-s", type=float, default=300.0, help="wall clock for everything; the members share what synthesis leaves")
    ap.add_argument("--overhead-s", type=float, default=50.0, help="a member's time outside its epochs (start, compilation, prediction)")
    ap.add_argument("--rates", help="benchmarks/gpu.py's JSON: its fit samples/s size the epochs")
    ap.add_argument("--epochs", type=int, default=0, help="epochs for every member (0: from the budget)")
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--no-ray", action="store_true", help="the in-process driver even where Ray is importable")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--work", help="working folder (default: a temporary one, removed at the end); a finished synthesis there is reused")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=0, help="processes synthesising and building samples (0: every core; tiny: 1)")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    tiny = args.size == "tiny"
    why_not_ray = ray_unusable(args.no_ray)
    use_ray = why_not_ray is None
    with workspace(args.work, "bench-learn-") as work:
        workers = args.workers or (1 if tiny else max(1, min(args.studies, os.cpu_count() or 1)))
        prepared = work / "prepared"
        wide = prepared_synthesis(prepared, args.studies, IMAGE_SIZE[args.size], args.seed, workers, args.preset)
        oracle = synth_labels(args.studies, args.seed)[2]
        folds = assign_folds(wide, args.folds, args.seed)
        if args.train_studies:
            folds = training_subset(folds, args.fold, args.train_studies, args.seed)
        tag = f"train{args.train_studies or 'all'}"  # a run's folds, models and sample caches: one folder per training set
        run = work / f"run-{tag}"
        run.mkdir(exist_ok=True)
        folds.to_parquet(run / "folds.parquet")
        fake_points(pd.read_parquet(prepared / LABELS_FILE), np.random.default_rng(args.seed)).to_parquet(work / "points.parquet")
        cfg = recipe(args.config, prepared, run, tiny)
        jobs = []
        for spec in args.members:
            stage_name, member = spec.split(":", 1)
            stage, config = STAGES[stage_name], cfg.member(stage_name, member).config
            inputs = {"points": str(work / "points.parquet")} if stage_name == "grade" else {}
            job = FoldJob(stage_name, member, args.fold, args.folds, config, str(prepared), str(run), inputs)
            urls = {cache_input(s): build_cache(stage, job, s, str(run / "samples"), workers) for s in ("train", "val")}
            jobs.append((stage, dataclasses.replace(job, inputs={**inputs, **urls})))
        prep_s = time.perf_counter() - start
        # Only now: the pools above were forked from a process that had not touched CUDA.
        device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
        if device.type == "cpu" and tiny:
            torch.set_num_threads(1)  # restored by `workspace`
        resources = fit_resources(cfg, device.type == "cuda", use_ray)
        rates = unit_rates(args.rates, device.type == "cuda")

        lm = label_matrix(wide)
        ids = [int(s) for s in wide["study_id"]]
        fold_of = folds.set_index("study_id")["fold"].reindex(ids).to_numpy()  # NaN: left out by --train-studies
        held, trained = fold_of == args.fold, ~np.isnan(fold_of) & (fold_of != args.fold)
        held_ids = [s for s, h in zip(ids, held, strict=True) if h]
        prior = fit_prior(lm[trained])
        prior_probs = np.broadcast_to(prior, (int(held.sum()), len(LABEL_COLUMNS), 3)).copy()
        base = score_arrays(lm[held], prior_probs).as_dict()
        best = score_arrays(lm[held], oracle[held]).as_dict()
        meta = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", "torch": torch.__version__,
                "studies": args.studies, "held_out": int(held.sum()), "train_studies": int(trained.sum()), "folds": args.folds, "fold": args.fold, "preset": args.preset,
                "size": args.size, "ray": use_ray, "why_not_ray": why_not_ray, "prep_s": prep_s, "budget_s": args.budget_s}
        results: dict[str, Any] = {"meta": meta, "prior": base, "oracle": best, "members": {}}
        print(f"{args.studies} {args.preset} studies and their samples in {prep_s:.0f} s; held-out fold {args.fold}: {int(held.sum())} studies;"
              f" prior {base['score']:.4f}, oracle {best['score']:.4f}", flush=True)
        for i, (stage, job) in enumerate(jobs):
            n_train = count_samples(job.inputs[cache_input("train")], split_studies(job, "train"))
            cap = stage.train_config(job).epochs
            share = (args.budget_s - (time.perf_counter() - start)) / (len(jobs) - i) - args.overhead_s
            rate = rates.get(UNIT_OF.get((job.stage, job.member), ""), 0.0)
            epochs = args.epochs or (fold_epochs(n_train, rate, share, cap) if rate else cap)  # no rate (CPU): the recipe's
            job = dataclasses.replace(job, config=with_epochs(job.config, epochs))
            t = time.perf_counter()
            oof, curve = train_member(stage, job, device, use_ray, resources)
            probs, given = member_probs(oof, held_ids, prior)
            got = score_arrays(lm[held], probs).as_dict()
            lo, hi = paired_bootstrap(lm[held], probs, prior_probs, args.bootstrap)
            r = {"epochs": epochs, "of_recipe": cap, "train_samples": n_train, "rate_assumed": rate, "seconds": time.perf_counter() - t,
                 "targets_predicted": given, **got, "minus_prior": got["score"] - base["score"], "minus_prior_5_95": [lo, hi],
                 "gap_closed": (base["score"] - got["score"]) / (base["score"] - best["score"]),
                 "train_loss": [float(e["train_loss"]) for e in curve if "train_loss" in e],
                 "samples_per_s": [float(e["samples_per_s"]) for e in curve if "samples_per_s" in e]}
            results["members"][f"{job.stage}/{job.member}"] = r
            print(f"  {job.stage}/{job.member}: {epochs} of {cap} epochs ({n_train} samples) in {r['seconds']:.0f} s; held-out {got['score']:.4f}"
                  f" (prior {base['score']:.4f}: {r['minus_prior']:+.4f}, 5-95 % [{lo:+.4f}, {hi:+.4f}]); gap closed {r['gap_closed']:.3f}", flush=True)
            save_json(results, args.json)
        meta["seconds"] = time.perf_counter() - start
        print(table(results), flush=True)
        save_json(results, args.json)
        return results


def table(results: dict[str, Any]) -> str:
    """The held-out scores as a markdown table."""
    m = results["meta"]
    head = (f"{m['studies']} {m['preset']} studies, held-out fold {m['fold']} of {m['folds']} ({m['held_out']} studies), {m['device']}, "
            f"{'Ray Train' if m['ray'] else 'in-process'}")
    lines = [head, "", "| | epochs | held-out score | spinal | foraminal | subarticular | any-severe | − prior (5–95 %) | gap closed |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def row(name: str, s: dict[str, Any], extra: list[str]) -> str:
        parts = [f"{s[k]:.4f}" for k in ("score", "spinal", "foraminal", "subarticular", "any_severe_spinal")]
        return "| " + " | ".join([name, extra[0], *parts, *extra[1:]]) + " |"

    lines.append(row("prior (training folds)", results["prior"], ["", "", ""]))
    for name, r in results["members"].items():
        lo, hi = r["minus_prior_5_95"]
        lines.append(row(name, r, [f"{r['epochs']} of {r['of_recipe']}", f"{r['minus_prior']:+.4f} ({lo:+.4f}, {hi:+.4f})", f"{r['gap_closed']:.3f}"]))
    lines.append(row("oracle", results["oracle"], ["", "", ""]))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
