"""Stage 2's augmentation of stored samples: re-crop with jitter, intensity, the left-right flip, CutMix/mixup, and the batch tensors."""

from __future__ import annotations

import numpy as np
import torch

from spine_ray.core.schema import CONDITIONS, LEVELS
from spine_ray.data.transforms import intensity, mirror_name
from spine_ray.stages.grade.config import SAGITTAL_VIEWS, GradeConfig, MixConfig
from spine_ray.stages.grade.samples import crop_target


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
    perm = slot_permutation(conditions)
    rest = []
    for a in per_target:
        a = a.copy()
        if a.ndim == 2:
            a[sag] = a[sag, ::-1]
        rest.append(a[perm])
    if slice_index is not None:
        s = x.shape[1]
        slice_index = np.where(sag & (slice_index >= 0), s - 1 - slice_index, slice_index)[perm]
    return (x[perm], *rest, slice_index)


def slot_permutation(conditions: list[str]) -> np.ndarray:
    """Slot i → the slot of its mirrored condition; a self-mirrored (spinal) slot, even repeated, stays put."""
    return np.asarray([i if mirror_name(c) == c else conditions.index(mirror_name(c)) for i, c in enumerate(conditions)], np.int64)


def augment_samples(cfg: GradeConfig, rows: dict[str, np.ndarray], rng: np.random.Generator | None, errors: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Sample rows → fixed-shape per-sample arrays (re-cropped, augmented when rng is given); pure.

    x [B, T, S, H, W] float16 (half the bytes through Ray Data's object store), slice_mask [B, T, S],
    target_mask [B, T], labels [B, T], slice_target [B, T], level [B], study_id [B].
    """
    slots = cfg.slots
    t = len(slots)
    conditions = [c for c, _, _ in slots]
    views = np.array([v for _, v, _ in slots])
    xs, smasks, tmasks, labs, starg, studies, levels = [], [], [], [], [], [], []
    for j in range(len(rows["study_id"])):
        shape = tuple(rows["shape"][j])
        patch = np.frombuffer(rows["x"][j], np.float16).reshape(shape)
        inside = np.frombuffer(rows["inside"][j], bool).reshape(shape[:2])
        tm = np.frombuffer(rows["target_mask"][j], bool).copy()
        lab = np.frombuffer(rows["labels"][j], np.int8).astype(np.int64)
        off = np.frombuffer(rows["gt_offset"][j], np.int8).astype(np.int64)
        x = np.zeros((t, 2 * cfg.k + 1, cfg.out_px, cfg.out_px), np.float32)
        sm = np.zeros((t, 2 * cfg.k + 1), bool)
        st = np.full(t, -1, np.int64)
        for i, (_, view, lview) in enumerate(slots):
            if not tm[i]:
                continue
            err = None if errors is None else errors.get(lview)
            x[i], sm[i], shift = crop_target(cfg, patch[i], inside[i], view, rng, err)
            if rng is not None and cfg.intensity_aug:
                x[i] = intensity(x[i], rng)
            pos = cfg.k + off[i] - shift
            st[i] = pos if off[i] != 127 and 0 <= pos <= 2 * cfg.k else -1
        if rng is not None and rng.random() < cfg.flip_prob:
            x, sm, tm, lab, st = flip_sample(x, views, conditions, sm, tm, lab, slice_index=st)
        lab = np.where(tm, lab, -1)
        xs.append(x.astype(np.float16))
        smasks.append(sm)
        tmasks.append(tm)
        labs.append(lab)
        starg.append(np.where(tm, st, -1))
        studies.append(int(rows["study_id"][j]))
        levels.append(LEVELS.index(rows["level"][j]))
    b = len(xs)
    empty = (0, t)
    out = {
        "x": np.stack(xs) if b else np.zeros((*empty, 2 * cfg.k + 1, cfg.out_px, cfg.out_px), np.float16),
        "slice_mask": np.stack(smasks) if b else np.zeros((*empty, 2 * cfg.k + 1), bool),
        "target_mask": np.stack(tmasks) if b else np.zeros(empty, bool),
        "labels": np.stack(labs) if b else np.zeros(empty, np.int64),
        "slice_target": np.stack(starg) if b else np.zeros(empty, np.int64),
        "level": np.asarray(levels, np.int64),
        "study_id": np.asarray(studies, np.int64),
    }
    return mix_batch(cfg.mix, out, rng) if rng is not None and cfg.mix.enabled else out


def _one_hot(idx: np.ndarray, n: int) -> np.ndarray:
    """Indices [...] (−1 = unknown) → float32 one-hot [..., n], all-zero where unknown."""
    return (idx[..., None] == np.arange(n)).astype(np.float32)


def _box(rng: np.random.Generator, lam: float, h: int, w: int) -> tuple[int, int, int, int]:
    """A CutMix box (y0, y1, x0, x1) of about (1 − λ)·H·W, centred uniformly and clipped to the crop."""
    r = np.sqrt(1.0 - lam)
    ch, cw = int(round(h * r)), int(round(w * r))
    cy, cx = int(rng.integers(h)), int(rng.integers(w))
    return max(cy - ch // 2, 0), min(cy - ch // 2 + ch, h), max(cx - cw // 2, 0), min(cx - cw // 2 + cw, w)


def mix_batch(mix: MixConfig, a: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """CutMix / mixup across an augmented batch, slot by slot (pure; rules in the module docstring).

    Returns the same arrays with labels as soft targets [B, T, 3] and slice_target [B, T, S]
    (float32, unnormalised: all-zero = unlabelled); a mixed slot's slice_mask is the union of both.
    """
    x = np.asarray(a["x"])  # float16 stays float16: CutMix copies pixels, mixup blends one slot at a time
    b, t, s, h, w = x.shape
    tm, sm = a["target_mask"], a["slice_mask"]
    q, st = _one_hot(a["labels"], 3), _one_hot(a["slice_target"], s)
    nx, nq, nst, nsm = x.copy(), q.copy(), st.copy(), sm.copy()
    partner = rng.permutation(b)
    for j in range(b):
        k, r = int(partner[j]), rng.random()
        op = "cutmix" if r < mix.cutmix_p else "mixup" if r < mix.cutmix_p + mix.mixup_p else None
        if op is None or k == j:
            continue
        for i in np.flatnonzero(tm[j] & tm[k]):
            lam = float(rng.beta(mix.alpha, mix.alpha))
            if op == "cutmix":
                y0, y1, x0, x1 = _box(rng, lam, h, w)
                nx[j, i, :, y0:y1, x0:x1] = x[k, i, :, y0:y1, x0:x1]
                lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually left its own
            else:
                nx[j, i] = lam * x[j, i].astype(np.float32) + (1.0 - lam) * x[k, i].astype(np.float32)
            nq[j, i] = lam * q[j, i] + (1.0 - lam) * q[k, i]
            nst[j, i] = lam * st[j, i] + (1.0 - lam) * st[k, i]
            nsm[j, i] = sm[j, i] | sm[k, i]
    return {**a, "x": nx, "labels": nq, "slice_target": nst, "slice_mask": nsm}


def batch_tensors(cfg: GradeConfig, a: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Augmented arrays → grader tensors: x [B, T, S, 1, H, W] float32 and per-target ids, masks, labels."""
    conditions = [c for c, _, _ in cfg.slots]
    views = np.array([v for _, v, _ in cfg.slots])
    b, t = a["target_mask"].shape
    cond_idx = np.array([CONDITIONS.index(c) for c in conditions])
    spinal = np.array([c == CONDITIONS[0] for c in conditions])
    return {
        "x": torch.from_numpy(np.asarray(a["x"], np.float32)[:, :, :, None]),  # [B, T, S, 1, H, W]
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
    }


def _target_array(a: np.ndarray, hard_ndim: int) -> np.ndarray:
    a = np.asarray(a)
    return a.astype(np.int64) if a.ndim == hard_ndim else a.astype(np.float32)


def collate_samples(cfg: GradeConfig, rows: dict[str, np.ndarray], rng: np.random.Generator | None, errors: dict[str, np.ndarray] | None = None) -> dict[str, torch.Tensor]:
    """Sample rows → grader tensors; augmented when rng is given (pure; shared by train, OOF and inference)."""
    return batch_tensors(cfg, augment_samples(cfg, rows, rng, errors))
