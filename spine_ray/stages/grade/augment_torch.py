"""Stage 2's augmentation applied batched in torch, on whatever device the batch is on (`augment_on: device`).

The parameters come drawn (`augment.draw_params`, shipped by `augment.defer_samples`); this only
applies them, with the CPU path's geometry: every slot's slices are gathered at its shift, its
crop window (`crops.crop_affine`: scale to the crop's mm per pixel, rotation, centre offset) is
one `grid_sample` over [B·T, S, P, P], then intensity, the flip and the mix act on whole
tensors. Where it differs from the numpy apply: grid_sample takes positions as float32 normalised
coordinates (a position off by ~1e-5 pixel) and intensity runs in float32, not float64; after
the float16 rounding both paths share, a pixel differs by at most a float16 step or two.

With `noise_on: device` the intensity noise is not shipped but made here from a seed per slot
(`hashed_normal`, a counter-based hash: the same numbers on any device, nothing to checkpoint).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from spine_ray.data.transforms import INTENSITY_NOISE
from spine_ray.stages.grade.augment import CUTMIX, MIXUP, slot_permutation
from spine_ray.stages.grade.config import SAGITTAL_VIEWS, GradeConfig


def recrop(cfg: GradeConfig, patch: torch.Tensor, shift: torch.Tensor, offset: torch.Tensor, angle: torch.Tensor) -> torch.Tensor:
    """Stored patches [B, T, 2K+1, P, P] → crops [B, T, 2k+1, h, w] float32, as `augment.recrop` slot by slot."""
    b, t, _, p, _ = patch.shape
    k, kk, h, dev = cfg.k, cfg.k + cfg.max_shift, cfg.out_px, patch.device
    idx = (kk - k + shift)[..., None] + torch.arange(2 * k + 1, device=dev)  # [B, T, S]: slices kk + shift ± k
    stack = torch.gather(patch, 2, idx[..., None, None].expand(-1, -1, -1, p, p))
    # crop_affine in float64: native (row, col) = A (i, j) + b, per slot.
    views = [v for _, v, _ in cfg.slots]
    mm = torch.tensor([cfg.crop_mm(v) for v in views], dtype=torch.float64, device=dev)  # [T, 2]
    spacing = torch.tensor([cfg.patch_spacing(v) for v in views], dtype=torch.float64, device=dev)
    ph, pw = mm[:, 0] / h, mm[:, 1] / h  # mm per crop pixel
    rad = torch.deg2rad(angle.double())
    cos, sin = torch.cos(rad), torch.sin(rad)
    a = torch.stack([cos * ph / spacing[:, 0], -sin * pw / spacing[:, 0], sin * ph / spacing[:, 1], cos * pw / spacing[:, 1]], -1)  # [B, T, 4]
    mid, c = h / 2 - 0.5, p / 2 - 0.5
    b0 = c + offset[..., 0].double() - (a[..., 0] + a[..., 1]) * mid
    b1 = c + offset[..., 1].double() - (a[..., 2] + a[..., 3]) * mid
    i = torch.arange(h, dtype=torch.float64, device=dev)
    ii, jj = i[:, None], i[None, :]
    rows = a[..., 0, None, None] * ii + a[..., 1, None, None] * jj + b0[..., None, None]  # [B, T, h, w]
    cols = a[..., 2, None, None] * ii + a[..., 3, None, None] * jj + b1[..., None, None]
    # Pixel centres at integers: align_corners=False's normalised coordinate of position u is (2u + 1) / P − 1.
    grid = torch.stack([(2 * cols + 1) / p - 1, (2 * rows + 1) / p - 1], -1).float()  # x = column, y = row
    out = F.grid_sample(stack.reshape(b * t, -1, p, p).float(), grid.reshape(b * t, h, h, 2), mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.reshape(b, t, -1, h, h)


def intensity(x: torch.Tensor, gamma: torch.Tensor, contrast: torch.Tensor, brightness: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """`transforms.apply_intensity` per slot: x [B, T, S, h, w], gamma/contrast/brightness [B, T], noise like x."""
    def per_slot(v: torch.Tensor) -> torch.Tensor:
        return v.float()[..., None, None, None]

    x = x.clamp(0.0, 1.0) ** per_slot(gamma)
    m = x.mean((2, 3, 4), keepdim=True)
    return ((x - m) * per_slot(contrast) + m + per_slot(brightness) + noise.float()).clamp(0.0, 1.0)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x · c mod 2³² for x in [0, 2³²), in int64 without overflow (c split in 16-bit halves)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mixer (Wellons' lowbias32) on int64 tensors holding values in [0, 2³²)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def hashed_normal(seed: torch.Tensor, shape: tuple[int, ...], sigma: float = INTENSITY_NOISE) -> torch.Tensor:
    """N(0, σ²) noise [*seed.shape, *shape] float32 from a hash of (seed, element): the same numbers on any device.

    Counter-based, so a slot's noise needs no generator state (nothing to checkpoint, no host
    sync) and does not depend on the batch it lands in; Box–Muller on two hashed uniforms.
    """
    n = math.prod(shape)
    key = _hash32(seed.long() & 0xFFFFFFFF)[..., None]  # [..., 1]
    idx = torch.arange(n, device=seed.device, dtype=torch.int64) * 2
    u1, u2 = ((_hash32((key + (idx + d) * 0x9E3779B9) & 0xFFFFFFFF).float() + 0.5) / 2.0**32 for d in (0, 1))
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return (sigma * z).reshape(*seed.shape, *shape)


def flip(cfg: GradeConfig, x: torch.Tensor, which: torch.Tensor) -> torch.Tensor:
    """`augment.flip_sample` on the samples `which` [B] marks: x [B, T, S, h, w] (sagittal: slice order, axial: columns; slots swap)."""
    dev = x.device
    sag = torch.tensor([v in SAGITTAL_VIEWS for _, v, _ in cfg.slots], device=dev)[None, :, None, None, None]
    perm = torch.from_numpy(slot_permutation([c for c, _, _ in cfg.slots])).to(dev)
    mirrored = torch.where(sag, x.flip(2), x.flip(-1))[:, perm]
    return torch.where(which[:, None, None, None, None], mirrored, x)


def crops(cfg: GradeConfig, batch: dict[str, torch.Tensor], prefix: str = "aug_") -> torch.Tensor:
    """The crops x [B, T, 2k+1, h, w] of the stored patches and parameters under `prefix` in a batch (`augment.defer_samples`), float16-rounded like the CPU path's."""
    def get(name: str) -> torch.Tensor:
        return batch[prefix + name]

    x = recrop(cfg, get("patch"), get("shift"), get("offset"), get("angle"))
    if cfg.intensity_aug:
        noise = get("noise") if prefix + "noise" in batch else hashed_normal(get("noise_seed"), tuple(x.shape[2:]))
        x = intensity(x, get("gamma"), get("contrast"), get("brightness"), noise)
    x = torch.where(get("active")[..., None, None, None], x, 0.0)  # a slot without a target stays black
    # The CPU path hands crops on as float16: the model sees the same precision either way.
    return flip(cfg, x, get("flip")).half().float()


