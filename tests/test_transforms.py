"""Augmentations: left/right names pair up; slice shifts, angles and intensity are seeded and sane."""

from __future__ import annotations

import numpy as np
import pytest

from spine_ray.core.schema import LABEL_COLUMNS
from spine_ray.data.transforms import intensity, mirror_name, random_angle, sample_slice_shift


def test_mirror_name_pairs_left_and_right():
    assert mirror_name("left_neural_foraminal_narrowing_l4_l5") == "right_neural_foraminal_narrowing_l4_l5"
    assert mirror_name("right_subarticular_stenosis") == "left_subarticular_stenosis"
    assert mirror_name("spinal_canal_stenosis_l1_l2") == "spinal_canal_stenosis_l1_l2"
    # Mirroring the 25 label columns is a permutation and its own inverse.
    once = [mirror_name(c) for c in LABEL_COLUMNS]
    assert set(once) == set(LABEL_COLUMNS) and [mirror_name(c) for c in once] == list(LABEL_COLUMNS)
    assert once[LABEL_COLUMNS.index("left_subarticular_stenosis_l5_s1")] == "right_subarticular_stenosis_l5_s1"


def test_slice_shift_follows_the_empirical_errors_or_a_small_gaussian():
    rng = np.random.default_rng(0)
    errors = np.array([0, 0, 0, 1, -1, 3])
    draws = np.array([sample_slice_shift(rng, errors) for _ in range(3000)])
    assert set(np.unique(draws)) <= {-1, 0, 1, 3}
    assert (draws == 0).mean() == pytest.approx(0.5, abs=0.05)
    assert (draws == 3).mean() == pytest.approx(1 / 6, abs=0.03)
    g = np.array([sample_slice_shift(rng, None, sigma=0.5) for _ in range(3000)])
    assert np.abs(g).max() <= 3 and (g == 0).mean() > 0.6
    assert sample_slice_shift(np.random.default_rng(1), errors) == sample_slice_shift(np.random.default_rng(1), errors)


def test_intensity_is_seeded_bounded_and_changes_the_image():
    x = np.random.default_rng(0).uniform(size=(5, 1, 16, 16)).astype(np.float32)
    a = intensity(x, np.random.default_rng(7))
    b = intensity(x, np.random.default_rng(7))
    assert np.array_equal(a, b) and a.shape == x.shape and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1 and not np.allclose(a, x)
    assert np.allclose(intensity(x, np.random.default_rng(1), (1, 1), (1, 1), 0.0, 0.0), x)


def test_random_angle_is_bounded_and_seeded():
    a = [random_angle(np.random.default_rng(i), 10.0) for i in range(200)]
    assert max(map(abs, a)) <= 10.0 and np.std(a) > 4.0
    assert random_angle(np.random.default_rng(5)) == random_angle(np.random.default_rng(5))
