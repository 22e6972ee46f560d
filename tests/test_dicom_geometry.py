"""Geometry: affines, pixel↔patient and nearest-slice projection against hand-built geometries."""

from __future__ import annotations

import numpy as np
import pytest
from dicomfiles import axial, rotation, sagittal

from spine_ray.data import geometry


def test_affine_matches_the_dicom_formula_with_non_square_pixels():
    g = sagittal(5, origin=(-10.0, -20.0, 30.0), pixel_spacing=(0.5, 0.8), step=3.0)
    a = geometry.affine(g.positions, g.orientation, g.pixel_spacing)
    x, y = np.array(g.orientation[:3]), np.array(g.orientation[3:])
    k, i, j = 2, 10, 20
    expected = g.positions[0] + j * 0.8 * x + i * 0.5 * y + k * (g.positions[-1] - g.positions[0]) / 4
    np.testing.assert_allclose(geometry.voxel_to_patient(a, [k, i, j]), expected)
    # Columns run along X = +y (posterior), rows along Y = -z: row spacing must not be swapped.
    np.testing.assert_allclose(a[:3, 2], [0, 0.8, 0])
    np.testing.assert_allclose(a[:3, 1], [0, 0, -0.5])
    np.testing.assert_allclose(a[:3, 0], [-3.0, 0, 0])  # normal = cross(+y, -z) = -x


def test_patient_to_voxel_inverts_an_oblique_affine():
    g = axial(7, tilt_deg=17.0, origin=(3.0, -4.0, 50.0), pixel_spacing=(0.7, 0.4), step=4.5)
    a = geometry.affine(g.positions, g.orientation, g.pixel_spacing)
    kij = np.array([[0, 0, 0], [6, 100.5, 3.25], [3.3, -2, 40]])
    np.testing.assert_allclose(geometry.patient_to_voxel(a, geometry.voxel_to_patient(a, kij)), kij, atol=1e-9)
    # The last slice's origin is its ImagePositionPatient.
    np.testing.assert_allclose(geometry.voxel_to_patient(a, [6, 0, 0]), g.positions[6])


def test_pixel_patient_round_trip_and_signed_distance():
    g = axial(3, tilt_deg=-8.0, pixel_spacing=(0.6, 0.3))
    p = geometry.pixel_to_patient(g.positions[1], g.orientation, g.pixel_spacing, row=12.0, col=30.0)
    row, col, d = geometry.patient_to_pixel(p, g.positions[1], g.orientation, g.pixel_spacing)
    assert (row, col, d) == pytest.approx((12.0, 30.0, 0.0), abs=1e-9)
    n = geometry.slice_normal(g.orientation)
    assert geometry.patient_to_pixel(p + 2.5 * n, g.positions[1], g.orientation, g.pixel_spacing)[2] == pytest.approx(2.5)


def test_slice_distances_order_by_normal_not_by_index():
    g = axial(4, step=5.0)
    shuffled = g.positions[[2, 0, 3, 1]]
    assert list(np.argsort(geometry.slice_distances(shuffled, g.orientation))) == [1, 3, 0, 2]


def test_orientation_angle():
    g = axial(1)
    tilted = axial(1, tilt_deg=0.8)
    assert geometry.orientation_angle(g.orientation, g.orientation) == pytest.approx(0.0, abs=1e-6)
    assert geometry.orientation_angle(g.orientation, tilted.orientation) == pytest.approx(0.8, abs=1e-6)
    r = rotation((0, 0, 1), 5.0)
    spun = (*(r @ g.orientation[:3]), *(r @ g.orientation[3:]))
    assert geometry.orientation_angle(g.orientation, spun) == pytest.approx(5.0, abs=1e-6)


def test_sagittal_point_projects_to_the_nearest_slice_of_each_oblique_axial_block():
    upper = axial(5, tilt_deg=-12.0, origin=(-16.0, -16.0, -40.0), step=4.0, pixel_spacing=(0.5, 0.5))
    lower = axial(5, tilt_deg=10.0, origin=(-16.0, -16.0, 0.0), step=4.0, pixel_spacing=(0.5, 0.5))
    # A point exactly on slice 3 of the lower block at (row 10, col 20), as seen on a sagittal image.
    sag = sagittal(3, origin=(-12.0, -16.0, 16.0), pixel_spacing=(0.5, 0.6))
    target = geometry.pixel_to_patient(lower.positions[3], lower.orientation, lower.pixel_spacing, 10.0, 20.0)
    # Re-express through the sagittal plane: project and back, to exercise both directions.
    row, col, d = geometry.patient_to_pixel(target, sag.positions[1], sag.orientation, sag.pixel_spacing)
    on_sag = geometry.pixel_to_patient(sag.positions[1], sag.orientation, sag.pixel_spacing, row, col)
    np.testing.assert_allclose(on_sag + d * geometry.slice_normal(sag.orientation), target, atol=1e-9)

    hits = [
        geometry.nearest_slice(target, g.positions, g.orientation, g.pixel_spacing, (64, 64), stack=i)
        for i, g in enumerate((upper, lower))
    ]
    assert [h.stack for h in hits] == [0, 1]
    h = hits[1]
    assert (h.slice, h.row, h.col, h.distance_mm) == pytest.approx((3, 10.0, 20.0, 0.0), abs=1e-9)
    assert h.inside
    far = hits[0]
    assert far.distance_mm > 10.0
    # Nearest really is nearest: every slice of the upper block is at least that far away.
    dist = np.abs((target - upper.positions) @ geometry.slice_normal(upper.orientation))
    assert far.distance_mm == pytest.approx(dist.min())
    assert far.slice == int(np.argmin(dist))


def test_nearest_slice_flags_points_outside_the_image():
    g = axial(3, pixel_spacing=(1.0, 1.0))
    p = geometry.pixel_to_patient(g.positions[0], g.orientation, g.pixel_spacing, row=-10.0, col=5.0)
    assert not geometry.nearest_slice(p, g.positions, g.orientation, g.pixel_spacing, (32, 32)).inside


def test_single_slice_affine_uses_the_normal():
    g = axial(1, tilt_deg=30.0)
    a = geometry.affine(g.positions, g.orientation, g.pixel_spacing, fallback_step=3.5)
    np.testing.assert_allclose(a[:3, 0], 3.5 * geometry.slice_normal(g.orientation))
    assert abs(np.linalg.det(a[:3, :3])) > 0
