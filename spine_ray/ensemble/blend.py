"""The ensemble blend: per condition group, a weighted log-linear pool of members with a temperature.

For the targets of group g (spinal, foraminal, subarticular), with member probabilities p_m clipped
to [c_g, 1 - c_g]:

    logits_t = Σ_m w_gm · log p_m / (T_g · τ_t),   p = softmax(logits);   spinal only: p(severe) × s, renormalised.

(τ_t, a temperature per target, is 1 unless the search asks for per-level temperatures.)

Why log space (a weighted geometric mean) rather than a weighted mean of probabilities:
- the metric is a log loss, and the pooled log loss is convex in the unnormalised weights w/T
  (it is a multinomial logistic model with fixed features), so `fit_blend` solves it exactly with
  L-BFGS-B (non-negative bounds, analytic gradient) instead of sampling it;
- the temperature is then exactly the logit temperature that the 3rd-place team tuned, and the
  severe factor is the 2nd-place team's p(severe) × ~1.25, both as one extra logit term;
- one-hot weights with T = 1 reproduce that member exactly, so the best single member is a point
  of the search space (the blend can never be worse on the folds it is fitted on).
The price: a member that is confidently wrong (p ≈ 0) pulls the pool harder than in a linear mean;
members are clipped first (to the metric's eps, or to c_g if the search finds that better), and a
weight can go to 0. The any-severe term (a max over spinal levels) and per-level temperatures are
not convex: they are fitted jointly from the convex solution's neighbourhood, deterministically.

Pure numpy + scipy; the search over the fit's hyper-parameters (Ray Tune) lives in
`spine_ray.ensemble.tune_ensemble`.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from spine_ray.core.schema import (
    GROUPS,
    LABEL_COLUMNS,
    N_TARGETS,
    PROB_COLUMNS,
    SEVERITY_WEIGHTS,
    row_ids,
)
from spine_ray.core.storage import atomic_write_text, read_text
from spine_ray.ensemble.metric import EPS, SPINAL, TARGET_GROUP, Score, normalise, score_arrays

SEVERE_RANGE: tuple[float, float] = (0.5, 3.0)  # bounds of the spinal severe factor
LEVEL_RANGE: tuple[float, float] = (0.25, 4.0)  # bounds of a per-target temperature factor


@dataclass(frozen=True)
class Blend:
    """Per group (spinal, foraminal, subarticular): member weights, a temperature and a clip; a spinal severe factor."""

    members: tuple[str, ...]
    weights: tuple[tuple[float, ...], ...]  # [3 groups][M members], non-negative, each sums to 1
    temperatures: tuple[float, float, float] = (1.0, 1.0, 1.0)
    severe_scale: float = 1.0  # multiplies spinal p(severe) before renormalising
    level_temperatures: tuple[float, ...] = (1.0,) * N_TARGETS  # [25], multiplies its group's temperature
    clips: tuple[float, float, float] = (EPS, EPS, EPS)  # member probabilities clipped to [c, 1 - c] first

    def __post_init__(self) -> None:
        w = np.asarray(self.weights, dtype=np.float64)
        if not self.members or w.shape != (len(GROUPS), len(self.members)):
            raise ValueError(f"weights must be [{len(GROUPS)}, {len(self.members)}], got {w.shape}")
        if (w < 0).any() or not np.allclose(w.sum(axis=1), 1.0):
            raise ValueError("weights must be non-negative and sum to 1 per group (use make_blend)")
        if len(self.temperatures) != len(GROUPS) or min(self.temperatures) <= 0 or self.severe_scale <= 0:
            raise ValueError("temperatures (one per group) and severe_scale must be positive")
        if len(self.level_temperatures) != N_TARGETS or min(self.level_temperatures) <= 0:
            raise ValueError(f"level_temperatures must be {N_TARGETS} positive numbers")
        if len(self.clips) != len(GROUPS) or not all(EPS <= c < 0.5 for c in self.clips):
            raise ValueError("clips must be one per group, in [eps, 0.5)")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: weights named by group and member, level temperatures by target."""
        return {
            "members": list(self.members),
            "weights": {g: dict(zip(self.members, map(float, ws), strict=True)) for g, ws in zip(GROUPS, self.weights, strict=True)},
            "temperatures": dict(zip(GROUPS, map(float, self.temperatures), strict=True)),
            "severe_scale": float(self.severe_scale),
            "level_temperatures": dict(zip(LABEL_COLUMNS, map(float, self.level_temperatures), strict=True)),
            "clip": dict(zip(GROUPS, map(float, self.clips), strict=True)),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Blend:
        """Inverse of as_dict; blend.json files written before level temperatures and clips read as 1 and eps."""
        members = tuple(d["members"])
        levels = d.get("level_temperatures", {})
        clips = d.get("clip", {})
        return cls(
            members,
            tuple(tuple(float(d["weights"][g][m]) for m in members) for g in GROUPS),
            tuple(float(d["temperatures"][g]) for g in GROUPS),
            float(d["severe_scale"]),
            tuple(float(levels.get(t, 1.0)) for t in LABEL_COLUMNS),
            tuple(float(clips.get(g, EPS)) for g in GROUPS),
        )


def make_blend(
    members: list[str] | tuple[str, ...],
    raw_weights: np.ndarray,
    temperatures=(1.0, 1.0, 1.0),
    severe_scale: float = 1.0,
    level_temperatures=(1.0,) * N_TARGETS,
    clips=(EPS, EPS, EPS),
) -> Blend:
    """A Blend from raw non-negative weights [3, M] (or [M] for all groups), normalised per group; all-zero → equal."""
    w = np.broadcast_to(np.asarray(raw_weights, dtype=np.float64), (len(GROUPS), len(members))).copy()
    if (w < 0).any():
        raise ValueError("weights must be non-negative")
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total > 0, w / np.where(total > 0, total, 1.0), 1.0 / len(members))
    return Blend(
        tuple(members), tuple(map(tuple, w.tolist())), tuple(map(float, temperatures)), float(severe_scale),
        tuple(map(float, level_temperatures)), tuple(map(float, clips)),
    )


