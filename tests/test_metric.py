"""The competition metric: hand-computed cases, the real uniform score, invariances."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from spine_ray.core.schema import N_TARGETS, label_matrix, read_labels, row_ids, submission_frame
from spine_ray.ensemble.metric import score_arrays, score_frames


def uniform(n: int) -> np.ndarray:
    return np.full((n, N_TARGETS, 3), 1 / 3)


def test_uniform_on_real_train_csv_is_0_9994(real_tables):
    labels = read_labels(str(real_tables / "train.csv"))
    sub = submission_frame(labels["study_id"], uniform(len(labels)))
    assert round(score_frames(labels, sub).score, 4) == 0.9994


def test_hand_computed_single_study():
    y = np.zeros((1, N_TARGETS), dtype=np.int8)
    y[0, 0] = 2  # spinal L1/L2 severe (weight 4), the rest normal (weight 1)
    p = uniform(1)
    p[0, 0] = [0.2, 0.2, 0.6]
    s = score_arrays(y, p)
    spinal = (4 * -math.log(0.6) + 4 * -math.log(1 / 3)) / (4 + 4)
    assert s.spinal == pytest.approx(spinal)
    assert s.foraminal == pytest.approx(math.log(3))
    assert s.subarticular == pytest.approx(math.log(3))
    # any severe: label 1, prediction max p(severe) = 0.6, weight = max sample weight = 4
    assert s.any_severe_spinal == pytest.approx(-math.log(0.6))
    assert s.score == pytest.approx((spinal + 2 * math.log(3) - math.log(0.6)) / 4)


def test_rows_are_normalised_and_scaling_a_row_changes_nothing():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=(7, N_TARGETS)).astype(np.int8)
    p = rng.random((7, N_TARGETS, 3)) + 0.01
    scale = rng.random((7, N_TARGETS, 1)) * 100 + 0.1
    assert score_arrays(y, p).score == pytest.approx(score_arrays(y, p * scale).score)


def test_row_order_of_the_submission_does_not_matter():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, size=(5, N_TARGETS)).astype(np.int8)
    studies = [11, 22, 33, 44, 55]
    labels = pd.DataFrame({"study_id": studies})
    from spine_ray.core.schema import labels_from_matrix

    labels = labels_from_matrix(studies, y)
    sub = submission_frame(studies, rng.random((5, N_TARGETS, 3)) + 0.05)
    a = score_frames(labels, sub)
    b = score_frames(labels, sub.sample(frac=1, random_state=3))
    assert a == b


def test_unlabelled_rows_are_ignored():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, size=(4, N_TARGETS)).astype(np.int8)
    p = rng.random((4, N_TARGETS, 3)) + 0.05
    y2 = y.copy()
    y2[0, 20] = -1
    p2 = p.copy()
    p2[0, 20] = [1e-9, 1e-9, 1.0]  # a terrible prediction on an unscored row
    p[0, 20] = p2[0, 20]
    ref = score_arrays(y2, p)
    assert score_arrays(y2, p2) == ref
    assert score_arrays(y, p2).score > ref.score


def test_perfect_and_confident_wrong_are_finite():
    y = np.zeros((2, N_TARGETS), dtype=np.int8)
    p = np.zeros((2, N_TARGETS, 3))
    p[..., 0] = 1.0
    s = score_arrays(y, p)
    assert 0 <= s.score < 1e-6  # clipped away from 0 but tiny; single-class binary does not raise
    p_bad = np.zeros((2, N_TARGETS, 3))
    p_bad[..., 2] = 1.0
    assert np.isfinite(score_arrays(y, p_bad).score)


def test_scoring_missing_a_labelled_row_raises():
    y = np.zeros((1, N_TARGETS), dtype=np.int8)
    from spine_ray.core.schema import labels_from_matrix

    labels = labels_from_matrix([7], y)
    sub = submission_frame([7], uniform(1)).iloc[1:]
    with pytest.raises(ValueError, match="lacks 1 scored"):
        score_frames(labels, sub)


def test_score_frames_matches_score_arrays():
    rng = np.random.default_rng(4)
    y = rng.integers(-1, 3, size=(6, N_TARGETS)).astype(np.int8)
    from spine_ray.core.schema import labels_from_matrix

    studies = list(range(100, 106))
    labels = labels_from_matrix(studies, y)
    assert (label_matrix(labels) == y).all()
    p = rng.random((6, N_TARGETS, 3)) + 0.01
    assert score_frames(labels, submission_frame(studies, p)).score == pytest.approx(score_arrays(y, p).score)
    assert len(row_ids(studies)) == 6 * 25
