"""Search the ensemble blend on out-of-fold predictions: Ray Tune + Optuna, the exact metric, cross-fitted.

Three independent searches, each minimising `score_arrays` on its own studies:
  A   = fit on half the folds,   checked on the other half (B);
  B   = fit on the other half,   checked on A;
  all = fit on every fold: the blend that is written to blend.json.
"held-out" is A's blend scored on B's studies together with B's blend on A's: an honest estimate of
what the search adds; "in-sample" is each half's blend on its own studies. The metric is a sum of
per-group parts (spinal + any_severe_spinal, foraminal, subarticular), each moved only by its own
group's parameters, so the final blend takes each group's parameters from the trial that did best
on that group: never worse than any evaluated point, including the best single member and the
equal-weight pool, which are enqueued as the first points of every search.

Two ways to run the trials, both Ray Tune with Optuna's TPE sampler:
  batched (default): each Tune trial is one whole Optuna study (ask/tell in the trial's actor);
                     Tune runs the three searches (A, B, all) as three parallel trials. Evaluations
                     cost milliseconds, so Tune's per-trial overhead would dominate otherwise.
  per-trial:         one Tune trial per blend, suggested by `ray.tune.search.optuna.OptunaSearch`
                     (one Tuner per search); the textbook form, measured slower in
                     benchmarks/tune_ensemble.py.
In both the member matrix goes into the object store once per Tuner (`tune.with_parameters`).

RUN_DIR/blend.json: "blend" (members, weights per group and member, temperatures per group,
severe_scale), "scores" (the metric's parts for the out-of-fold prior, each member, the
equal-weight pool, the blend fitted on all folds, and the cross-fitted halves in-sample and
held-out), "best_member", "halves" (folds of A and B), "half_blends", "filled_from_prior" (OOF
rows each member lacked), "studies", "prior" [25, 3] and "search" (mode, trials, evaluations,
seconds, evaluations_per_s, seconds_per_search).
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from spine_ray.baseline import read_prior_table
from spine_ray.blend import (
    SEVERE_RANGE,
    TEMPERATURE_RANGE,
    Blend,
    MemberMatrix,
    blend_logp,
    blend_params,
    compose,
    equal_blend,
    group_objectives,
    log_members,
    member_matrix,
    one_hot_blend,
    params_blend,
    save_blend,
    score_blend,
)
from spine_ray.metric import score_arrays
from spine_ray.prior import oof_prior
from spine_ray.schema import GROUPS, SchemaError, label_matrix, read_labels
from spine_ray.storage import exists, join, read_parquet, read_text
from spine_ray.tracking import tune_callbacks

# "all" first: the longest search starts first when Tune runs two at a time.
SPLITS: tuple[str, ...] = ("all", "A", "B")
MODES: tuple[str, ...] = ("batched", "per-trial")


@dataclass(frozen=True)
class SearchConfig:
    """How hard and how to search."""

    trials: int = 1000  # blend evaluations per search (three searches: A, B, all)
    seed: int = 0
    mode: str = "batched"  # see the module docstring
    concurrency: int = 3  # Tune trials at once (each asks for 1 CPU, so a 2-CPU machine runs 2)

    def __post_init__(self) -> None:
        if self.trials < 1 or self.concurrency < 1 or self.mode not in MODES:
            raise ValueError(f"trials and concurrency must be ≥ 1 and mode one of {MODES}")


@dataclass(frozen=True)
class RunData:
    """A run directory's OOF ensemble, aligned: members, labels [n, 25], folds [n], prior [25, 3]."""

    matrix: MemberMatrix
    labels: np.ndarray
    folds: np.ndarray
    prior: np.ndarray


@dataclass(frozen=True)
class SplitData:
    """One search's studies, ready to score: log_members output [25, M, n, 3] and labels [n, 25]."""

    logp: np.ndarray
    labels: np.ndarray


def load_run(run_dir: str) -> RunData:
    """Read oof.parquet, folds.parquet, train_labels.csv and prior.csv of a run directory."""
    need = ("oof.parquet", "folds.parquet", "train_labels.csv", "prior.csv")
    missing = [f for f in need if not exists(join(run_dir, f))]
    if missing:
        raise FileNotFoundError(f"{run_dir}: not a training run directory (missing {', '.join(missing)})")
    labels = read_labels(join(run_dir, "train_labels.csv"))
    folds = read_parquet(join(run_dir, "folds.parquet")).set_index("study_id")["fold"]
    study_ids = labels["study_id"].tolist()
    absent = [s for s in study_ids if s not in folds.index]
    if absent:
        raise SchemaError(join(run_dir, "folds.parquet"), f"{len(absent)} labelled studies have no fold, e.g. {absent[0]}")
    prior = read_prior_table(pd.read_csv(io.StringIO(read_text(join(run_dir, "prior.csv")))))
    oof = read_parquet(join(run_dir, "oof.parquet"))
    members = sorted(oof["member"].astype(str).unique())
    if not members:
        raise SchemaError(join(run_dir, "oof.parquet"), "no members")
    oof["member"] = oof["member"].astype(str)
    matrix = member_matrix(oof, study_ids, members, prior)
    return RunData(matrix, label_matrix(labels), folds.loc[study_ids].to_numpy(dtype=np.int64), prior)


