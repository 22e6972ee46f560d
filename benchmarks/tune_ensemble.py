"""Stress-test the blend: the old sampled search against the exact fit + Ray Tune hyper-parameters, same run.

Synthetic run directories shaped like a real competition ensemble (`STRESS_MEMBERS`: 7 members, each
predicting one condition group only, the rest filled from the prior; near-equal pairs that averaging
helps; one near-duplicate) at each --studies size. On each:
- old: the search `tune-ensemble` ran before issue 15: Optuna TPE over every member's weight in every
  group, temperatures and the severe factor, --old-trials per search (half A, half B, all folds),
  per group the best trial; in-process and serial (it ran as 3 Tune trials on 2 CPUs).
- new: `tune_ensemble` as shipped: exact per-group fits (L-BFGS-B), Ray Tune scoring the
  hyper-parameter grid on cross-fitted halves, the best member where nothing beats it held-out.
- exact optimum: the old search's pool family (all members in every group, a temperature per group,
  the severe factor), solved from every one-hot start and the equal pool to tight tolerance.
Prints in-sample (all folds) and held-out (cross-fitted halves) scores, seconds, and the ratio
old / new seconds measured in the same run.

    PYTHONPATH=$PWD RAY_USAGE_STATS_ENABLED=0 python benchmarks/tune_ensemble.py --studies 60 2000 --old-trials 1000
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np

from spine_ray.core.schema import GROUPS
from spine_ray.ensemble.blend import (
    SEVERE_RANGE,
    Blend,
    FitConfig,
    _objective,
    _problem,
    blend_logp,
    compose,
    equal_blend,
    group_objectives,
    log_members,
    make_blend,
    one_hot_blend,
    score_blend,
)
from spine_ray.ensemble.metric import score_arrays
from spine_ray.ensemble.tune_ensemble import load_run, split_masks, tune_ensemble
from spine_ray.synth.oof import STRESS_MEMBERS, synthetic_run

TEMPERATURE_RANGE: tuple[float, float] = (0.5, 2.0)  # the old search's temperature range


def _params_blend(params: dict[str, float], members: tuple[str, ...]) -> Blend:
    """The old search point (w{g}_{i}, t{g}, severe) → Blend."""
    w = np.array([[params[f"w{g}_{i}"] for i in range(len(members))] for g in range(len(GROUPS))])
    return make_blend(members, w, [params[f"t{g}"] for g in range(len(GROUPS))], params["severe"])


def _blend_params(b: Blend) -> dict[str, float]:
    """Blend → the old search point."""
    p = {f"w{g}_{i}": float(w) for g, ws in enumerate(b.weights) for i, w in enumerate(ws)}
    return p | {f"t{g}": float(t) for g, t in enumerate(b.temperatures)} | {"severe": float(b.severe_scale)}


def old_search(logp: np.ndarray, y: np.ndarray, members: tuple[str, ...], trials: int, seed: int) -> Blend:
    """The pre-issue-15 search: TPE ask/tell, equal pool and each member enqueued first, per group the best trial."""
    import optuna
    from optuna.distributions import FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {f"w{g}_{i}": FloatDistribution(0.0, 1.0) for g in range(len(GROUPS)) for i in range(len(members))}
    space |= {f"t{g}": FloatDistribution(*TEMPERATURE_RANGE, log=True) for g in range(len(GROUPS))}
    space |= {"severe": FloatDistribution(*SEVERE_RANGE, log=True)}
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
    for b in [equal_blend(members)] + [one_hot_blend(members, m) for m in members]:
        study.enqueue_trial(_blend_params(b))
    history = []
    for _ in range(max(trials, len(members) + 1)):
        trial = study.ask(space)
        s = score_blend(_params_blend(trial.params, members), logp, y)
        study.tell(trial, s.score)
        history.append((trial.params, group_objectives(s)))
    return compose([_params_blend(min(history, key=lambda h, g=g: h[1][g])[0], members) for g in range(len(GROUPS))])


def old_tune(run, trials: int, seed: int) -> dict[str, float]:
    """The old search on halves A, B and all folds: in-sample (all) and held-out (cross-fitted) scores, seconds."""
    t0 = time.perf_counter()
    logp, y = log_members(run.matrix.probs), run.labels
    masks = split_masks(run.folds)
    found = {k: old_search(np.ascontiguousarray(logp[:, :, m]), y[m], run.matrix.members, trials, seed) for k, m in masks.items()}
    seconds = time.perf_counter() - t0
    cross = np.empty((len(y), y.shape[1], 3))
    for fit, check in (("A", "B"), ("B", "A")):
        cross[masks[check]] = blend_logp(found[fit], logp[:, :, masks[check]])
    return {"in-sample": score_blend(found["all"], logp, y).score, "held-out": score_arrays(y, cross).score, "seconds": seconds}


def exact_optimum(run) -> float:
    """The old family's in-sample optimum (all members, temperature per group, severe factor), multi-start, tight."""
    from scipy.optimize import minimize

    logp, y, m = log_members(run.matrix.probs), run.labels, len(run.matrix.members)
    blends = []
    for g in range(len(GROUPS)):
        pr = _problem(logp, y, g, np.arange(m), FitConfig().clip)
        bounds = [(0.0, None)] * m + ([tuple(np.log(SEVERE_RANGE))] if g == 0 else [])
        best = None
        for x in [np.full(m, 1.0 / m), *np.eye(m)]:
            x0 = np.concatenate([x, [0.0] if g == 0 else []])
            res = minimize(_objective, x0, args=(pr, FitConfig()), jac=True, method="L-BFGS-B", bounds=bounds,
                           options={"maxiter": 5000, "ftol": 1e-15, "gtol": 1e-10})
            best = res if best is None or res.fun < best.fun else best
        v = best.x[:m]
        blends.append(make_blend(run.matrix.members, v, (1 / v.sum(),) * 3, float(np.exp(best.x[m])) if g == 0 else 1.0))
    return score_blend(compose(blends), logp, y).score


