"""Augmentations: the left–right flip swaps labels and points; jitter and intensity are seeded and sane."""

from __future__ import annotations

import numpy as np
import pytest

from spine_ray.models.localizer import POINT_NAMES
from spine_ray.schema import AXIAL_T2, CONDITIONS, LABEL_COLUMNS, SAGITTAL_T1, SAGITTAL_T2
from spine_ray.transforms import (
    MIRROR_CONDITION,
    flip_left_right,
    intensity,
    jitter_point,
    mirror_conditions,
    mirror_name,
    mirror_permutation,
    random_angle,
    sample_slice_shift,
    swap_left_right,
)


def test_mirror_names_and_conditions():
    assert mirror_name("left_neural_foraminal_narrowing_l4_l5") == "right_neural_foraminal_narrowing_l4_l5"
    assert mirror_name("right_subarticular_stenosis") == "left_subarticular_stenosis"
    assert mirror_name("spinal_canal_stenosis_l1_l2") == "spinal_canal_stenosis_l1_l2"
    assert [CONDITIONS[i] for i in MIRROR_CONDITION] == [
        "spinal_canal_stenosis",
        "right_neural_foraminal_narrowing",
        "left_neural_foraminal_narrowing",
        "right_subarticular_stenosis",
        "left_subarticular_stenosis",
    ]
    assert mirror_conditions(np.array([0, 1, 2, 3, 4, 1])).tolist() == [0, 2, 1, 4, 3, 2]
    # Swapping the 25 label columns is a permutation and its own inverse.
    cols = {c: i for i, c in enumerate(LABEL_COLUMNS)}
    once = swap_left_right(cols)
    assert set(once) == set(LABEL_COLUMNS) and swap_left_right(once) == cols
    assert once["right_subarticular_stenosis_l5_s1"] == cols["left_subarticular_stenosis_l5_s1"]


def test_axial_flip_mirrors_columns_and_swaps_left_right_labels_and_points():
    img = np.zeros((5, 1, 32, 40), np.float32)
    img[2, 0, 10, 5] = 1.0  # a mark on the image's left-hand side (the patient's right)
    labels = {"left_subarticular_stenosis": 2, "right_subarticular_stenosis": 0, "spinal_canal_stenosis": 1}
    points = {"left_subarticular_stenosis": np.array([2.0, 10.0, 30.0]),
              "right_subarticular_stenosis": np.array([2.0, 10.0, 5.0])}
    out, lab, pts = flip_left_right(img, "axial", labels, points)
    assert out[2, 0, 10, 34] == 1.0 and out.sum() == 1.0
    assert lab == {"right_subarticular_stenosis": 2, "left_subarticular_stenosis": 0, "spinal_canal_stenosis": 1}
    # The old right point (col 5) is now the left point, at col 39 - 5 = 34 — on the mark.
    assert pts["left_subarticular_stenosis"].tolist() == [2.0, 10.0, 34.0]
    assert pts["right_subarticular_stenosis"].tolist() == [2.0, 10.0, 9.0]
    # The label still describes the anatomy under its point.
    r, c = pts["left_subarticular_stenosis"][1:].astype(int)
    assert out[2, 0, r, c] == 1.0
    # Inputs untouched; flipping twice is the identity.
    assert img[2, 0, 10, 5] == 1.0 and labels["left_subarticular_stenosis"] == 2
    back, lab2, pts2 = flip_left_right(out, "axial", lab, pts)
    assert np.array_equal(back, img) and lab2 == labels
    assert all(np.allclose(pts2[k], points[k]) for k in points)


def test_sagittal_flip_reverses_slices_not_columns_and_swaps_foraminal_labels():
    img = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)
    labels = {"left_neural_foraminal_narrowing_l4_l5": 1, "right_neural_foraminal_narrowing_l4_l5": 2}
    points = {"left_neural_foraminal_narrowing_l4_l5": np.array([[3.0, 2.0, 5.0]])}
    out, lab, pts = flip_left_right(img, "sagittal", labels, points)
    assert np.array_equal(out, img[::-1])
    assert np.array_equal(out[0], img[3])  # in-plane unchanged
    assert lab == {"right_neural_foraminal_narrowing_l4_l5": 1, "left_neural_foraminal_narrowing_l4_l5": 2}
    assert pts["right_neural_foraminal_narrowing_l4_l5"].tolist() == [[0.0, 2.0, 5.0]]
    with pytest.raises(ValueError):
        flip_left_right(img, "coronal")


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


