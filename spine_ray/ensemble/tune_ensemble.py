"""Fit the ensemble blend on out-of-fold predictions: exact per-group fits, hyper-parameters by Ray Tune.

The pooled log loss of `spine_ray.ensemble.blend` is convex in its unnormalised weights, so each group's
weights, temperature (and the spinal severe factor) are solved by `blend.fit_group` (L-BFGS-B on the
exact metric), not sampled. What a search is for is what the in-sample fit cannot judge: the
fit's hyper-parameters (`blend.FitConfig`), each candidate scored by its cross-fitted held-out metric:
  shrink     L2 pull of the weights toward equal (small data overfits without it),
  cap        at most k members per group (the largest weights of the full fit, refitted),
  per_level  a temperature factor per target as well as per group,
  clip       member probabilities clipped before the log (a confidently wrong member pulls less).
A candidate is fitted on half A of the folds and scored on half B, and the other way round; the
held-out metric of the stitched predictions scores it. The metric is a sum of per-group parts, so
each group takes the candidate that did best held-out on that group, and the group falls back to its
best single member (exactly, one-hot at T = 1) when no candidate beats that member held-out. The
chosen candidates are then refitted on all folds: the blend written to blend.json. Members that
predict less than `SearchConfig.min_coverage` of a group's rows (the rest filled from the prior)
do not enter that group.

Ray Tune runs the candidates (the member matrix goes into the object store once, through
`tune.with_parameters`):
  batched (default): one Tune trial per (per_level, clip), solving its caps × shrinkages inside;
  per-trial:         one Tune trial per candidate, shrinkage included (same results, more overhead).

RUN_DIR/blend.json: "blend" (members, weights per group and member, temperatures per group,
severe_scale, level_temperatures per target, clip per group), "scores" (the metric's parts for the
out-of-fold prior, each member, the equal-weight pool, the exact unregularised optimum on all folds,
the written blend on all folds, and the chosen candidates' cross-fitted halves in-sample and
held-out), "best_member", "decision" (blend, or which single member and why), "choice" (per group:
the candidate or member taken, its held-out part), "candidates" (each candidate's held-out parts),
"eligible" (members entering each group), "halves" (folds of A and B), "half_blends",
"filled_from_prior" (OOF rows each member lacked), "studies", "prior" [25, 3] and "search" (mode,
trials_per_search = candidates, evaluations = objective evaluations, seconds, evaluations_per_s,
seconds_per_search).
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from spine_ray.core.schema import GROUPS, SchemaError, label_matrix, read_labels
from spine_ray.core.storage import exists, join, read_parquet
from spine_ray.ensemble.baseline import read_prior
from spine_ray.ensemble.blend import (
    Blend,
    FitConfig,
    GroupFit,
    MemberMatrix,
    blend_logp,
    blend_of,
    compose,
    equal_blend,
    fit_blend,
    fit_group,
    group_objectives,
    log_members,
    member_matrix,
    one_hot_blend,
    save_blend,
    score_blend,
)
from spine_ray.ensemble.metric import EPS, TARGET_GROUP, score_arrays
from spine_ray.ensemble.prior import oof_prior

SPLITS: tuple[str, ...] = ("A", "B", "all")
MODES: tuple[str, ...] = ("batched", "per-trial")


@dataclass(frozen=True)
class SearchConfig:
    """The hyper-parameter grid Ray Tune scores, and how it runs."""

    shrinks: tuple[float, ...] = (0.0, 0.001, 0.01, 0.1, 1.0)
    caps: tuple[int, ...] = (0, 1, 2, 3)  # 0: every member that enters the group
    per_level: tuple[bool, ...] = (False, True)
    clips: tuple[float, ...] = (EPS, 1e-3)
    trials: int = 1000  # at most this many candidates (a seeded subset of the grid, the plain fit always in)
    seed: int = 0
    mode: str = "batched"  # see the module docstring
    concurrency: int = 8  # Tune trials at most at once (each asks for 1 CPU, so a 2-CPU machine runs 2)
    min_coverage: float = 0.5  # a member enters a group when it predicts at least this share of its rows

    def __post_init__(self) -> None:
        if self.trials < 1 or self.concurrency < 1 or self.mode not in MODES:
            raise ValueError(f"trials and concurrency must be ≥ 1 and mode one of {MODES}")
        if not self.shrinks or not self.caps or not self.per_level or not self.clips or not 0 < self.min_coverage <= 1:
            raise ValueError("every grid axis needs a value and min_coverage must be in (0, 1]")

    def candidates(self, n_members: int) -> list[FitConfig]:
        """The grid (cap 0 always in; caps that keep every member dropped), cut to `trials` by a seeded draw."""
        caps = sorted({c for c in self.caps if c < n_members} | {0})
        grid = [FitConfig(s, c, pl, cl) for cl in self.clips for pl in self.per_level for c in caps for s in self.shrinks]
        if len(grid) <= self.trials:
            return grid
        rng = np.random.default_rng(self.seed)
        keep = set(rng.choice(np.arange(1, len(grid)), size=self.trials - 1, replace=False).tolist()) | {0}
        return [c for i, c in enumerate(grid) if i in keep]


@dataclass(frozen=True)
class RunData:
    """A run directory's OOF ensemble, aligned: members, labels [n, 25], folds [n], prior [25, 3]."""

    matrix: MemberMatrix
    labels: np.ndarray
    folds: np.ndarray
    prior: np.ndarray


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
    prior = read_prior(join(run_dir, "prior.csv"))
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


