"""Can a tiny CNN see severity in the synthetic images? Fraction of the prior → oracle gap it closes.

    spine-ray synth data/s60 --studies 60 --seed 5 --preset simple
    spine-ray synth data/r60 --studies 60 --seed 5 --preset realistic
    python benchmarks/synth_learnability.py data/s60 --epochs 80
    python benchmarks/synth_learnability.py data/r60 --epochs 80

Crops 5 slices × 48 × 48 px at 1 mm per px (`--mm-per-px`, 0 for native pixels; nearest-neighbour
resampling, so both presets show the model the same 48 mm whatever their matrix) around every labelled point
(neighbours ordered along the slice normal), trains a 3-layer CNN on the first 70% of studies with the metric's 1/2/4 class weights
and scores the remaining studies against the prior (fitted on the training studies) and the
oracle. A check of the generator, not a model of the project.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import torch
from torch import nn

from spine_ray.core.schema import (
    CONDITIONS,
    LABEL_COLUMNS,
    label_matrix,
    read_coordinates,
    read_labels,
)
from spine_ray.ensemble.metric import score_arrays
from spine_ray.ensemble.prior import fit_prior, predict_prior
from spine_ray.synth.labels import LabelConfig, column_params, oracle_probs

HALF = 24


def crop_stack(folder: Path, instance: int, x: float, y: float, mm_per_px: float = 1.0) -> np.ndarray:
    """Five slices around `instance` (spatial order), HALF px of `mm_per_px` either side of (x, y): [5, 48, 48]."""
    dss = [pydicom.dcmread(p) for p in folder.glob("*.dcm")]
    o = np.asarray(dss[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(o[:3], o[3:])
    dss.sort(key=lambda d: float(np.asarray(d.ImagePositionPatient, dtype=float) @ normal))
    k = next(i for i, d in enumerate(dss) if int(d.InstanceNumber) == instance)
    out = []
    offsets = (np.arange(2 * HALF) - HALF + 0.5) * mm_per_px
    for j in range(k - 2, k + 3):
        d = dss[min(max(j, 0), len(dss) - 1)]
        a = d.pixel_array.astype(np.float32)
        dy, dx = (float(v) for v in d.PixelSpacing)
        if mm_per_px > 0:
            rows, cols = np.rint(y + offsets / dy).astype(int), np.rint(x + offsets / dx).astype(int)
        else:  # native pixels, as before issue 17
            rows, cols = int(round(y)) + np.arange(-HALF, HALF), int(round(x)) + np.arange(-HALF, HALF)
        inside = (rows[:, None] >= 0) & (rows[:, None] < a.shape[0]) & (cols[None, :] >= 0) & (cols[None, :] < a.shape[1])
        out.append(np.where(inside, a[np.clip(rows, 0, a.shape[0] - 1)][:, np.clip(cols, 0, a.shape[1] - 1)], 0.0))
    stack = np.stack(out)
    return stack / (np.percentile(stack, 99) + 1.0)


class TinyCNN(nn.Module):
    """Three conv blocks and a linear head that also sees the condition."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(5, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(32 + len(CONDITIONS), 3)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # x: [B, 5, 48, 48], cond: [B] → logits [B, 3]
        return self.head(torch.cat([self.features(x), nn.functional.one_hot(cond, len(CONDITIONS)).float()], 1))


def main() -> None:
    """Build crops, train, score, print the fraction of the gap closed."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", type=Path)
    ap.add_argument("--epochs", type=int, default=80)
    ap.add_argument("--mm-per-px", type=float, default=1.0)
    ap.add_argument("--studies", type=int, default=0, help="use only the first N training studies (0 = all)")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    labels = read_labels(str(args.root / "train.csv"))
    if args.studies:
        labels = labels.iloc[: args.studies].reset_index(drop=True)
    lm = label_matrix(labels)
    latent = pd.read_csv(args.root / "latent.csv").set_index("study_id").loc[labels["study_id"]].to_numpy()
    index = {s: i for i, s in enumerate(labels["study_id"])}
    coords = read_coordinates(str(args.root / "train_label_coordinates.csv"))
    xs, study, target, cond = [], [], [], []
    coords = coords[coords.study_id.isin(index)]
    for r in coords.itertuples():
        xs.append(crop_stack(args.root / "train_images" / str(r.study_id) / str(r.series_id), r.instance_number, r.x, r.y, args.mm_per_px))
        study.append(index[r.study_id])
        target.append(LABEL_COLUMNS.index(r.target))
        cond.append(CONDITIONS.index(r.target.rsplit("_", 2)[0]))
    x, c = torch.tensor(np.stack(xs)), torch.tensor(cond)
    study, target = np.array(study), np.array(target)
    y = torch.tensor(lm[study, target].astype(np.int64))
    n = len(lm)
    held = np.arange(n) >= int(0.7 * n)
    train_rows = torch.tensor(np.flatnonzero(~held[study]))
    net = TinyCNN()
    opt = torch.optim.AdamW(net.parameters(), 2e-3, weight_decay=1e-3)
    weights = torch.tensor([1.0, 2.0, 4.0])
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        perm = train_rows[torch.randperm(len(train_rows))]
        for b in range(0, len(perm), 64):
            i = perm[b : b + 64]
            loss = nn.functional.cross_entropy(net(x[i], c[i]), y[i], weight=weights)
            opt.zero_grad()
            loss.backward()
            opt.step()
    train_s = time.perf_counter() - t0
    with torch.no_grad():
        p = torch.softmax(net(x, c), 1).numpy()
    probs = np.full((n, 25, 3), 1 / 3)
    probs[study, target] = p
    test = np.flatnonzero(held)
    oracle = oracle_probs(latent, column_params(LabelConfig())[2])
    cnn = score_arrays(lm[test], probs[test]).score
    orc = score_arrays(lm[test], oracle[test]).score
    pri = score_arrays(lm[test], predict_prior(fit_prior(lm[~held]), len(test))).score
    print(f"{len(coords)} crops, {int((~held).sum())} train / {len(test)} test studies, training {train_s:.0f} s")
    print(f"cnn {cnn:.4f}  oracle {orc:.4f}  prior {pri:.4f}  gap closed {(pri - cnn) / (pri - orc):.2f}")


if __name__ == "__main__":
    main()
