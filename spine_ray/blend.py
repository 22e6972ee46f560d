"""The ensemble blend: per condition group, a weighted log-linear pool of members with a temperature.

For the targets of group g (spinal, foraminal, subarticular), with member probabilities p_m:

    logits = Σ_m w_gm · log p_m / T_g,   p = softmax(logits);   spinal only: p(severe) × s, renormalised.

Why log space (a weighted geometric mean) rather than a weighted mean of probabilities:
- the metric is a log loss, and the pooled log loss is convex in the unnormalised weights w/T
  (it is a multinomial logistic model with fixed features), so the search surface has one basin;
- the temperature is then exactly the logit temperature that the 3rd-place team tuned, and the
  severe factor is the 2nd-place team's p(severe) × ~1.25, both as one extra logit term;
- one-hot weights with T = 1 reproduce that member exactly, so the best single member is a point
  of the search space (the blend can never be worse on the folds it is fitted on).
The price: a member that is confidently wrong (p ≈ 0) pulls the pool harder than in a linear mean;
members are clipped to the metric's eps first, and a weight can go to 0.

Pure numpy; the search around it (Ray Tune + Optuna) lives in `spine_ray.tune_ensemble`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from spine_ray.metric import Score, normalise, score_arrays
from spine_ray.schema import CONDITION_GROUP, GROUPS, LEVELS, N_TARGETS, PROB_COLUMNS, row_ids
from spine_ray.storage import atomic_write_text, read_text

TARGET_GROUP: np.ndarray = np.repeat(np.asarray(CONDITION_GROUP), len(LEVELS))  # [25]
SPINAL: np.ndarray = TARGET_GROUP == 0  # [25]
TEMPERATURE_RANGE: tuple[float, float] = (0.5, 2.0)
SEVERE_RANGE: tuple[float, float] = (0.5, 3.0)


@dataclass(frozen=True)
class Blend:
    """Per group (spinal, foraminal, subarticular): member weights and a temperature; a spinal severe factor."""

    members: tuple[str, ...]
    weights: tuple[tuple[float, ...], ...]  # [3 groups][M members], non-negative, each sums to 1
    temperatures: tuple[float, float, float] = (1.0, 1.0, 1.0)
    severe_scale: float = 1.0  # multiplies spinal p(severe) before renormalising

    def __post_init__(self) -> None:
        w = np.asarray(self.weights, dtype=np.float64)
        if not self.members or w.shape != (len(GROUPS), len(self.members)):
            raise ValueError(f"weights must be [{len(GROUPS)}, {len(self.members)}], got {w.shape}")
        if (w < 0).any() or not np.allclose(w.sum(axis=1), 1.0):
            raise ValueError("weights must be non-negative and sum to 1 per group (use make_blend)")
        if len(self.temperatures) != len(GROUPS) or min(self.temperatures) <= 0 or self.severe_scale <= 0:
            raise ValueError("temperatures (one per group) and severe_scale must be positive")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: weights named by group and member."""
        return {
            "members": list(self.members),
            "weights": {g: dict(zip(self.members, map(float, ws), strict=True)) for g, ws in zip(GROUPS, self.weights, strict=True)},
            "temperatures": dict(zip(GROUPS, map(float, self.temperatures), strict=True)),
            "severe_scale": float(self.severe_scale),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Blend:
        """Inverse of as_dict."""
        members = tuple(d["members"])
        return cls(
            members,
            tuple(tuple(float(d["weights"][g][m]) for m in members) for g in GROUPS),
            tuple(float(d["temperatures"][g]) for g in GROUPS),
            float(d["severe_scale"]),
        )


def make_blend(members: list[str] | tuple[str, ...], raw_weights: np.ndarray, temperatures=(1.0, 1.0, 1.0), severe_scale: float = 1.0) -> Blend:
    """A Blend from raw non-negative weights [3, M] (or [M] for all groups), normalised per group; all-zero → equal."""
    w = np.broadcast_to(np.asarray(raw_weights, dtype=np.float64), (len(GROUPS), len(members))).copy()
    if (w < 0).any():
        raise ValueError("weights must be non-negative")
    total = w.sum(axis=1, keepdims=True)
    w = np.where(total > 0, w / np.where(total > 0, total, 1.0), 1.0 / len(members))
    return Blend(tuple(members), tuple(map(tuple, w.tolist())), tuple(map(float, temperatures)), float(severe_scale))


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


def blend_logp(blend: Blend, logp: np.ndarray) -> np.ndarray:
    """The fast path: blend log_members output [25, M, n, 3] → probabilities [n, 25, 3]."""
    t, m, n, _ = logp.shape
    w = np.asarray(blend.weights)[TARGET_GROUP] / np.asarray(blend.temperatures)[TARGET_GROUP, None]  # [25, M]
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
    """Members' OOF predictions aligned to studies × targets, and how many rows each took from the prior."""

    members: tuple[str, ...]
    study_ids: tuple[int, ...]
    probs: np.ndarray  # [M, n, 25, 3]
    filled: dict[str, int] = field(default_factory=dict)  # member → rows filled from the prior


def member_matrix(oof: pd.DataFrame, study_ids: list[int], members: list[str], prior: np.ndarray) -> MemberMatrix:
    """Align an OOF table (row_id, member, normal_mild, moderate, severe) by row_id; rows a member lacks get the prior [25, 3]."""
    want = pd.Index(row_ids(study_ids))
    fill = np.tile(np.asarray(prior, dtype=np.float64), (len(study_ids), 1))  # [n*25, 3]
    out = np.empty((len(members), len(study_ids) * N_TARGETS, 3))
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
        filled[m] = int(hole.sum())
    return MemberMatrix(tuple(members), tuple(int(s) for s in study_ids), out.reshape(len(members), len(study_ids), N_TARGETS, 3), filled)


def group_objectives(s: Score) -> tuple[float, float, float]:
    """The part of the score each group's parameters move: spinal (+ any_severe_spinal), foraminal, subarticular."""
    return (s.spinal + s.any_severe_spinal, s.foraminal, s.subarticular)


def score_blend(blend: Blend, logp: np.ndarray, labels: np.ndarray) -> Score:
    """The exact metric of a blend of log_members output [25, M, n, 3] against labels [n, 25]."""
    return score_arrays(labels, blend_logp(blend, logp))


# Optuna parameter names: w{group}_{member index}, t{group}, severe.
def blend_params(blend: Blend) -> dict[str, float]:
    """A Blend as a flat search point (the inverse of params_blend, up to weight scale)."""
    p = {f"w{g}_{i}": float(w) for g, ws in enumerate(blend.weights) for i, w in enumerate(ws)}
    p |= {f"t{g}": float(t) for g, t in enumerate(blend.temperatures)}
    return p | {"severe": float(blend.severe_scale)}


def params_blend(params: dict[str, float], members: tuple[str, ...]) -> Blend:
    """A flat search point → Blend (weights normalised per group)."""
    w = np.array([[params[f"w{g}_{i}"] for i in range(len(members))] for g in range(len(GROUPS))])
    return make_blend(members, w, [params[f"t{g}"] for g in range(len(GROUPS))], params["severe"])


def compose(blends: list[Blend]) -> Blend:
    """One blend taking group g's parameters from blends[g] (the score is separable by group)."""
    return Blend(
        blends[0].members,
        tuple(b.weights[g] for g, b in enumerate(blends)),
        tuple(b.temperatures[g] for g, b in enumerate(blends)),
        blends[0].severe_scale,
    )


def save_blend(path: str, blend: Blend, report: dict[str, Any] | None = None) -> None:
    """Write blend.json atomically: {"blend": ..., **report}."""
    atomic_write_text(path, json.dumps({"blend": blend.as_dict(), **(report or {})}, indent=2))


def load_blend(path: str) -> Blend:
    """Read the Blend from a blend.json."""
    return Blend.from_dict(json.loads(read_text(path))["blend"])
