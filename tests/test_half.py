"""The fast float16 conversions give numpy's values, and the faster crop and intensity code the old arrays (`benchmarks/augment_before.py`)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from benchmarks import augment_before as old
from spine_ray.data.crops import _bilinear, crop_affine, crop_stack
from spine_ray.data.half import to_float16, to_float32
from spine_ray.data.transforms import apply_intensity, draw_intensity


def test_every_float16_widens_to_numpys_float32():
    every = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)  # all 65,536 values, NaNs and ±inf included
    got = to_float32(every)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32)[~np.isnan(got)], every.astype(np.float32).view(np.uint32)[~np.isnan(got)])
    assert np.isnan(got).sum() == np.isnan(every).sum()


def test_float32_narrows_as_numpy_rounds():
    rng = np.random.default_rng(0)
    f16 = np.arange(2**16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    f16 = f16[np.isfinite(f16)].astype(np.float32)
    f16.sort()
    ties = (f16[:-1] + f16[1:]) / 2  # exact midpoints: round to even decides
    bits = rng.integers(0, 2**32, 2_000_000, dtype=np.uint32).view(np.float32)
    x = np.concatenate([bits[np.isfinite(bits)], ties, np.nextafter(ties, np.inf), np.nextafter(ties, -np.inf),
                        np.float32([65504, 65519.99, 65520, 1e6, -1e6, 6e-8, 3e-8, 2.9e-8, 0.0, -0.0])])
    got = to_float16(x)
    assert got.dtype == np.float16
    with np.errstate(over="ignore"):
        want = x.astype(np.float16)  # numpy warns on overflow to inf, which is the case under test
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def test_read_only_reversed_and_strided_inputs_convert_silently_and_stay_as_they_were():
    a = np.random.default_rng(1).random((3, 40, 50)).astype(np.float16)
    ro = np.frombuffer(a.tobytes(), np.float16).reshape(a.shape)  # as Parquet bytes arrive
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns about non-writable arrays: the helper must not hand it one
        for v in (ro, a[:, ::-1], a[::2, :, 1::3], a.transpose(2, 0, 1)):
            np.testing.assert_array_equal(to_float32(v), v.astype(np.float32))
            w = v.astype(np.float32)
            np.testing.assert_array_equal(to_float16(w[..., ::-1]), w[..., ::-1].astype(np.float16))
    np.testing.assert_array_equal(ro, a)
    assert to_float32(np.float32([1, 2])).dtype == np.float32
    assert to_float32(np.uint16([1, 70])).tolist() == [1.0, 70.0]
    assert to_float16(np.float64([1 / 3])) == np.float64(1 / 3).astype(np.float16)
    assert to_float32(np.zeros((0, 4), np.float16)).shape == (0, 4)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.uint16])
@pytest.mark.parametrize("window", [None, (100.0, 900.0)])
def test_the_flat_gather_samples_exactly_as_before(dtype, window):
    rng = np.random.default_rng(2)
    image = (rng.random((5, 61, 47)) * (1000 if dtype == np.uint16 else 1)).astype(dtype)
    for angle, scale in ((0.0, 1.0), (17.0, 1.3), (-40.0, 2.5)):  # the last reaches far outside the image
        a, b = crop_affine((2, 30.2, 20.7), (0.7, 0.9), 30 * scale, (33, 29), angle)
        ij = np.stack(np.meshgrid(np.arange(33), np.arange(29), indexing="ij"), -1).astype(np.float64)
        rc = ij @ a.T + b
        got = _bilinear(image, rc[..., 0], rc[..., 1], window)
        np.testing.assert_array_equal(got, old.bilinear(image, rc[..., 0], rc[..., 1], window))
    x16 = crop_stack(image, (0.7, 0.9), (2, 30, 20), 30, 16, 2, angle=5.0)
    assert x16.dtype == np.float32 and np.array_equal(x16, crop_stack(image.astype(np.float64), (0.7, 0.9), (2, 30, 20), 30, 16, 2, angle=5.0))


def test_intensity_draws_and_applies_exactly_as_before():
    x = np.random.default_rng(3).random((5, 32, 32)).astype(np.float32) * 1.2 - 0.1
    r_new, r_old = np.random.default_rng(4), np.random.default_rng(4)
    for _ in range(5):
        g, c, b, n = draw_intensity(r_new, x.shape)
        og, oc, ob, on = old.draw_intensity(r_old, x.shape)
        assert (g, c, b) == (og, oc, ob)
        np.testing.assert_array_equal(n, on)
        np.testing.assert_array_equal(apply_intensity(x, g, c, b, n), old.apply_intensity(x, g, c, b, n))
        np.testing.assert_array_equal(apply_intensity(x, g, c, b, None), old.apply_intensity(x, g, c, b, None))
    assert r_new.random() == r_old.random()  # the stream goes on alike
    x0 = x.copy()
    apply_intensity(x, 1.3, 1.1, 0.05, None)
    np.testing.assert_array_equal(x, x0)  # the input is not written


@pytest.mark.parametrize("mix", [False, True])
def test_grade_and_localiser_batches_are_the_arrays_of_before(mix):
    """The whole CPU path, sample rows to batch tensors, gives what the code before gave (`augment_before.before`), bit for bit."""

    from benchmarks.train_switches import sample_rows, stack_rows
    from spine_ray.stages.grade.augment import collate_samples
    from spine_ray.stages.grade.config import GradeConfig, MixConfig
    from spine_ray.stages.localize import ViewConfig, view_arrays, view_tensors

    cfg = GradeConfig(out_px=24, rotate_deg=20.0, mix=MixConfig(cutmix_p=0.5, mixup_p=0.5) if mix else MixConfig())
    rows = sample_rows(cfg, 6, np.random.default_rng(5))
    vcfg = ViewConfig(slices=6, size=40)
    vrows = stack_rows("sag_t2", vcfg, 3, np.random.default_rng(8))

    def run() -> dict:
        grade = collate_samples(cfg, rows, np.random.default_rng(6))
        plain = collate_samples(cfg, rows, None)
        view = view_tensors(view_arrays("sag_t2", vcfg, vrows, np.random.default_rng(7)))
        return {**{f"g_{k}": v for k, v in grade.items()}, "plain": plain["x"], **{f"v_{k}": v for k, v in view.items()}}

    now = run()
    with old.before():
        from spine_ray.data import crops

        assert crops._bilinear is old.bilinear  # the block runs the old code
        then = run()
    assert now.keys() == then.keys()
    for k in now:
        assert now[k].dtype == then[k].dtype and np.array_equal(now[k].numpy(), then[k].numpy()), k