def equal_blend(members: list[str] | tuple[str, ...]) -> Blend:
    """Equal weights, temperature 1, no severe scaling: the plain geometric mean."""
    return make_blend(members, np.ones(len(members)))


def one_hot_blend(members: list[str] | tuple[str, ...], member: str) -> Blend:
    """All weight on one member, temperature 1: that member's predictions exactly."""
    return make_blend(members, np.asarray([m == member for m in members], dtype=np.float64))


def log_members(member_probs: np.ndarray) -> np.ndarray:
    """[M, n, 25, 3] probabilities → target-major log-probabilities [25, M, n, 3] (once per search).

    Target-major so that pooling is one batched matmul per target (≈ 30× faster than an einsum).
    """
    return np.ascontiguousarray(np.log(normalise(member_probs)).transpose(2, 0, 1, 3))


def clip_logp(logp: np.ndarray, clip: float) -> np.ndarray:
    """Log-probabilities [..., 3] → the same with probabilities clipped to [clip, 1 - clip] and renormalised."""
    if clip <= EPS:
        return logp
    p = np.clip(np.exp(logp), clip, 1 - clip)
    return np.log(p / p.sum(axis=-1, keepdims=True))


def blend_logp(blend: Blend, logp: np.ndarray) -> np.ndarray:
    """The fast path: blend log_members output [25, M, n, 3] → probabilities [n, 25, 3]."""
    t, m, n, _ = logp.shape
    if max(blend.clips) > EPS:
        logp = logp.copy()
        for g, c in enumerate(blend.clips):
            logp[TARGET_GROUP == g] = clip_logp(logp[TARGET_GROUP == g], c)
    temperature = np.asarray(blend.temperatures)[TARGET_GROUP] * np.asarray(blend.level_temperatures)  # [25]
    w = np.asarray(blend.weights)[TARGET_GROUP] / temperature[:, None]  # [25, M]
    logits = np.matmul(w[:, None, :], logp.reshape(t, m, n * 3)).reshape(t, n, 3)
    logits[SPINAL, :, 2] += np.log(blend.severe_scale)  # p(severe) × s, renormalised by the softmax
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return p.transpose(1, 0, 2)


