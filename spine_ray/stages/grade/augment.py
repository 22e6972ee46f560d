"""Stage 2's augmentation of stored samples: re-crop with jitter, intensity, the left-right flip, CutMix/mixup, and the batch tensors.

Drawing and applying are apart. `draw_params` takes every random number of a batch from one
generator, in a fixed order, and returns plain arrays; `augment_samples` applies them in numpy
(the CPU path, `augment_on: cpu`). With `augment_on: device`, `defer_samples` ships the stored
patches with those arrays instead of crops, and `augment_torch.device_batch` applies them batched
on the training device. Labels, masks and slice targets follow the parameters on the CPU in both
paths (`sample_targets`, `apply_mix`), so the two differ only in how pixels are interpolated.
"""

from __future__ import annotations

import numpy as np
import torch

from spine_ray.core.schema import CONDITIONS, LEVELS
from spine_ray.data.crops import crop_stack
from spine_ray.data.half import to_float16, to_float32
from spine_ray.data.transforms import (
    INTENSITY_NOISE,
    apply_intensity,
    draw_intensity,
    mirror_name,
    random_angle,
    sample_slice_shift,
)
from spine_ray.stages.grade.config import SAGITTAL_VIEWS, GradeConfig, MixConfig

Params = dict[str, np.ndarray]  # a batch's drawn augmentation, first axis the sample (see `draw_params`)
CROP_PARAMS = ("active", "shift", "offset", "angle", "gamma", "contrast", "brightness", "noise", "flip")
MIX_PARAMS = ("mix_op", "mix_lam", "mix_box")
CUTMIX, MIXUP = 1, 2  # mix_op codes; 0 leaves a slot alone


def flip_sample(x: np.ndarray, views: np.ndarray, conditions: list[str], *per_target: np.ndarray, slice_index: np.ndarray | None = None) -> tuple:
    """Mirror one sample left–right: crops x [T, S, H, W], per-target arrays follow the slot swap.

    Sagittal crops reverse their slice order (slices run left–right), axial crops flip their
    columns; then left and right slots (and their labels, masks, …) trade places. `slice_index`
    [T] (−1 = none) are slice positions in the crop, reversed on sagittal slots. Per-target arrays
    whose second axis runs over slices (slice masks [T, S]) are reversed on sagittal slots too.
    """
    x = x.copy()
    sag = np.isin(views, SAGITTAL_VIEWS)
    x[sag] = x[sag, ::-1]
    x[~sag] = x[~sag, ..., ::-1]
    return (x[slot_permutation(conditions)], *flip_targets(views, conditions, x.shape[1], *per_target, slice_index=slice_index))


def flip_targets(views: np.ndarray, conditions: list[str], n_slices: int, *per_target: np.ndarray, slice_index: np.ndarray | None = None) -> tuple:
    """The per-target half of `flip_sample`: arrays [T, …] swap slots (slice axes reversed on sagittal slots), then slice_index."""
    sag = np.isin(views, SAGITTAL_VIEWS)
    perm = slot_permutation(conditions)
    rest = []
    for a in per_target:
        a = a.copy()
        if a.ndim == 2:
            a[sag] = a[sag, ::-1]
        rest.append(a[perm])
    if slice_index is not None:
        slice_index = np.where(sag & (slice_index >= 0), n_slices - 1 - slice_index, slice_index)[perm]
    return (*rest, slice_index)


def slot_permutation(conditions: list[str]) -> np.ndarray:
    """Slot i → the slot of its mirrored condition; a self-mirrored (spinal) slot, even repeated, stays put."""
    return np.asarray([i if mirror_name(c) == c else conditions.index(mirror_name(c)) for i, c in enumerate(conditions)], np.int64)


def draw_crop(cfg: GradeConfig, view: int, rng: np.random.Generator, errors: np.ndarray | None) -> tuple[int, np.ndarray, float]:
    """One slot's re-crop draws, in order: slice shift (stage-1 errors, else round(N(0, σ)); clipped), centre offset [2] in patch pixels, angle."""
    shift = int(np.clip(sample_slice_shift(rng, errors, cfg.slice_sigma), -cfg.max_shift, cfg.max_shift)) if cfg.slice_jitter else 0
    offset = rng.normal(0.0, cfg.xy_jitter_mm, 2) / np.asarray(cfg.patch_spacing(view))
    angle = random_angle(rng, cfg.rotate_deg) if cfg.rotate_deg > 0 else 0.0
    return shift, offset, angle


