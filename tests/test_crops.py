"""Crops in millimetres: sizing, non-square pixels, sub-pixel centres, edges, slices, resampling."""

from __future__ import annotations

import numpy as np
import pytest

from spine_ray.data.crops import (
    crop_stack,
    normalise_intensity,
    resample_volume,
    stack_slices,
    to_native,
    to_resampled,
)


def ramps(s: int = 7, h: int = 200, w: int = 220) -> tuple[np.ndarray, np.ndarray]:
    """Two volumes whose value is the column index, and the row index."""
    cols = np.broadcast_to(np.arange(w, dtype=np.float32), (s, h, w)).copy()
    rows = np.broadcast_to(np.arange(h, dtype=np.float32)[:, None], (s, h, w)).copy()
    return cols, rows


def native_to_crop(
    rc: tuple[float, float],
    centre: tuple[float, float, float],
    spacing: tuple[float, float],
    size_mm: tuple[float, float],
    out_px: tuple[int, int],
    angle: float = 0.0,
) -> np.ndarray:
    """Where native (row, col) should land in crop_stack's pixel grid, worked out in mm apart from crop_affine."""
    dr, dc = (rc[0] - centre[1]) * spacing[0], (rc[1] - centre[2]) * spacing[1]  # mm from the centre
    cos, sin = np.cos(np.deg2rad(angle)), np.sin(np.deg2rad(angle))
    # The crop's axes are the image's turned `angle` counter-clockwise: undo that turn.
    ui, uj = cos * dr + sin * dc, -sin * dr + cos * dc
    return np.array([out_px[0] / 2 - 0.5 + ui * out_px[0] / size_mm[0], out_px[1] / 2 - 0.5 + uj * out_px[1] / size_mm[1]])


def test_40mm_on_half_mm_pixels_spans_80_native_pixels():
    cols, rows = ramps()
    out = crop_stack(cols, (0.5, 0.5), (3, 100, 110), size_mm=40, out_px=80)
    assert out.shape == (5, 80, 80)
    # One output pixel per native pixel, centred: 110 - 39.5 ... 110 + 39.5.
    assert out[2, 0, 0] == pytest.approx(70.5) and out[2, 0, -1] == pytest.approx(149.5)
    assert np.allclose(np.diff(out[2, 0]), 1.0)
    # At 64 px the same 80 native pixels are covered with steps of 80/64.
    out = crop_stack(cols, (0.5, 0.5), (3, 100, 110), size_mm=40, out_px=64)
    assert np.allclose(np.diff(out[2, 0]), 80 / 64)
    assert out[2, 0, -1] - out[2, 0, 0] + 80 / 64 == pytest.approx(80.0)


def test_non_square_pixels_and_non_square_mm():
    cols, rows = ramps()
    # Rows 0.5 mm, cols 1.0 mm: 30 mm high = 60 rows, 50 mm wide = 50 cols, into 32 x 40 px.
    c = crop_stack(cols, (0.5, 1.0), (3, 100, 110), size_mm=(30, 50), out_px=(32, 40))
    r = crop_stack(rows, (0.5, 1.0), (3, 100, 110), size_mm=(30, 50), out_px=(32, 40))
    assert c.shape == (5, 32, 40)
    assert np.allclose(np.diff(c[0, 0]), 50 / 40)
    assert np.allclose(np.diff(r[0, :, 0]), 60 / 32)
    assert c[0, 0].mean() == pytest.approx(110.0) and r[0, :, 0].mean() == pytest.approx(100.0)