def apply_blend(blend: Blend, member_probs: dict[str, np.ndarray]) -> np.ndarray:
    """Blend members' probabilities {name: [n, 25, 3]} → [n, 25, 3]; every member of the blend is required."""
    missing = [m for m in blend.members if m not in member_probs]
    if missing:
        raise KeyError(f"blend needs members {missing}, not given")
    return blend_logp(blend, log_members(np.stack([member_probs[m] for m in blend.members])))


@dataclass(frozen=True)
class MemberMatrix:
    """Members' OOF predictions aligned to studies × targets, and which rows each took from the prior."""

    members: tuple[str, ...]
    study_ids: tuple[int, ...]
    probs: np.ndarray  # [M, n, 25, 3]
    filled: dict[str, int] = field(default_factory=dict)  # member → rows filled from the prior
    covered: np.ndarray | None = None  # [M, n, 25] bool: the member predicted this row itself

    def coverage(self) -> np.ndarray:
        """[3 groups, M]: the share of each group's rows that each member predicted itself."""
        if self.covered is None:
            return np.ones((len(GROUPS), len(self.members)))
        return np.stack([self.covered[:, :, TARGET_GROUP == g].mean(axis=(1, 2)) for g in range(len(GROUPS))])


def member_matrix(oof: pd.DataFrame, study_ids: list[int], members: list[str], prior: np.ndarray) -> MemberMatrix:
    """Align an OOF table (row_id, member, normal_mild, moderate, severe) by row_id.

    Rows a member lacks come from `prior`: [25, 3] for every study, or [n, 25, 3] per study (e.g. out-of-fold).
    """
    want = pd.Index(row_ids(study_ids))
    fill = np.broadcast_to(np.asarray(prior, dtype=np.float64), (len(study_ids), N_TARGETS, 3)).reshape(-1, 3)
    out = np.empty((len(members), len(study_ids) * N_TARGETS, 3))
    covered = np.empty((len(members), len(study_ids) * N_TARGETS), dtype=bool)
    filled = {}
    for i, m in enumerate(members):
        rows = oof.loc[oof["member"] == m, ["row_id", *PROB_COLUMNS]]
        dup = rows["row_id"].duplicated()
        if dup.any():
            raise ValueError(f"member {m!r} predicts row_id {rows['row_id'][dup].iloc[0]!r} twice")
        p = rows.set_index("row_id").reindex(want).to_numpy(dtype=np.float64, copy=True)
        hole = ~np.isfinite(p).all(axis=1)
        p[hole] = fill[hole]
        out[i] = p
        covered[i] = ~hole
        filled[m] = int(hole.sum())
    n = len(study_ids)
    return MemberMatrix(
        tuple(members), tuple(int(s) for s in study_ids), out.reshape(len(members), n, N_TARGETS, 3), filled,
        covered.reshape(len(members), n, N_TARGETS),
    )


def group_objectives(s: Score) -> tuple[float, float, float]:
    """The part of the score each group's parameters move: spinal (+ any_severe_spinal), foraminal, subarticular."""
    return (s.spinal + s.any_severe_spinal, s.foraminal, s.subarticular)


def score_blend(blend: Blend, logp: np.ndarray, labels: np.ndarray) -> Score:
    """The exact metric of a blend of log_members output [25, M, n, 3] against labels [n, 25]."""
    return score_arrays(labels, blend_logp(blend, logp))