def main() -> None:
    """Old vs new on each size; one table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, nargs="+", default=[60, 2000])
    ap.add_argument("--old-trials", type=int, default=1000, help="per search (three searches), as the old default")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from spine_ray.core.raycluster import init_ray

    t0 = time.perf_counter()
    init_ray()
    ray_start = time.perf_counter() - t0
    buf = io.StringIO()
    print(f"{len(STRESS_MEMBERS)} members (one group each, near-equal pairs, a near-duplicate), 5 folds, "
          f"{os.cpu_count()} CPUs; Ray started in {ray_start:.1f} s (not counted below)", file=buf)
    print(f"{'studies':>8} {'way':<34}{'in-sample':>10}{'held-out':>10}{'seconds':>9}", file=buf)
    for n in args.studies:
        run_dir = tempfile.mkdtemp(prefix="bench-blend-")
        synthetic_run(run_dir, n_studies=n, seed=args.seed, members=STRESS_MEMBERS)
        run = load_run(run_dir)
        t0 = time.perf_counter()
        new = tune_ensemble(run_dir, seed=args.seed)
        new_s = time.perf_counter() - t0
        old = old_tune(run, args.old_trials, args.seed)
        opt = exact_optimum(run)
        sc = new["scores"]
        best = new["best_member"]
        parts = np.array([[sc[f"member {m}"][k] for k in ("spinal", "any_severe_spinal", "foraminal", "subarticular")] for m in run.matrix.members])
        per_group = (parts[:, :2].sum(axis=1).min() + parts[:, 2].min() + parts[:, 3].min()) / 4  # the score's mean of 4 parts
        rows = [
            (f"best single member ({best})", sc[f"member {best}"]["score"], sc[f"member {best}"]["score"], float("nan")),
            ("best member of each group", per_group, per_group, float("nan")),
            (f"old: TPE, {args.old_trials} trials x 3", old["in-sample"], old["held-out"], old["seconds"]),
            ("new: exact fit + Tune grid", sc["blend, fitted on all folds (in-sample)"]["score"], sc["blend, halves (held-out)"]["score"], new_s),
            ("new: unregularised fit (start: equal)", sc["exact optimum, all members, all folds (in-sample)"]["score"], float("nan"), float("nan")),
            ("exact optimum (multi-start, tight)", opt, float("nan"), float("nan")),
        ]
        for way, ins, held, sec in rows:
            print(f"{n:>8} {way:<34}{ins:>10.4f}{held:>10.4f}{sec:>9.1f}", file=buf)
        print(f"{n:>8} new: {new['decision']}; old / new seconds {old['seconds'] / new_s:.1f}x; "
              f"written - optimum in-sample {sc['blend, fitted on all folds (in-sample)']['score'] - opt:+.4f}, "
              f"unregularised fit - optimum {sc['exact optimum, all members, all folds (in-sample)']['score'] - opt:+.5f}; "
              f"held-out: new - best member {sc['blend, halves (held-out)']['score'] - sc[f'member {best}']['score']:+.4f}, "
              f"old - best member {old['held-out'] - sc[f'member {best}']['score']:+.4f}; "
              f"new - best of each group {sc['blend, halves (held-out)']['score'] - per_group:+.4f}", file=buf)
        print(f"{n:>8} chosen: " + "; ".join(
            f"{g} " + (f"member {c['member']}" if c["kind"] == "member" else
                       "shrink {shrink:g} cap {cap} per_level {per_level} clip {clip:.0e}".format(**c["config"]))
            for g, c in new["choice"].items()), file=buf)
        print("\n".join(buf.getvalue().splitlines()[-len(rows) - 2:]), flush=True)  # this size, as it finishes
    print(buf.getvalue())


if __name__ == "__main__":
    main()