def recrop(cfg: GradeConfig, patch: np.ndarray, view: int, shift: int, offset: np.ndarray, angle: float) -> np.ndarray:
    """Stored patch [2K+1, P, P] (float16 as stored) → crop [2k+1, h, w] float32: slices moved by shift, centre by offset (patch pixels), turned by angle."""
    kk, c = cfg.k + cfg.max_shift, cfg.patch_px / 2 - 0.5
    point = (kk + shift, c + offset[0], c + offset[1])
    return crop_stack(patch, cfg.patch_spacing(view), point, cfg.crop_mm(view), cfg.out_px, cfg.k, angle=angle)


def _row_mask(rows: dict[str, np.ndarray], t: int) -> np.ndarray:
    return np.stack([np.frombuffer(m, bool) for m in rows["target_mask"]]) if len(rows["study_id"]) else np.zeros((0, t), bool)


def draw_params(
    cfg: GradeConfig, rows: dict[str, np.ndarray], rng: np.random.Generator, errors: dict[str, np.ndarray] | None = None, noise_seeds: bool = False
) -> Params:
    """Every random draw of a batch's augmentation, from rng in one fixed order (pure but for rng).

    Per sample, slot by slot where the slot is real: `draw_crop`, then `draw_intensity` (with
    `intensity_aug`); then the flip; after all samples, the mix (`draw_mix`, with `cfg.mix`).
    Returns, first axis the sample: active [B, T] (the stored target mask), shift [B, T] slices,
    offset [B, T, 2] patch pixels, angle [B, T] degrees, gamma, contrast, brightness [B, T],
    noise [B, T, 2k+1, h, w] float32, flip [B]; with mix also partner [B], mix_op, mix_lam [B, T]
    and mix_box [B, T, 4] (`draw_mix`). Unreal slots keep the identity (0 shift, gamma 1, …).
    With `noise_seeds` (`noise_on: device`), a slot draws one 32-bit noise_seed [B, T] where it drew
    its noise field (for `augment_torch.hashed_normal`): every draw after that differs from the CPU path's.
    """
    slots, s, px = cfg.slots, 2 * cfg.k + 1, cfg.out_px
    active = _row_mask(rows, len(slots))
    b, t = active.shape
    p = {
        "active": active, "shift": np.zeros((b, t), np.int64), "offset": np.zeros((b, t, 2)), "angle": np.zeros((b, t)),
        "gamma": np.ones((b, t)), "contrast": np.ones((b, t)), "brightness": np.zeros((b, t)),
        "flip": np.zeros(b, bool),
        **({"noise_seed": np.zeros((b, t), np.int64)} if noise_seeds else {"noise": np.zeros((b, t, s, px, px), np.float32)}),
    }
    for j in range(b):
        for i, (_, view, lview) in enumerate(slots):
            if not active[j, i]:
                continue
            p["shift"][j, i], p["offset"][j, i], p["angle"][j, i] = draw_crop(cfg, view, rng, None if errors is None else errors.get(lview))
            if cfg.intensity_aug:
                p["gamma"][j, i], p["contrast"][j, i], p["brightness"][j, i], noise = draw_intensity(
                    rng, (s, px, px), noise=0.0 if noise_seeds else INTENSITY_NOISE
                )
                if noise_seeds:
                    p["noise_seed"][j, i] = rng.integers(2**32)
                elif noise is not None:
                    p["noise"][j, i] = noise
        p["flip"][j] = rng.random() < cfg.flip_prob
    if cfg.mix.enabled:
        perm = slot_permutation([c for c, _, _ in slots])
        flipped = np.where(p["flip"][:, None], active[:, perm], active)  # the mix pairs slots after the flip
        p.update(draw_mix(cfg.mix, flipped, rng, px, px))
    return p


def sample_targets(cfg: GradeConfig, rows: dict[str, np.ndarray], p: Params | None) -> dict[str, np.ndarray]:
    """A batch's labels and masks under drawn parameters (None: unaugmented), before any mix (pure).

    slice_mask [B, T, S] (the shifted window of the stored one), target_mask [B, T], labels [B, T],
    slice_target [B, T], level [B], study_id [B]; the flip swaps slots as `flip_sample` does.
    """
    slots, k = cfg.slots, cfg.k
    kk, s, t = k + cfg.max_shift, 2 * k + 1, len(cfg.slots)
    conditions = [c for c, _, _ in slots]
    views = np.array([v for _, v, _ in slots])
    smasks, tmasks, labs, starg = [], [], [], []
    for j in range(len(rows["study_id"])):
        shape = tuple(rows["shape"][j])
        inside = np.frombuffer(rows["inside"][j], bool).reshape(shape[:2])
        tm = np.frombuffer(rows["target_mask"][j], bool).copy()
        lab = np.frombuffer(rows["labels"][j], np.int8).astype(np.int64)
        off = np.frombuffer(rows["gt_offset"][j], np.int8).astype(np.int64)
        sm = np.zeros((t, s), bool)
        st = np.full(t, -1, np.int64)
        for i in np.flatnonzero(tm):
            shift = 0 if p is None else int(p["shift"][j, i])
            sm[i] = inside[i, kk + shift - k : kk + shift + k + 1]
            pos = k + off[i] - shift
            st[i] = pos if off[i] != 127 and 0 <= pos <= 2 * k else -1
        if p is not None and p["flip"][j]:
            sm, tm, lab, st = flip_targets(views, conditions, s, sm, tm, lab, slice_index=st)
        smasks.append(sm)
        tmasks.append(tm)
        labs.append(np.where(tm, lab, -1))
        starg.append(np.where(tm, st, -1))
    b = len(smasks)
    return {
        "slice_mask": np.stack(smasks) if b else np.zeros((0, t, s), bool),
        "target_mask": np.stack(tmasks) if b else np.zeros((0, t), bool),
        "labels": np.stack(labs) if b else np.zeros((0, t), np.int64),
        "slice_target": np.stack(starg) if b else np.zeros((0, t), np.int64),
        "level": np.asarray([LEVELS.index(v) for v in rows["level"]], np.int64),
        "study_id": np.asarray([int(v) for v in rows["study_id"]], np.int64),
    }


def sample_crops(cfg: GradeConfig, rows: dict[str, np.ndarray], p: Params | None) -> np.ndarray:
    """The numpy apply: a batch's crops x [B, T, S, H, W] float16 under drawn parameters (None: unaugmented), before any mix."""
    slots, s, px = cfg.slots, 2 * cfg.k + 1, cfg.out_px
    conditions = [c for c, _, _ in slots]
    views = np.array([v for _, v, _ in slots])
    xs = []
    for j in range(len(rows["study_id"])):
        patch = np.frombuffer(rows["x"][j], np.float16).reshape(tuple(rows["shape"][j]))
        x = np.zeros((len(slots), s, px, px), np.float32)
        for i in np.flatnonzero(np.frombuffer(rows["target_mask"][j], bool)):
            view = slots[i][1]
            if p is None:
                x[i] = recrop(cfg, patch[i], view, 0, np.zeros(2), 0.0)
                continue
            x[i] = recrop(cfg, patch[i], view, int(p["shift"][j, i]), p["offset"][j, i], float(p["angle"][j, i]))
            if cfg.intensity_aug:
                x[i] = apply_intensity(x[i], p["gamma"][j, i], p["contrast"][j, i], p["brightness"][j, i], p["noise"][j, i])
        if p is not None and p["flip"][j]:
            x = flip_sample(x, views, conditions)[0]
        xs.append(to_float16(x))  # half the bytes through Ray Data's object store
    return np.stack(xs) if xs else np.zeros((0, len(slots), s, px, px), np.float16)


def augment_samples(cfg: GradeConfig, rows: dict[str, np.ndarray], rng: np.random.Generator | None, errors: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Sample rows → fixed-shape per-sample arrays (re-cropped, augmented when rng is given); pure.

    x [B, T, S, H, W] float16 (half the bytes through Ray Data's object store), slice_mask [B, T, S],
    target_mask [B, T], labels [B, T], slice_target [B, T], level [B], study_id [B].
    """
    p = None if rng is None else draw_params(cfg, rows, rng, errors)
    out = {"x": sample_crops(cfg, rows, p), **sample_targets(cfg, rows, p)}
    return apply_mix(out, p) if p is not None and cfg.mix.enabled else out


def defer_samples(cfg: GradeConfig, rows: dict[str, np.ndarray], rng: np.random.Generator | None, errors: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """`augment_samples` for `augment_on: device`: the same draws and targets, the stored patches and parameters in place of x (pure).

    aug_patch [B, T, 2K+1, P, P] float16 and aug_<param> for every `CROP_PARAMS` (noise as
    float16, half the bytes for an error under 1e-4; with `noise_on: device` aug_noise_seed
    instead); with mix also the partner's under mix_ (mix_patch, mix_shift, …: its crops are made
    again on the device) and `MIX_PARAMS`. Without rng (no augmentation) it is `augment_samples`.
    """
    if rng is None:
        return augment_samples(cfg, rows, None, errors)
    p = draw_params(cfg, rows, rng, errors, noise_seeds=cfg.noise_on == "device")
    out = sample_targets(cfg, rows, p)
    if cfg.mix.enabled:
        out = apply_mix(out, p)
    kk = cfg.k + cfg.max_shift
    patches = [np.frombuffer(v, np.float16).reshape(tuple(sh)) for v, sh in zip(rows["x"], rows["shape"], strict=True)]
    patch = np.stack(patches) if patches else np.zeros((0, len(cfg.slots), 2 * kk + 1, cfg.patch_px, cfg.patch_px), np.float16)
    crop = {"patch": patch, **{n: p[n] for n in CROP_PARAMS if n in p}}
    crop.update({"noise": to_float16(p["noise"])} if "noise" in p else {"noise_seed": p["noise_seed"]})
    out.update({f"aug_{n}": v for n, v in crop.items()})
    if cfg.mix.enabled:
        out.update({f"mix_{n}": v[p["partner"]] for n, v in crop.items()})
        out.update({n: p[n] for n in MIX_PARAMS})
    return out


def _one_hot(idx: np.ndarray, n: int) -> np.ndarray:
    """Indices [...] (−1 = unknown) → float32 one-hot [..., n], all-zero where unknown."""
    return (idx[..., None] == np.arange(n)).astype(np.float32)


def _box(rng: np.random.Generator, lam: float, h: int, w: int) -> tuple[int, int, int, int]:
    """A CutMix box (y0, y1, x0, x1) of about (1 − λ)·H·W, centred uniformly and clipped to the crop."""
    r = np.sqrt(1.0 - lam)
    ch, cw = int(round(h * r)), int(round(w * r))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    return max(cy - ch // 2, 0), min(cy - ch // 2 + ch, h), max(cx - cw // 2, 0), min(cx - cw // 2 + cw, w)


def draw_mix(mix: MixConfig, target_mask: np.ndarray, rng: np.random.Generator, h: int, w: int) -> Params:
    """The CutMix / mixup draws of a batch with target_mask [B, T] (after any flip): a partner per sample, then per sample and slot.

    partner [B]; mix_op [B, T] (0, CUTMIX or MIXUP: both slots real, partner not itself);
    mix_lam [B, T] float64, the share a mixed slot keeps its own (CutMix: the area left outside
    the box); mix_box [B, T, 4] the CutMix box (y0, y1, x0, x1).
    """
    b, t = target_mask.shape
    op, lam, box = np.zeros((b, t), np.int8), np.ones((b, t)), np.zeros((b, t, 4), np.int64)
    partner = rng.permutation(b)
    for j in range(b):
        k, r = int(partner[j]), rng.random()
        kind = CUTMIX if r < mix.cutmix_p else MIXUP if r < mix.cutmix_p + mix.mixup_p else 0
        if not kind or k == j:
            continue
        for i in np.flatnonzero(target_mask[j] & target_mask[k]):
            lam[j, i], op[j, i] = float(rng.beta(mix.alpha, mix.alpha)), kind
            if kind == CUTMIX:
                box[j, i] = y0, y1, x0, x1 = _box(rng, lam[j, i], h, w)
                lam[j, i] = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually left its own
    return {"partner": partner, "mix_op": op, "mix_lam": lam, "mix_box": box}


def apply_mix(a: dict[str, np.ndarray], m: Params) -> dict[str, np.ndarray]:
    """Mix drawn by `draw_mix` applied to a batch's arrays: soft labels [B, T, 3] and slice_target [B, T, S]
    (float32, unnormalised: all-zero = unlabelled), a mixed slot's slice_mask the union of both; x too when present."""
    sm = a["slice_mask"]
    q, st = _one_hot(a["labels"], 3), _one_hot(a["slice_target"], sm.shape[-1])
    nq, nst, nsm = q.copy(), st.copy(), sm.copy()
    x = np.asarray(a["x"]) if "x" in a else None  # float16 stays float16: CutMix copies pixels, mixup blends one slot at a time
    nx = None if x is None else x.copy()
    for j, i in zip(*np.nonzero(m["mix_op"]), strict=True):
        k, lam = int(m["partner"][j]), float(m["mix_lam"][j, i])
        nq[j, i] = lam * q[j, i] + (1.0 - lam) * q[k, i]
        nst[j, i] = lam * st[j, i] + (1.0 - lam) * st[k, i]
        nsm[j, i] = sm[j, i] | sm[k, i]
        if nx is None:
            continue
        if m["mix_op"][j, i] == CUTMIX:
            y0, y1, x0, x1 = m["mix_box"][j, i]
            nx[j, i, :, y0:y1, x0:x1] = x[k, i, :, y0:y1, x0:x1]
        else:
            nx[j, i] = lam * x[j, i].astype(np.float32) + (1.0 - lam) * x[k, i].astype(np.float32)
    return {**a, **({"x": nx} if nx is not None else {}), "labels": nq, "slice_target": nst, "slice_mask": nsm}


def mix_batch(mix: MixConfig, a: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """CutMix / mixup across an augmented batch, slot by slot (pure; rules in the module docstring).

    Returns the same arrays with labels as soft targets [B, T, 3] and slice_target [B, T, S]
    (float32, unnormalised: all-zero = unlabelled); a mixed slot's slice_mask is the union of both.
    """
    h, w = np.shape(a["x"])[-2:]
    return apply_mix(a, draw_mix(mix, a["target_mask"], rng, h, w))


def batch_tensors(cfg: GradeConfig, a: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Augmented arrays → grader tensors: x [B, T, S, 1, H, W] float32 and per-target ids, masks, labels.

    Arrays of `defer_samples` carry no x: their aug_*/mix_* arrays pass through as tensors for the device.
    """
    conditions = [c for c, _, _ in cfg.slots]
    views = np.array([v for _, v, _ in cfg.slots])
    b, t = a["target_mask"].shape
    cond_idx = np.array([CONDITIONS.index(c) for c in conditions])
    spinal = np.array([c == CONDITIONS[0] for c in conditions])
    x = {"x": torch.from_numpy(to_float32(a["x"])[:, :, :, None])} if "x" in a else {}  # [B, T, S, 1, H, W]
    return {
        **x,
        "slice_mask": torch.from_numpy(np.asarray(a["slice_mask"], bool)),
        "target_mask": torch.from_numpy(np.asarray(a["target_mask"], bool)),
        # Hard ids [B, T], or soft targets [B, T, 3] / [B, T, S] from mix_batch.
        "labels": torch.from_numpy(_target_array(a["labels"], 2)),
        "slice_target": torch.from_numpy(_target_array(a["slice_target"], 2)),
        "level": torch.from_numpy(np.repeat(np.asarray(a["level"], np.int64)[:, None], t, 1)),
        "condition": torch.from_numpy(np.broadcast_to(cond_idx, (b, t)).copy()),
        "view": torch.from_numpy(np.broadcast_to(views, (b, t)).copy()),
        # The study id's rank in the batch keeps ids small and exact in int64.
        "spinal_study": torch.from_numpy(np.where(spinal[None], np.unique(np.asarray(a["study_id"]), return_inverse=True)[1].reshape(-1)[:, None], -1)),
        **{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in a.items() if k.startswith(("aug_", "mix_"))},
    }


def _target_array(a: np.ndarray, hard_ndim: int) -> np.ndarray:
    a = np.asarray(a)
    return a.astype(np.int64) if a.ndim == hard_ndim else a.astype(np.float32)


def collate_samples(cfg: GradeConfig, rows: dict[str, np.ndarray], rng: np.random.Generator | None, errors: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """Sample rows → grader tensors; augmented when rng is given (pure; shared by train, OOF and inference)."""
    return batch_tensors(cfg, augment_samples(cfg, rows, rng, errors))