@dataclass(frozen=True)
class CrossData:
    """What every candidate needs: log_members output per half [25, M, n, 3], labels per half, who enters each group."""

    logp: dict[str, np.ndarray]  # "A", "B"
    labels: dict[str, np.ndarray]
    eligible: np.ndarray  # [3, M] bool
    members: tuple[str, ...]


def cross_data(logp: np.ndarray, labels: np.ndarray, folds: np.ndarray, eligible: np.ndarray, members: tuple[str, ...]) -> CrossData:
    """Split the member matrix into halves A and B once (contiguous: each fit reads its half many times)."""
    masks = split_masks(folds)
    return CrossData(
        {k: np.ascontiguousarray(logp[:, :, masks[k]]) for k in ("A", "B")},
        {k: labels[masks[k]] for k in ("A", "B")},
        eligible, members,
    )


def score_candidate(data: CrossData, cfg: FitConfig, uncapped: dict[tuple, GroupFit] | None = None) -> dict[str, Any]:
    """Fit one candidate on each half, score it on the other: held-out and in-sample group parts, both half blends.

    A group where the cap keeps every member that enters is the cap-0 candidate again: it is not
    refitted, and its parts are NaN (never chosen). `uncapped` (a dict kept across candidates)
    remembers the cap-0 fits, so that a capped candidate scored after its cap-0 twin skips one solve.
    """
    n_enter = data.eligible.sum(axis=1)
    same = [0 < cfg.cap >= n for n in n_enter]
    memo = {} if uncapped is None else uncapped
    twin = (cfg.shrink, cfg.per_level, cfg.clip)
    fits: dict[str, list[GroupFit]] = {}
    for k in ("A", "B"):
        fits[k] = []
        for g in range(len(GROUPS)):
            if same[g]:
                fits[k].append(_placeholder(data, g))
                continue
            fit = fit_group(data.logp[k], data.labels[k], g, data.eligible[g], cfg, memo.get((k, g, *twin)))
            if cfg.cap == 0:
                memo[(k, g, *twin)] = fit
            fits[k].append(fit)
    blends = {k: blend_of(data.members, f) for k, f in fits.items()}
    held = group_objectives(_stitched(data, blends["A"], blends["B"], held_out=True))
    own = group_objectives(_stitched(data, blends["A"], blends["B"], held_out=False))
    return {
        "config": asdict(cfg),
        "held_out": [float("nan") if s else x for s, x in zip(same, held, strict=True)],
        "in_sample": [float("nan") if s else x for s, x in zip(same, own, strict=True)],
        "half_blends": {k: b.as_dict() for k, b in blends.items()},
        "evaluations": sum(f.evaluations for fs in fits.values() for f in fs),
    }


def _placeholder(data: CrossData, g: int) -> GroupFit:
    """The equal pool of the members entering group g, unfitted (a stand-in for a group not scored)."""
    w = data.eligible[g] / data.eligible[g].sum()
    return GroupFit(w, 1.0, np.ones(int((TARGET_GROUP == g).sum())), 1.0, EPS, float("nan"), 0)


def _stitched(data: CrossData, a: Blend, b: Blend, held_out: bool):
    """The metric over all studies of A's blend and B's blend, each on the other half (held out) or its own."""
    on_a, on_b = (b, a) if held_out else (a, b)
    y = np.concatenate([data.labels["A"], data.labels["B"]])
    p = np.concatenate([blend_logp(on_a, data.logp["A"]), blend_logp(on_b, data.logp["B"])])
    return score_arrays(y, p)


def _structure_trial(config: dict[str, Any], data: CrossData) -> None:
    """Batched mode: one Tune trial = one (per_level, clip), its caps × shrinkage grid inside."""
    from ray import tune

    c = config["candidate"]
    uncapped: dict[tuple, GroupFit] = {}  # cap 0 comes first in the grid: the capped candidates reuse its fits
    rows = [score_candidate(data, FitConfig(s, cap, c["per_level"], c["clip"]), uncapped) for cap, s in c["grid"]]
    tune.report({"candidates_json": json.dumps(rows), "held_out": min(sum(r["held_out"]) for r in rows)})  # its best candidate


def _candidate_trial(config: dict[str, Any], data: CrossData) -> None:
    """Per-trial mode: one Tune trial = one candidate."""
    from ray import tune

    row = score_candidate(data, FitConfig(**config["candidate"]))
    tune.report({"candidates_json": json.dumps([row]), "held_out": sum(row["held_out"])})


def run_candidates(data: CrossData, candidates: list[FitConfig], cfg: SearchConfig, storage: str, run_dir: str | None = None) -> list[dict[str, Any]]:
    """Score every candidate with Ray Tune (one trial per structure, or per candidate); rows in grid order.

    With `run_dir`, every trial (its candidate and held-out score) is logged to the run's MLflow store.
    """
    from ray import tune

    from spine_ray.engine.tracking import tune_callbacks

    if cfg.mode == "batched":
        # Few, larger trials: each Tune trial costs about a second of scheduling on a busy machine.
        groups: dict[tuple, list[tuple[int, float]]] = {}
        for c in candidates:
            groups.setdefault((c.per_level, c.clip), []).append((c.cap, c.shrink))
        space = [{"per_level": k[0], "clip": k[1], "grid": v} for k, v in groups.items()]
        trainable = tune.with_parameters(_structure_trial, data=data)
    else:
        space = [asdict(c) for c in candidates]
        trainable = tune.with_parameters(_candidate_trial, data=data)
    tuner = tune.Tuner(
        tune.with_resources(trainable, {"cpu": 1}),
        param_space={"candidate": tune.grid_search(space)},
        tune_config=tune.TuneConfig(max_concurrent_trials=cfg.concurrency, reuse_actors=True),
        run_config=tune.RunConfig(name=f"blend-{cfg.mode}", storage_path=storage, verbose=0,
                                  callbacks=tune_callbacks(run_dir, f"tune-ensemble-blend-{cfg.mode}") if run_dir else []),
    )
    grid = tuner.fit()
    errors = [r.error for r in grid if r.error is not None]
    if errors:
        raise RuntimeError(f"blend search failed: {errors[0]}")
    rows = [row for r in grid for row in json.loads(r.metrics["candidates_json"])]
    order = {json.dumps(asdict(c)): i for i, c in enumerate(candidates)}
    return sorted(rows, key=lambda r: order[json.dumps(r["config"])])