def mix(x: torch.Tensor, partner: torch.Tensor, op: torch.Tensor, lam: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """`augment.apply_mix` on pixels: x and the partners' crops [B, T, S, h, w]; op, lam [B, T]; box [B, T, 4] (y0, y1, x0, x1)."""
    h, w = x.shape[-2:]
    ys = torch.arange(h, device=x.device)
    xs = torch.arange(w, device=x.device)
    y0, y1, x0, x1 = box.unbind(-1)
    rows = (ys >= y0[..., None]) & (ys < y1[..., None])  # [B, T, h]
    cols = (xs >= x0[..., None]) & (xs < x1[..., None])
    cut = (op == CUTMIX)[..., None, None] & rows[..., :, None] & cols[..., None, :]  # [B, T, h, w]
    # λ and 1 − λ in float64 first, then float32, as numpy's Python-float weights are.
    w_own, w_other = lam.double().float()[..., None, None, None], (1.0 - lam.double()).float()[..., None, None, None]
    blend = (w_own * x + w_other * partner).half().float()
    x = torch.where(cut[:, :, None], partner, x)
    return torch.where((op == MIXUP)[..., None, None, None], blend, x)


@torch.no_grad()
def device_batch(cfg: GradeConfig, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A batch of `augment.defer_samples` → the batch `collate_samples` gives for the same draws: x [B, T, S, 1, h, w] made where the batch is."""
    x = crops(cfg, batch, "aug_")
    if "mix_op" in batch:
        x = mix(x, crops(cfg, batch, "mix_"), batch["mix_op"], batch["mix_lam"], batch["mix_box"])
    rest = {k: v for k, v in batch.items() if not k.startswith(("aug_", "mix_"))}
    return {"x": x[:, :, :, None], **rest}