def compose(blends: list[Blend]) -> Blend:
    """One blend taking group g's parameters from blends[g] (the score is separable by group)."""
    levels = np.choose(TARGET_GROUP, [np.asarray(b.level_temperatures) for b in blends])
    return Blend(
        blends[0].members,
        tuple(b.weights[g] for g, b in enumerate(blends)),
        tuple(b.temperatures[g] for g, b in enumerate(blends)),
        blends[0].severe_scale,
        tuple(map(float, levels)),
        tuple(b.clips[g] for g, b in enumerate(blends)),
    )


# --- The exact fit ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FitConfig:
    """Hyper-parameters of one exact fit of one group (what Ray Tune searches, scored held-out)."""

    shrink: float = 0.0  # L2 pull of the unnormalised weights toward their mean (and level factors toward 1)
    cap: int = 0  # keep at most this many members (the largest weights of the full fit), refit; 0: all
    per_level: bool = False  # a temperature factor per target besides the group's
    clip: float = EPS  # member probabilities clipped to [clip, 1 - clip] before the log

    def __post_init__(self) -> None:
        if self.shrink < 0 or self.cap < 0 or not EPS <= self.clip < 0.5:
            raise ValueError(f"shrink and cap must be ≥ 0 and clip in [eps, 0.5), got {self}")


@dataclass(frozen=True)
class GroupFit:
    """One group's fitted pool: normalised weights over all members, temperature, level factors [t], severe factor."""

    weights: np.ndarray  # [M], zero for members that did not enter
    temperature: float
    level_temperatures: np.ndarray  # [targets of the group]
    severe_scale: float
    clip: float
    loss: float  # the group's part of the metric, in-sample (without the shrinkage penalty)
    evaluations: int


@dataclass(frozen=True)
class _Problem:
    """One group's fixed features and labels, ready for the objective."""

    feats: np.ndarray  # [Me, t·n·3] clipped member log-probabilities of the members that enter (member-major: one gemv)
    shape: tuple[int, int]  # (t, n)
    onehot_w: np.ndarray  # [t, n, 3] one-hot label × metric weight / total weight
    w: np.ndarray  # [t, n] metric weight / total weight (0 where unscored)
    spinal: bool
    sev_has: np.ndarray  # [n] bool: studies with a scored spinal row
    sev_scored: np.ndarray  # [t, n] bool
    sev_label: np.ndarray  # [n'] 0/1: any severe spinal
    sev_w: np.ndarray  # [n'] weight / total weight


def _problem(logp: np.ndarray, labels: np.ndarray, g: int, enter: np.ndarray, clip: float) -> _Problem | None:
    """The group-g problem over the members in `enter`; None when the group has no scored rows."""
    cols = TARGET_GROUP == g
    y = labels[:, cols].T  # [t, n]
    scored = y >= 0
    yy = np.where(scored, y, 0)
    w = np.where(scored, np.asarray(SEVERITY_WEIGHTS)[yy], 0.0)
    if w.sum() == 0:
        return None
    w = w / w.sum()
    feats = np.ascontiguousarray(clip_logp(logp[cols][:, enter], clip).transpose(1, 0, 2, 3)).reshape(enter.size, -1)
    onehot_w = np.eye(3)[yy] * w[..., None]
    has = scored.any(axis=0)
    sev_label = ((yy == 2) & scored).any(axis=0)[has].astype(np.float64)
    sev_w = w.max(axis=0)[has]
    sev_w = sev_w / sev_w.sum() if sev_w.sum() > 0 else sev_w
    return _Problem(feats, y.shape, onehot_w, w, g == 0, has, scored[:, has] if g == 0 else scored, sev_label, sev_w)