def choose(rows: list[dict[str, Any]], member_parts: np.ndarray, eligible: np.ndarray, members: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per group: the candidate with the best held-out part, or the best single member when none beats it."""
    out = []
    for g in range(len(GROUPS)):
        held = np.array([r["held_out"][g] for r in rows], dtype=np.float64)
        held = np.where(np.isfinite(held), held, np.inf)
        i = int(np.argmin(held))
        cand = np.flatnonzero(eligible[g])
        m = int(cand[np.argmin(np.where(np.isfinite(member_parts[cand, g]), member_parts[cand, g], np.inf))])
        if held[i] < member_parts[m, g]:
            out.append({"kind": "fit", "candidate": i, "config": rows[i]["config"], "held_out": float(held[i]),
                        "best_member": members[m], "best_member_part": float(member_parts[m, g])})
        else:
            out.append({"kind": "member", "member": members[m], "held_out": float(member_parts[m, g]),
                        "best_fit_held_out": float(held[i])})
    return out


def _decision(choice: list[dict[str, Any]]) -> str:
    """One line: a fitted blend, or which single member(s) nothing beat held-out."""
    picked = {c["member"] for c in choice if c["kind"] == "member"}
    if len(picked) == 1 and all(c["kind"] == "member" for c in choice):
        return f"best member {picked.pop()}: no fitted blend beat it held-out, written as is"
    kept = [f"{g}: member {c['member']}" for g, c in zip(GROUPS, choice, strict=True) if c["kind"] == "member"]
    return "fitted blend" + (f" (no fit beat the best member held-out in {', '.join(kept)})" if kept else "")


def _one_hot_fit(members: tuple[str, ...], member: str, g: int) -> GroupFit:
    """A GroupFit that is one member exactly (one-hot weights, T = 1, no clip beyond the metric's)."""
    w = np.asarray([m == member for m in members], dtype=np.float64)
    return GroupFit(w, 1.0, np.ones(int((TARGET_GROUP == g).sum())), 1.0, EPS, float("nan"), 0)


def eligibility(matrix: MemberMatrix, min_coverage: float) -> np.ndarray:
    """[3, M] bool: members predicting at least min_coverage of a group's rows (else the best-covering ones)."""
    cov = matrix.coverage()
    ok = cov >= min_coverage
    for g in np.flatnonzero(~ok.any(axis=1)):
        ok[g] = cov[g] == cov[g].max()
    return ok


def tune_ensemble(run_dir: str, trials: int = 1000, seed: int = 0, mode: str = "batched", concurrency: int = 8,
                  search: SearchConfig | None = None) -> dict[str, Any]:
    """Fit the blend on RUN_DIR's OOF predictions (hyper-parameters by Ray Tune), write RUN_DIR/blend.json, return its report."""
    from spine_ray.core.raycluster import init_ray

    cfg = search or SearchConfig(trials=trials, seed=seed, mode=mode, concurrency=concurrency)
    run = load_run(run_dir)
    members, y = run.matrix.members, run.labels
    logp = log_members(run.matrix.probs)
    eligible = eligibility(run.matrix, cfg.min_coverage)
    data = cross_data(logp, y, run.folds, eligible, members)
    candidates = cfg.candidates(len(members))

    init_ray()
    t0 = time.perf_counter()
    # Tune's own bookkeeping is throwaway here (blend.json is the output): a local temporary folder.
    with tempfile.TemporaryDirectory(prefix="spine-ray-blend-") as storage:
        rows = run_candidates(data, candidates, cfg, storage, run_dir)
    t_candidates = time.perf_counter() - t0

    singles = {m: score_arrays(y, run.matrix.probs[i]) for i, m in enumerate(members)}
    member_parts = np.array([group_objectives(singles[m]) for m in members])
    choice = choose(rows, member_parts, eligible, members)
    t1 = time.perf_counter()
    fits, halves = [], {"A": [], "B": []}
    for g, c in enumerate(choice):
        if c["kind"] == "fit":
            fits.append(fit_group(logp, y, g, eligible[g], FitConfig(**c["config"])))
            for k in halves:
                halves[k].append(Blend.from_dict(rows[c["candidate"]]["half_blends"][k]))
        else:
            fits.append(_one_hot_fit(members, c["member"], g))
            for k in halves:
                halves[k].append(one_hot_blend(members, c["member"]))
    final = blend_of(members, fits)
    t_final = time.perf_counter() - t1
    seconds = time.perf_counter() - t0
    half = {k: compose(v) for k, v in halves.items()}

    best_member = min(singles, key=lambda m: singles[m].score)
    a_folds, b_folds = split_halves(run.folds)
    evaluations = sum(r["evaluations"] for r in rows) + sum(f.evaluations for f in fits)
    optimum = fit_blend(logp, y, members)  # the unregularised pool over every member: the in-sample reference
    report = {
        "scores": {
            "prior (out-of-fold)": score_arrays(y, oof_prior(y, run.folds)).as_dict(),
            **{f"member {m}": s.as_dict() for m, s in singles.items()},
            "equal-weight pool": score_blend(equal_blend(members), logp, y).as_dict(),
            "exact optimum, all members, all folds (in-sample)": score_blend(optimum, logp, y).as_dict(),
            "blend, fitted on all folds (in-sample)": score_blend(final, logp, y).as_dict(),
            "blend, halves (in-sample)": _stitched(data, half["A"], half["B"], held_out=False).as_dict(),
            "blend, halves (held-out)": _stitched(data, half["A"], half["B"], held_out=True).as_dict(),
        },
        "best_member": best_member,
        "decision": _decision(choice),
        "choice": dict(zip(GROUPS, choice, strict=True)),
        "candidates": [{"config": r["config"], "held_out": dict(zip(GROUPS, r["held_out"], strict=True))} for r in rows],
        "eligible": {g: [m for m, ok in zip(members, eligible[i], strict=True) if ok] for i, g in enumerate(GROUPS)},
        "halves": {"A": a_folds, "B": b_folds},
        "half_blends": {k: b.as_dict() for k, b in half.items()},
        "filled_from_prior": run.matrix.filled,
        "studies": len(y),
        "prior": run.prior.tolist(),
        "search": {
            "mode": cfg.mode, "trials_per_search": len(candidates), "searches": list(SPLITS), "evaluations": evaluations,
            "seed": cfg.seed, "seconds": seconds, "evaluations_per_s": evaluations / seconds,
            "seconds_per_search": {"candidates (A and B)": t_candidates, "all": t_final},
        },
    }
    save_blend(join(run_dir, "blend.json"), final, report)
    return {"blend": final.as_dict(), **report}