def test_jitter_point_is_in_mm():
    rng = np.random.default_rng(0)
    moves = np.array([jitter_point(rng, (5, 100, 100), (0.5, 2.0), xy_mm=2.0, slice_sigma=1e-9)[0]
                      for _ in range(4000)]) - np.array([5, 100, 100])
    assert np.all(moves[:, 0] == 0)
    # 2 mm is 4 rows at 0.5 mm but 1 column at 2 mm.
    assert moves[:, 1].std() == pytest.approx(4.0, rel=0.1)
    assert moves[:, 2].std() == pytest.approx(1.0, rel=0.1)
    p, shift = jitter_point(np.random.default_rng(3), (5, 100, 100), (1, 1), slice_errors=np.array([2]))
    assert shift == 2 and p[0] == 7


def test_intensity_is_seeded_bounded_and_changes_the_image():
    x = np.random.default_rng(0).uniform(size=(5, 1, 16, 16)).astype(np.float32)
    a = intensity(x, np.random.default_rng(7))
    b = intensity(x, np.random.default_rng(7))
    assert np.array_equal(a, b) and a.shape == x.shape and a.dtype == np.float32
    assert a.min() >= 0 and a.max() <= 1 and not np.allclose(a, x)
    assert np.allclose(intensity(x, np.random.default_rng(1), (1, 1), (1, 1), 0.0, 0.0), x)


def test_flip_a_grader_sample_with_per_target_crops():
    # Two sagittal T1 crops (left and right foramen at L4/L5), slices on axis 1.
    sample = np.zeros((2, 5, 1, 8, 8), np.float32)
    sample[0, 0] = 1.0  # the left crop's first slice is bright
    condition = np.array([1, 2])
    severity = np.array([2, 0])
    out, _, _ = flip_left_right(sample, "sagittal", slice_axis=1)
    assert out[0, 4].max() == 1.0 and out[0, 0].max() == 0.0 and out[1].max() == 0.0
    # Each crop keeps its severity; its condition becomes the mirror side.
    assert mirror_conditions(condition).tolist() == [2, 1] and severity.tolist() == [2, 0]


def test_random_angle_is_bounded_and_seeded():
    a = [random_angle(np.random.default_rng(i), 10.0) for i in range(200)]
    assert max(map(abs, a)) <= 10.0 and np.std(a) > 4.0
    assert random_angle(np.random.default_rng(5)) == random_angle(np.random.default_rng(5))


def test_mirror_permutation_swaps_the_t1_heatmap_channels():
    names = POINT_NAMES[SAGITTAL_T1]
    assert set(names) <= set(LABEL_COLUMNS) and len(names) == 10
    perm = mirror_permutation(names)
    assert perm.tolist() == [5, 6, 7, 8, 9, 0, 1, 2, 3, 4]
    assert mirror_permutation(POINT_NAMES[SAGITTAL_T2]).tolist() == [0, 1, 2, 3, 4]
    assert mirror_permutation(POINT_NAMES[AXIAL_T2]).tolist() == [1, 0]
    # Flip a T1 volume with its [P, 3] points: the same answer as the dict form.
    pts = np.random.default_rng(0).uniform(0, 15, size=(10, 3))
    vol = np.zeros((16, 8, 8), np.float32)
    _, _, as_dict = flip_left_right(vol, "sagittal", points=dict(zip(names, pts, strict=True)))
    moved = pts[perm].copy()
    moved[:, 0] = 15 - moved[:, 0]
    assert np.allclose(moved, np.stack([as_dict[n] for n in names]))
    with pytest.raises(KeyError):
        mirror_permutation(["left_subarticular_stenosis"])