def test_a_square_of_fixed_mm_has_the_same_crop_size_at_any_spacing():
    def square(spacing: float) -> np.ndarray:
        n = int(round(100 / spacing))
        v = np.zeros((1, n, n), np.float32)
        half = int(round(5 / spacing))  # a 10 mm square in the middle
        v[0, n // 2 - half : n // 2 + half, n // 2 - half : n // 2 + half] = 1
        centre = (0, n / 2 - 0.5, n / 2 - 0.5)
        return crop_stack(v, (spacing, spacing), centre, size_mm=40, out_px=64, k=0)[0]

    fine, coarse = square(0.25), square(1.0)
    assert (fine > 0.5).sum() == pytest.approx(16 * 16, abs=8)
    assert (coarse > 0.5).sum() == pytest.approx((fine > 0.5).sum(), abs=8)


def test_subpixel_centre_shifts_the_samples():
    cols, rows = ramps()
    a = crop_stack(cols, (1.0, 1.0), (3, 100.0, 110.0), size_mm=20, out_px=20)
    b = crop_stack(cols, (1.0, 1.0), (3, 100.25, 110.25), size_mm=20, out_px=20)
    assert np.allclose(b - a, 0.25, atol=1e-5)
    rb = crop_stack(rows, (1.0, 1.0), (3, 100.25, 110.25), size_mm=20, out_px=20)
    ra = crop_stack(rows, (1.0, 1.0), (3, 100.0, 110.0), size_mm=20, out_px=20)
    assert np.allclose(rb - ra, 0.25, atol=1e-5)


def test_outside_the_image_is_zero():
    v = np.ones((3, 50, 50), np.float32)
    out = crop_stack(v, (1.0, 1.0), (1, 0, 49), size_mm=20, out_px=20, k=0)[0]
    # Centre on the top-right corner pixel: samples at -9.5..9.5 around it.
    assert out[:9, :].max() == 0 and out[:, 11:].max() == 0
    assert np.allclose(out[10:, :9], 1.0)
    assert np.allclose(out[9, :9], 0.5)  # half a pixel beyond the edge: half bright


def test_slices_beyond_the_volume_are_zero_or_edge():
    v = np.stack([np.full((20, 20), i + 1, np.float32) for i in range(4)])
    z = crop_stack(v, (1.0, 1.0), (0, 10, 10), size_mm=8, out_px=8, k=2)
    assert [float(s.mean()) for s in z] == [0, 0, 1, 2, 3]
    e = crop_stack(v, (1.0, 1.0), (3, 10, 10), size_mm=8, out_px=8, k=2, slice_pad="edge")
    assert [float(s.mean()) for s in e] == [2, 3, 4, 4, 4]
    # A fractional slice rounds to the nearest.
    assert crop_stack(v, (1, 1), (1.6, 10, 10), size_mm=4, out_px=4, k=0)[0].mean() == 3
    with pytest.raises(ValueError):
        crop_stack(v, (1, 1), (1, 10, 10), slice_pad="mirror")


def test_window_normalises_and_padding_stays_black():
    v = np.full((1, 20, 20), 500.0, np.float32)
    v[0, :, 10:] = 1500.0
    out = crop_stack(v, (1, 1), (0, 10, 10), size_mm=40, out_px=40, k=0, window=(500.0, 1500.0))
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == pytest.approx(1.0)
    assert out[0, 0, 0] == 0  # outside the image
    assert normalise_intensity(np.array([0.0, 1000.0, 9000.0]), 500, 1500).tolist() == [0.0, 0.5, 1.0]


def test_a_dot_lands_where_the_millimetres_say():
    v = np.zeros((3, 120, 100), np.float32)
    v[1, 70, 40] = 1.0
    centre, spacing = (1, 60.3, 52.7), (0.7, 0.9)
    out = crop_stack(v, spacing, centre, size_mm=(30, 36), out_px=(60, 60), k=1)
    rc = native_to_crop((70.0, 40.0), centre, spacing, (30, 36), (60, 60))
    peak = np.unravel_index(out[1].argmax(), out[1].shape)
    assert np.abs(np.array(peak) - rc).max() <= 1.0


def test_resample_volume_and_point_maps():
    v = np.zeros((10, 40, 60), np.float32)
    v[6, 21:23, 30:32] = 1.0  # a blob centred at (6, 21.5, 30.5)
    out, scale = resample_volume(v, (5, 20, 30))
    assert out.shape == (5, 20, 30) and out.dtype == np.float32
    assert np.allclose(scale, [0.5, 0.5, 0.5])
    p = np.array([6.0, 21.5, 30.5])
    q = to_resampled(p, scale)
    assert np.allclose(q, [2.75, 10.5, 15.0])
    assert np.allclose(to_native(q, scale), p)
    # The resampled blob's mass centre sits where to_resampled says.
    grids = np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij")
    com = np.array([(g * out).sum() / out.sum() for g in grids])
    assert np.abs(com[1:] - q[1:]).max() < 0.3


def test_stack_slices_marks_what_lies_inside():
    idx, inside = stack_slices(4, 0.4, k=2)
    assert idx.tolist() == [-2, -1, 0, 1, 2] and inside.tolist() == [False, False, True, True, True]
    idx, inside = stack_slices(4, 2.5, k=1)
    assert idx.tolist() == [2, 3, 4] and inside.tolist() == [True, True, False]


def test_rotation_turns_the_window_in_millimetres():
    cols, rows = ramps()
    # 90° counter-clockwise: along the crop's columns we walk up the image, along its rows right.
    r = crop_stack(rows, (0.5, 1.0), (3, 100, 110), size_mm=20, out_px=20, k=0, angle=90)[0]
    c = crop_stack(cols, (0.5, 1.0), (3, 100, 110), size_mm=20, out_px=20, k=0, angle=90)[0]
    assert np.allclose(np.diff(r[5]), -2.0) and np.allclose(np.diff(c[:, 5]), 1.0)  # 1 mm = 2 rows = 1 col
    # A dot 10 mm below the centre on 0.5 x 1.0 mm pixels shows 10 mm to the left in the turned crop.
    v = np.zeros((1, 200, 220), np.float32)
    v[0, 116:125, 108:113] = 1.0  # a blob 4.5 x 5 mm centred on (120, 110)
    out = crop_stack(v, (0.5, 1.0), (0, 100, 110), size_mm=40, out_px=40, k=0, angle=90)[0]
    want = native_to_crop((120.0, 110.0), (0, 100, 110), (0.5, 1.0), (40, 40), (40, 40), angle=90)
    assert np.allclose(want, [19.5, 9.5])
    grid = np.meshgrid(np.arange(40), np.arange(40), indexing="ij")
    com = np.array([(g * out).sum() / out.sum() for g in grid])
    assert np.abs(com - want).max() < 0.3
    # A small angle keeps the centre pixel on the centre.
    a = crop_stack(cols, (0.7, 0.7), (3, 100, 110), size_mm=21, out_px=21, k=0, angle=17)[0]
    assert a[10, 10] == pytest.approx(110.0)
