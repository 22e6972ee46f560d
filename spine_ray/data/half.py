"""float16 ↔ float32 for stored samples and crops, at the processor's conversion speed.

Samples and crops travel as float16 (half the bytes in Parquet and through Ray Data's object
store) and are computed in float32. numpy converts float16 in software, one value at a time
(≈ 1.7 ns a value here: 0.27 ms for the 5 slices of one stored patch); torch's CPU kernels use
the processor's conversion instructions, 13–24× faster, with the same IEEE values (exact widening;
narrowing rounds to nearest, ties to even). The output is numpy's own allocation, filled by
torch's `copy_`: a tensor torch allocates itself for a whole batch (16 MiB) cost 100 ms in
page faults on a heap that other arrays churn, where numpy's took 2 ms. Both return numpy arrays
and never write their input.
"""

from __future__ import annotations

import numpy as np
import torch


def _convert(a: np.ndarray, dtype: type) -> np.ndarray:
    """a converted into a new C-ordered numpy array of dtype by torch's kernel."""
    if not a.flags.writeable or any(s < 0 for s in a.strides):
        a = np.array(a)  # torch shares neither read-only nor reversed memory; a memcpy is far cheaper than numpy's conversion
    out = np.empty(a.shape, dtype)
    torch.from_numpy(out).copy_(torch.from_numpy(a))
    return out


def to_float32(a: np.ndarray) -> np.ndarray:
    """a as float32 (exact from float16); other dtypes as `astype(np.float32)`, no copy when already float32."""
    a = np.asarray(a)
    if a.dtype != np.float16:
        return a.astype(np.float32, copy=False)
    return _convert(a, np.float32)


def to_float16(a: np.ndarray) -> np.ndarray:
    """a as float16, rounded as numpy's `astype(np.float16)` rounds (to nearest even; out of range → ±inf)."""
    a = np.asarray(a)
    if a.dtype == np.float16:
        return a
    if a.dtype != np.float32:
        return a.astype(np.float16)  # float64 → float16 directly: one rounding, as numpy does it
    return _convert(a, np.float16)


__all__ = ["to_float32", "to_float16"]