def split_halves(folds: np.ndarray) -> tuple[list[int], list[int]]:
    """Folds of half A (every other fold, sorted) and half B (the rest)."""
    ids = sorted(int(f) for f in np.unique(folds))
    if len(ids) < 2:
        raise ValueError("the cross-fitted check needs at least 2 folds")
    return ids[0::2], ids[1::2]


def split_masks(folds: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean study masks of A, B and all."""
    a, _ = split_halves(folds)
    in_a = np.isin(folds, a)
    return {"A": in_a, "B": ~in_a, "all": np.ones_like(in_a)}


def search_space(n_members: int) -> dict[str, Any]:
    """Optuna distributions: raw weights in [0, 1] per group × member, log-uniform temperatures and severe factor."""
    from optuna.distributions import FloatDistribution

    space: dict[str, Any] = {f"w{g}_{i}": FloatDistribution(0.0, 1.0) for g in range(len(GROUPS)) for i in range(n_members)}
    space |= {f"t{g}": FloatDistribution(*TEMPERATURE_RANGE, log=True) for g in range(len(GROUPS))}
    return space | {"severe": FloatDistribution(*SEVERE_RANGE, log=True)}


def start_points(members: tuple[str, ...]) -> list[dict[str, float]]:
    """The equal-weight pool and each single member, as search points (evaluated first)."""
    return [blend_params(equal_blend(members))] + [blend_params(one_hot_blend(members, m)) for m in members]


def best_of(history: list[tuple[dict[str, float], tuple[float, float, float]]], members: tuple[str, ...]) -> Blend:
    """Per group, the parameters of the evaluated point with the lowest group objective."""
    best = [min(history, key=lambda h, g=g: h[1][g])[0] for g in range(len(GROUPS))]
    return compose([params_blend(p, members) for p in best])


def optuna_search(data: SplitData, members: tuple[str, ...], trials: int, seed: int) -> tuple[Blend, int]:
    """One in-process Optuna study (TPE, starts enqueued) of `trials` blends; returns the composed best and the count."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    for p in start_points(members):
        study.enqueue_trial(p)
    space = search_space(len(members))
    history = []
    for _ in range(trials):
        trial = study.ask(space)
        s = score_blend(params_blend(trial.params, members), data.logp, data.labels)
        study.tell(trial, s.score)
        history.append((trial.params, group_objectives(s)))
    return best_of(history, members), len(history)


def _study_trial(config: dict[str, Any], splits: dict[str, SplitData], members: tuple[str, ...], trials: int) -> None:
    """Batched mode: one Tune trial = one whole Optuna study on one split."""
    from ray import tune

    t0 = time.perf_counter()
    data = splits[config["split"]]
    blend, n = optuna_search(data, members, trials, config["seed"])
    # The score on the search's own studies goes to MLflow with the trial (tracking.tune_callbacks).
    found = score_blend(blend, data.logp, data.labels).as_dict()
    tune.report({"evaluations": n, "seconds": time.perf_counter() - t0, "blend_json": json.dumps(blend.as_dict()), **found})


def _blend_trial(config: dict[str, Any], data: SplitData, members: tuple[str, ...]) -> None:
    """Per-trial mode: one Tune trial = one blend, scored on the search's split."""
    from ray import tune

    s = score_blend(params_blend(config, members), data.logp, data.labels)
    g = group_objectives(s)
    tune.report({"score": s.score, "g0": g[0], "g1": g[1], "g2": g[2]})


def _run_config(name: str, storage: str, run_dir: str):
    from ray import tune

    return tune.RunConfig(name=name, storage_path=storage, verbose=0, callbacks=tune_callbacks(run_dir, f"tune-ensemble-{name}"))


def _search_batched(splits: dict[str, SplitData], members: tuple[str, ...], cfg: SearchConfig, storage: str, run_dir: str) -> tuple[dict[str, Blend], dict[str, float]]:
    from ray import tune

    trainable = tune.with_parameters(_study_trial, splits=splits, members=members, trials=cfg.trials)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"split": tune.grid_search(list(SPLITS)), "seed": cfg.seed},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.concurrency, reuse_actors=True),
        run_config=_run_config("blend-batched", storage, run_dir),
    )
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        raise RuntimeError(f"blend search failed: {errors[0]}")
    return (
        {r.config["split"]: Blend.from_dict(json.loads(r.metrics["blend_json"])) for r in grid},
        {r.config["split"]: float(r.metrics["seconds"]) for r in grid},
    )


def _search_per_trial(splits: dict[str, SplitData], members: tuple[str, ...], cfg: SearchConfig, storage: str, run_dir: str) -> tuple[dict[str, Blend], dict[str, float]]:
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    out, seconds = {}, {}
    for k, split in enumerate(SPLITS):
        t0 = time.perf_counter()
        searcher = OptunaSearch(
            space=search_space(len(members)), metric="score", mode="min",
            points_to_evaluate=start_points(members), seed=cfg.seed + k,
        )
        tuner = tune.Tuner(
            tune.with_resources(tune.with_parameters(_blend_trial, data=splits[split], members=members), {"cpu": 1}),
            tune_config=tune.TuneConfig(
                search_alg=searcher, num_samples=cfg.trials, max_concurrent_trials=cfg.concurrency, reuse_actors=True
            ),
            run_config=_run_config(f"blend-{split}", storage, run_dir),
        )
        df = tuner.fit().get_dataframe()
        df = df[df["score"].notna()]
        params = [{c.removeprefix("config/"): float(r[c]) for c in df.columns if c.startswith("config/")} for _, r in df.iterrows()]
        history = [(p, (r.g0, r.g1, r.g2)) for p, r in zip(params, df.itertuples(), strict=True)]
        out[split] = best_of(history, members)
        seconds[split] = time.perf_counter() - t0
    return out, seconds


def tune_ensemble(run_dir: str, trials: int = 1000, seed: int = 0, mode: str = "batched", concurrency: int = 3) -> dict[str, Any]:
    """Search the blend on RUN_DIR's OOF predictions, write RUN_DIR/blend.json, return its report."""
    from spine_ray.distributed import init_ray

    cfg = SearchConfig(trials, seed, mode, concurrency)
    run = load_run(run_dir)
    members, y = run.matrix.members, run.labels
    # Every start point (equal pool, each member) is evaluated, whatever --trials says.
    cfg = SearchConfig(max(trials, len(members) + 1), seed, mode, concurrency)
    masks = split_masks(run.folds)
    logp = log_members(run.matrix.probs)
    splits = {k: SplitData(np.ascontiguousarray(logp[:, :, m]), y[m]) for k, m in masks.items()}

    init_ray()
    t0 = time.perf_counter()
    # Tune's own bookkeeping is throwaway here (blend.json is the output): a local temporary folder.
    with tempfile.TemporaryDirectory(prefix="spine-ray-blend-") as storage:
        search = _search_batched if cfg.mode == "batched" else _search_per_trial
        found, per_search = search(splits, members, cfg, storage, run_dir)
    seconds = time.perf_counter() - t0

    final = found["all"]
    # Cross-fitted: each half scored by the blend fitted on the other half.
    cross = np.empty((len(y), y.shape[1], 3))
    own = np.empty_like(cross)
    for fit, check in (("A", "B"), ("B", "A")):
        cross[masks[check]] = blend_logp(found[fit], splits[check].logp)
        own[masks[fit]] = blend_logp(found[fit], splits[fit].logp)
    singles = {m: score_arrays(y, run.matrix.probs[i]) for i, m in enumerate(members)}
    best_member = min(singles, key=lambda m: singles[m].score)
    a_folds, b_folds = split_halves(run.folds)
    evaluations = 3 * cfg.trials
    report = {
        "scores": {
            "prior (out-of-fold)": score_arrays(y, oof_prior(y, run.folds)).as_dict(),
            **{f"member {m}": s.as_dict() for m, s in singles.items()},
            "equal-weight pool": score_blend(equal_blend(members), splits["all"].logp, y).as_dict(),
            "blend, fitted on all folds (in-sample)": score_blend(final, splits["all"].logp, y).as_dict(),
            "blend, halves (in-sample)": score_arrays(y, own).as_dict(),
            "blend, halves (held-out)": score_arrays(y, cross).as_dict(),
        },
        "best_member": best_member,
        "halves": {"A": a_folds, "B": b_folds},
        "half_blends": {k: found[k].as_dict() for k in ("A", "B")},
        "filled_from_prior": run.matrix.filled,
        "studies": len(y),
        "prior": run.prior.tolist(),
        "search": {
            "mode": cfg.mode, "trials_per_search": cfg.trials, "searches": list(SPLITS), "evaluations": evaluations,
            "seed": cfg.seed, "seconds": seconds, "evaluations_per_s": evaluations / seconds,
            "seconds_per_search": per_search,
        },
    }
    save_blend(join(run_dir, "blend.json"), final, report)
    return {"blend": final.as_dict(), **report}