def _objective(theta: np.ndarray, pr: _Problem, cfg: FitConfig) -> tuple[float, np.ndarray]:
    """The group's metric part (+ the shrinkage penalty) at theta = [v (Me), level factors (t)?, log severe?], with its gradient."""
    (t, n), me = pr.shape, pr.feats.shape[0]
    v = theta[:me]
    a = theta[me:me + t] if cfg.per_level else np.ones(t)
    b = theta[-1] if pr.spinal else 0.0
    base = (v @ pr.feats).reshape(t, n, 3)
    z = a[:, None, None] * base
    if pr.spinal:
        z[..., 2] += b
    # Log-softmax over the 3 grades with the class axis unrolled: numpy's reductions over a length-3
    # axis cost several times the arithmetic (measured: 2.6 of 9.8 s of a blend search in `max`).
    top = np.maximum(np.maximum(z[..., 0], z[..., 1]), z[..., 2])[..., None]
    e = np.exp(z - top)
    lse = top + np.log(e[..., 0] + e[..., 1] + e[..., 2])[..., None]
    logp = z - lse
    p = np.exp(logp)
    f = -float((pr.onehot_w * logp).sum())
    grad_z = p * pr.w[..., None] - pr.onehot_w  # [t, n, 3]
    if pr.spinal and pr.sev_label.size:
        # any_severe_spinal: the max over scored spinal levels of p(severe), a binary log loss.
        ps = np.where(pr.sev_scored, p[:, pr.sev_has, 2], -np.inf)  # [t, n']
        top = ps.argmax(axis=0)
        cols = np.flatnonzero(pr.sev_has)
        q = np.clip(ps[top, np.arange(len(top))], EPS, 1 - EPS)
        f -= float((pr.sev_w * (pr.sev_label * np.log(q) + (1 - pr.sev_label) * np.log1p(-q))).sum())
        dq = pr.sev_w * (-pr.sev_label / q + (1 - pr.sev_label) / (1 - q))
        pz = p[top, cols]  # [n', 3]
        grad_z[top, cols] += (dq * q)[:, None] * (np.eye(3)[2] - pz)
    grads = [pr.feats @ (grad_z * a[:, None, None]).reshape(-1)]
    if cfg.per_level:
        grads.append((grad_z * base).sum(axis=(1, 2)))
    if pr.spinal:
        grads.append(np.array([grad_z[..., 2].sum()]))
    grad = np.concatenate(grads)
    if cfg.shrink > 0:
        dv = v - v.mean()
        f += cfg.shrink * float(dv @ dv)
        grad[:me] += 2 * cfg.shrink * dv
        if cfg.per_level:
            f += cfg.shrink * float(((a - 1) ** 2).sum())
            grad[me:me + t] += 2 * cfg.shrink * (a - 1)
    return f, grad


