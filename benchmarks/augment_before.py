"""The CPU augmentation code as it was before the fast conversions (2026-12-04), to measure against in the same run.

`before()` swaps it into the modules that call it, for the length of a `with` block: numpy's
float16 conversions (`astype`), the two-axis bilinear gather, the stored patch widened whole
before the crop, the noise from `rng.normal`, the intensity with temporaries. Same values as
today's code (tests/test_half.py proves it), only slower. Benchmarks only: nothing else imports it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import numpy as np

from spine_ray.data import crops
from spine_ray.data.crops import normalise_intensity
from spine_ray.data.transforms import INTENSITY_NOISE
from spine_ray.stages import localize
from spine_ray.stages.grade import augment


def bilinear(image: np.ndarray, rows: np.ndarray, cols: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """`crops._bilinear` before: each corner gathered over two axes and widened after the gather."""
    n, h, w = image.shape
    r0 = np.floor(rows).astype(np.int64)
    c0 = np.floor(cols).astype(np.int64)
    fr = (rows - r0).astype(np.float32)
    fc = (cols - c0).astype(np.float32)
    out = np.zeros((n, *rows.shape), dtype=np.float32)
    for dr, wr in ((0, 1 - fr), (1, fr)):
        for dc, wc in ((0, 1 - fc), (1, fc)):
            rr, cc = r0 + dr, c0 + dc
            ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
            vals = image[:, np.clip(rr, 0, h - 1), np.clip(cc, 0, w - 1)].astype(np.float32)
            if window is not None:
                vals = normalise_intensity(vals, *window)
            out += vals * (wr * wc * ok)[None]
    return out


def apply_intensity(x: np.ndarray, g: float, c: float, b: float, n: np.ndarray | None) -> np.ndarray:
    """`transforms.apply_intensity` before: a new array at every step."""
    x = np.clip(np.asarray(x, dtype=np.float32), 0.0, 1.0).astype(np.float64) ** g
    m = x.mean()
    x = (x - m) * c + m + b
    if n is not None:
        x = x + n
    return np.clip(x, 0.0, 1.0).astype(np.float32)


def draw_intensity(rng, shape, gamma=(0.7, 1.5), contrast=(0.75, 1.25), brightness=0.1, noise=INTENSITY_NOISE):
    """`transforms.draw_intensity` before: the noise from `rng.normal` (loc and scale applied per value)."""
    g = float(np.exp(rng.uniform(np.log(gamma[0]), np.log(gamma[1]))))
    c = rng.uniform(*contrast)
    b = rng.uniform(-brightness, brightness)
    n = rng.normal(0.0, noise, size=shape).astype(np.float32) if noise else None
    return g, c, b, n


def intensity(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return apply_intensity(x, *draw_intensity(rng, np.shape(x)))


def recrop(cfg, patch, view, shift, offset, angle):
    """`grade.augment.recrop` before: the whole stored patch widened to float32 first."""
    kk, c = cfg.k + cfg.max_shift, cfg.patch_px / 2 - 0.5
    point = (kk + shift, c + offset[0], c + offset[1])
    return crops.crop_stack(patch.astype(np.float32), cfg.patch_spacing(view), point, cfg.crop_mm(view), cfg.out_px, cfg.k, angle=angle)


def _np32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, np.float32)


def _np16(a: np.ndarray) -> np.ndarray:
    return np.asarray(a).astype(np.float16)


@contextlib.contextmanager
def before() -> Iterator[None]:
    """Within the block, the grade and localiser augmentation run the code above."""
    patches = [
        mock.patch.object(crops, "_bilinear", bilinear), mock.patch.object(crops, "to_float32", _np32),
        mock.patch.object(crops, "_pixel_grid", crops._pixel_grid.__wrapped__),  # made again for every crop
        mock.patch.object(augment, "recrop", recrop), mock.patch.object(augment, "draw_intensity", draw_intensity),
        mock.patch.object(augment, "apply_intensity", apply_intensity),
        mock.patch.object(augment, "to_float16", _np16), mock.patch.object(augment, "to_float32", _np32),
        mock.patch.object(localize, "intensity", intensity),
        mock.patch.object(localize, "to_float16", _np16), mock.patch.object(localize, "to_float32", _np32),
    ]
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield
