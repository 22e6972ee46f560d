"""The synthetic label model: real label frequencies and correlations, a known ceiling, determinism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spine_ray.core.schema import label_matrix, read_labels
from spine_ray.ensemble.metric import score_arrays
from spine_ray.ensemble.prior import fit_prior, predict_prior
from spine_ray.synth.labels import REAL_FREQ, LabelConfig, narrowing, sample_labels
from spine_ray.synth.phantom import CSF, FAT, NERVE, sample_phantom

N = 4000


@pytest.fixture(scope="module")
def drawn():
    return sample_labels(N, np.random.default_rng(123), LabelConfig())


@pytest.fixture(scope="module")
def real(real_tables):
    return label_matrix(read_labels(str(real_tables / "train.csv")))


def _freq(m: np.ndarray) -> np.ndarray:
    """Per column: fractions of Normal/Mild, Moderate, Severe among labelled rows, and empty overall."""
    lab = np.stack([((m == k).sum(0) / np.maximum((m >= 0).sum(0), 1)) for k in range(3)], axis=1)
    return np.concatenate([lab, (m < 0).mean(0)[:, None]], axis=1)


def _corr_summary(m: np.ndarray) -> dict[str, float]:
    """Mean label correlations by kind of pair (ordinal codes, empty cells dropped pairwise)."""
    c = pd.DataFrame(np.where(m >= 0, m, np.nan).astype(float)).corr().to_numpy()

    def ix(cond: int, lv: int) -> int:
        return cond * 5 + lv

    return {
        "spinal-subarticular same level": np.mean([c[ix(0, lv), ix(s, lv)] for lv in range(5) for s in (3, 4)]),
        "subarticular left-right": np.mean([c[ix(3, lv), ix(4, lv)] for lv in range(5)]),
        "foraminal left-right": np.mean([c[ix(1, lv), ix(2, lv)] for lv in range(5)]),
        "spinal-foraminal same level": np.mean([c[ix(0, lv), ix(f, lv)] for lv in range(5) for f in (1, 2)]),
        "adjacent levels": np.mean([c[ix(k, lv), ix(k, lv + 1)] for lv in range(4) for k in range(5)]),
        "two levels apart": np.mean([c[ix(k, lv), ix(k, lv + 2)] for lv in range(3) for k in range(5)]),
    }


def test_frequencies_match_real_train_csv(drawn, real):
    labels, _, _ = drawn
    err = np.abs(_freq(labels) - _freq(real))
    assert err.max() < 0.03, f"worst column error {err.max():.3f}"
    assert np.allclose(REAL_FREQ, _freq(real)[:, :3])  # the stored constants are the real ones


def test_empty_labels_about_one_to_two_percent_mostly_upper_subarticular(drawn):
    labels, _, _ = drawn
    empty = labels < 0
    assert 0.005 < empty.mean() < 0.025
    upper_sub = empty.reshape(N, 5, 5)[:, 3:, :2].sum()
    assert upper_sub > 0.6 * empty.sum()


def test_correlations_like_real(drawn, real):
    labels, _, _ = drawn
    got, want = _corr_summary(labels), _corr_summary(real)
    assert 0.4 < want["spinal-subarticular same level"] < 0.6  # the real data says so
    for k in want:
        assert abs(got[k] - want[k]) < 0.08, f"{k}: synthetic {got[k]:.3f}, real {want[k]:.3f}"
        assert got[k] > 0.1


def test_oracle_ceiling_and_prior(drawn):
    labels, _, oracle = drawn
    train, test = labels[: N // 2], labels[N // 2 :]
    o = score_arrays(test, oracle[N // 2 :]).score
    p = score_arrays(test, predict_prior(fit_prior(train), len(test))).score
    assert 0.27 < o < 0.33, o
    assert 0.75 < p < 0.83, p


def test_oracle_is_bayes_optimal_for_its_labels(drawn):
    labels, latent, oracle = drawn
    assert np.allclose(oracle.sum(-1), 1.0) and (oracle >= 0).all()
    # The oracle's calibration: among rows it gives p(severe) > 0.5, about that share is severe.
    sel = (oracle[..., 2] > 0.5) & (labels >= 0)
    assert abs((labels[sel] == 2).mean() - oracle[..., 2][sel].mean()) < 0.03
    # Latent and label agree in order.
    assert np.corrcoef(latent[labels >= 0], labels[labels >= 0])[0, 1] > 0.5


def test_same_seed_same_labels():
    a = sample_labels(50, np.random.default_rng(7))
    b = sample_labels(50, np.random.default_rng(7))
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)


def test_narrowing_is_monotone_and_strong():
    z = np.linspace(-3, 4, 50)
    g = narrowing(z)
    assert (np.diff(g) < 0).all()
    assert g[0] > 0.95 and g[-1] < 0.2
    assert narrowing(np.array([0.0]))[0] - narrowing(np.array([1.0]))[0] > 0.25  # Normal → Moderate


@pytest.mark.parametrize("z", [-3.0, 0.0, 1.0, 2.5, 4.0])
def test_annotated_points_lie_in_their_structure(z):
    ph = sample_phantom(np.full(25, z), np.random.default_rng(int(z * 10) + 50))
    for (c, lv), p in ph.target_points().items():
        tissue = int(ph.tissue(p[None])[0])
        allowed = (FAT, NERVE) if c in (1, 2) else (CSF, NERVE)
        assert tissue in allowed, (c, lv, tissue)