@functools.cache
def _blas():
    """The process's BLAS thread pools, found once (finding them reads every loaded library: ~8 ms)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _solve(pr: _Problem, cfg: FitConfig) -> tuple[np.ndarray, int]:
    """L-BFGS-B from the equal-weight pool at T = 1: deterministic, bounded (v ≥ 0, level and severe factors in range)."""
    from scipy.optimize import minimize

    t, me = pr.shape[0], pr.feats.shape[0]
    x0 = [np.full(me, 1.0 / me)]
    bounds = [(0.0, None)] * me
    if cfg.per_level:
        x0.append(np.ones(t))
        bounds += [LEVEL_RANGE] * t
    if pr.spinal:
        x0.append(np.zeros(1))
        bounds.append(tuple(np.log(SEVERE_RANGE)))
    # One BLAS thread: the products are small, and idle BLAS threads spinning between them cost
    # 3× the CPU (measured; Ray's workers already run with one, a driver does not).
    with _blas().limit(limits=1):
        res = minimize(_objective, np.concatenate(x0), args=(pr, cfg), jac=True, method="L-BFGS-B", bounds=bounds,
                       options={"maxiter": 1000, "ftol": 1e-10, "gtol": 1e-6})
    return res.x, int(res.nfev)


def fit_group(
    logp: np.ndarray, labels: np.ndarray, g: int, eligible: np.ndarray, cfg: FitConfig = FitConfig(), uncapped: GroupFit | None = None
) -> GroupFit:
    """Fit group g's pool exactly on log_members output [25, M, n, 3] and labels [n, 25], over the eligible members [M].

    With a cap, the members kept are the largest weights of the uncapped fit of the same shrink,
    per_level and clip; pass that fit as `uncapped` when it is already known, to skip solving it again.
    """
    m_all = logp.shape[1]
    enter = np.flatnonzero(eligible)
    if enter.size == 0:
        raise ValueError(f"no member predicts the {GROUPS[g]} group")
    t = int((TARGET_GROUP == g).sum())
    pr = _problem(logp, labels, g, enter, cfg.clip)
    if pr is None:  # nothing labelled: the equal pool of the members that enter
        w = np.zeros(m_all)
        w[enter] = 1.0 / enter.size
        return GroupFit(w, 1.0, np.ones(t), 1.0, cfg.clip, float("nan"), 0)
    capped = 0 < cfg.cap < enter.size
    if capped and uncapped is not None:
        theta, n_eval = uncapped.weights[enter], 0  # the ranking is all a cap needs: w ∝ v
    else:
        theta, n_eval = _solve(pr, cfg)
    if capped:
        keep = np.sort(np.argsort(-theta[:enter.size], kind="stable")[: cfg.cap])
        enter = enter[keep]
        pr = _problem(logp, labels, g, enter, cfg.clip)
        theta, more = _solve(pr, cfg)
        n_eval += more
    loss, _ = _objective(theta, pr, FitConfig(clip=cfg.clip, per_level=cfg.per_level))
    v = theta[:enter.size]
    total = float(v.sum())
    w = np.zeros(m_all)
    if total > 1e-12:
        w[enter] = v / total
    else:  # every weight at 0: the uniform prediction, as a near-infinite temperature of the equal pool
        w[enter], total = 1.0 / enter.size, 1e-9
    levels = 1.0 / theta[enter.size:enter.size + t] if cfg.per_level else np.ones(t)
    severe = float(np.exp(theta[-1])) if g == 0 else 1.0
    return GroupFit(w, 1.0 / total, levels, severe, cfg.clip, loss, n_eval)


def blend_of(members: tuple[str, ...], fits: list[GroupFit]) -> Blend:
    """The Blend of three group fits (spinal, foraminal, subarticular)."""
    levels = np.ones(N_TARGETS)
    for g, f in enumerate(fits):
        levels[TARGET_GROUP == g] = f.level_temperatures
    return make_blend(
        members, np.stack([f.weights for f in fits]), [f.temperature for f in fits], fits[0].severe_scale,
        levels, [f.clip for f in fits],
    )


def fit_blend(
    logp: np.ndarray, labels: np.ndarray, members: tuple[str, ...],
    cfgs: FitConfig | tuple[FitConfig, FitConfig, FitConfig] = FitConfig(), eligible: np.ndarray | None = None,
) -> Blend:
    """The exact blend: each group fitted on log_members output [25, M, n, 3] and labels [n, 25] (eligible: [3, M] bool)."""
    cfgs = (cfgs,) * len(GROUPS) if isinstance(cfgs, FitConfig) else cfgs
    eligible = np.ones((len(GROUPS), len(members)), dtype=bool) if eligible is None else np.asarray(eligible, dtype=bool)
    return blend_of(members, [fit_group(logp, labels, g, eligible[g], c) for g, c in enumerate(cfgs)])


def save_blend(path: str, blend: Blend, report: dict[str, Any] | None = None) -> None:
    """Write blend.json atomically: {"blend": ..., **report}."""
    atomic_write_text(path, json.dumps({"blend": blend.as_dict(), **(report or {})}, indent=2))


def load_blend(path: str) -> Blend:
    """Read the Blend from a blend.json (old files included)."""
    return Blend.from_dict(json.loads(read_text(path))["blend"])
