"""The synthetic label model: a correlated latent severity per study × target, noisy ordinal labels.

Each of the 25 targets of a study has a continuous latent severity z. The image renderer narrows
the matching structure as a fixed, level-independent function of z (see `narrowing`), and the
label is drawn from z by an ordered-probit model with common thresholds 0 and 1:

    y = 0 if z + σ·ε < 0,  1 if 0 ≤ z + σ·ε < 1,  2 otherwise,   ε ~ N(0, 1).

So P(y | z) is known exactly and is written as the oracle submission: the best any model that
sees z perfectly can do. Per target, z = μ + s·u with u standard normal and correlated across
targets (a condition × level Kronecker structure plus a study-wide floor); μ, s and σ are
solved so that the label frequencies equal those of the real train.csv exactly, and σ is the
fraction `label_noise` of the total spread, the one knob that sets the oracle's score.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from spine_ray.core.schema import CONDITIONS, LEVELS, N_TARGETS

# Counts (Normal/Mild, Moderate, Severe, empty) per label column, in LABEL_COLUMNS order, from
# the real competition train.csv (1,975 studies). Aggregates only; the table itself is not copied.
REAL_COUNTS: np.ndarray = np.array(
    [
        (1886, 67, 21, 1), (1770, 151, 53, 1), (1622, 230, 122, 1), (1482, 237, 255, 1),
        (1904, 51, 19, 1),
        (1908, 63, 2, 2), (1791, 171, 11, 2), (1522, 411, 40, 2), (1204, 629, 140, 2),
        (1247, 520, 206, 2),
        (1891, 63, 13, 8), (1793, 168, 6, 8), (1512, 414, 41, 8), (1208, 629, 130, 8),
        (1281, 496, 190, 8),
        (1690, 93, 28, 164), (1555, 255, 83, 82), (1324, 454, 194, 3), (887, 624, 461, 3),
        (1408, 409, 147, 11),
        (1680, 110, 24, 161), (1577, 243, 73, 82), (1322, 454, 197, 2), (891, 622, 460, 2),
        (1399, 396, 173, 7),
    ],
    dtype=np.float64,
)
REAL_FREQ: np.ndarray = REAL_COUNTS[:, :3] / REAL_COUNTS[:, :3].sum(axis=1, keepdims=True)  # [25, 3]
REAL_EMPTY: np.ndarray = REAL_COUNTS[:, 3] / REAL_COUNTS.sum(axis=1)  # [25]

THRESHOLDS: tuple[float, float] = (0.0, 1.0)
_SUBARTICULAR = (3, 4)


@dataclass(frozen=True)
class LabelConfig:
    """Knobs of the label model; defaults are calibrated against the real train.csv."""

    label_noise: float = 0.32  # σ as a fraction of each target's total latent spread
    level_rho: float = 0.63  # latent correlation between adjacent levels of one condition
    spinal_subarticular: float = 0.86  # same-level latent correlation, spinal ↔ each recess
    subarticular_sides: float = 0.72  # same-level latent correlation, left ↔ right recess
    foraminal_sides: float = 0.52  # same-level latent correlation, left ↔ right foramen
    foraminal_other: float = 0.5  # same-level foramen ↔ spinal canal or recess
    study_floor: float = 0.15  # correlation shared by every pair of targets of a study
    empty_scale: float = 1.0  # multiplies the real empty-label rates


def condition_corr(cfg: LabelConfig) -> np.ndarray:
    """Latent correlation between the 5 conditions at one level: [5, 5]."""
    s, f, o = cfg.spinal_subarticular, cfg.foraminal_sides, cfg.foraminal_other
    a = cfg.subarticular_sides
    # order: spinal, left foramen, right foramen, left recess, right recess
    return np.array(
        [
            [1.0, o, o, s, s],
            [o, 1.0, f, o, o * 0.8],
            [o, f, 1.0, o * 0.8, o],
            [s, o, o * 0.8, 1.0, a],
            [s, o * 0.8, o, a, 1.0],
        ]
    )


def latent_corr(cfg: LabelConfig) -> np.ndarray:
    """Latent correlation of the 25 targets (condition-major like LABEL_COLUMNS): [25, 25]."""
    lv = np.arange(len(LEVELS))
    level = cfg.level_rho ** np.abs(lv[:, None] - lv[None, :])
    r = (1 - cfg.study_floor) * np.kron(condition_corr(cfg), level) + cfg.study_floor
    return r


def _probit(p: np.ndarray) -> np.ndarray:
    nd = NormalDist()
    return np.array([nd.inv_cdf(float(min(max(x, 1e-6), 1 - 1e-6))) for x in np.ravel(p)]).reshape(np.shape(p))


_erf = np.vectorize(math.erf, otypes=[np.float64])


def normal_cdf(x: np.ndarray) -> np.ndarray:
    """Standard normal CDF, elementwise."""
    return 0.5 * (1.0 + _erf(np.asarray(x, dtype=np.float64) / math.sqrt(2.0)))


def column_params(cfg: LabelConfig, freq: np.ndarray = REAL_FREQ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-target (μ, s, σ) so that thresholds 0 and 1 reproduce `freq` [25, 3] exactly."""
    q0 = _probit(freq[:, 0])
    q1 = _probit(freq[:, 0] + freq[:, 1])
    total = (THRESHOLDS[1] - THRESHOLDS[0]) / (q1 - q0)  # sd of z + σε
    mu = THRESHOLDS[0] - q0 * total
    sigma = cfg.label_noise * total
    s = total * math.sqrt(1.0 - cfg.label_noise**2)
    return mu, s, sigma


def oracle_probs(latent: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """P(label = 0, 1, 2 | latent) under the ordered-probit model: [..., 25, 3]."""
    c0 = normal_cdf((THRESHOLDS[0] - latent) / sigma)
    c1 = normal_cdf((THRESHOLDS[1] - latent) / sigma)
    return np.stack([c0, c1 - c0, 1.0 - c1], axis=-1)


def sample_empty(n_studies: int, rng: np.random.Generator, cfg: LabelConfig) -> np.ndarray:
    """Which labels are missing: bool [n, 25]; recess rows go missing on both sides and from the top down."""
    rate = np.clip(REAL_EMPTY * cfg.empty_scale, 0.0, 1.0).reshape(len(CONDITIONS), len(LEVELS))
    empty = rng.random((n_studies, len(CONDITIONS), len(LEVELS))) < rate
    # Axial coverage that stops short of the upper discs: both recesses of the top levels.
    sub = rate[list(_SUBARTICULAR)].mean(axis=0)
    depth = rng.random(n_studies)
    sub_missing = depth[:, None] < sub[None, :]
    for c in _SUBARTICULAR:
        empty[:, c] = sub_missing
    return empty.reshape(n_studies, N_TARGETS)


def sample_labels(
    n_studies: int, rng: np.random.Generator, cfg: LabelConfig | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw labels int8 [n, 25] (-1 empty), latents [n, 25] and oracle probabilities [n, 25, 3]."""
    cfg = cfg or LabelConfig()
    mu, s, sigma = column_params(cfg)
    chol = np.linalg.cholesky(latent_corr(cfg))
    u = rng.standard_normal((n_studies, N_TARGETS)) @ chol.T
    latent = mu + s * u
    noisy = latent + sigma * rng.standard_normal((n_studies, N_TARGETS))
    labels = (noisy >= THRESHOLDS[0]).astype(np.int8) + (noisy >= THRESHOLDS[1]).astype(np.int8)
    labels[sample_empty(n_studies, rng, cfg)] = -1
    return labels, latent, oracle_probs(latent, sigma)


def narrowing(latent: np.ndarray) -> np.ndarray:
    """Remaining fraction (0.1–1) of a structure's normal width for a latent severity; decreasing.

    Steepest between the thresholds 0 and 1 (≈0.84 → ≈0.26 of normal width), where the label
    depends on it, so that a small CNN can see the difference at low resolution.
    """
    z = np.asarray(latent, dtype=np.float64)
    return 0.1 + 0.9 / (1.0 + np.exp(3.0 * (z - 0.5)))
