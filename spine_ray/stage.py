"""What every model stage provides, and how one fold runs without Ray.

A stage turns prepared tables into training samples (a pure function over a pandas batch, which
Ray Data maps over shards on a cluster), collates sample batches into tensors (with augmentation
from an explicit generator), builds its model, computes its loss, and predicts held-out samples.
`run_fold` runs one fold with the plain loop: tests and GPU checks call it; Ray Train workers call
the same pieces (see `spine_ray.distributed`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn

from spine_ray.train_loop import EpochResult, TrainConfig, fit


@dataclass(frozen=True)
class FoldJob:
    """Everything a worker needs to train and predict one fold of one stage (picklable)."""

    stage: str  # "localize" or "grade"
    member: str  # ensemble member name (the stage name for single-model stages)
    fold: int
    n_folds: int
    config: dict[str, Any]  # the stage config as plain data (spine_ray.config.to_dict)
    prepared: str  # the prepare output (volumes/, labels.parquet), path or URL
    run_dir: str  # where this run's tables go, path or URL
    inputs: dict[str, str]  # extra tables a stage reads (e.g. stage-1 OOF points), name → URL


class Stage(Protocol):
    """The pure pieces of one model stage."""

    def train_config(self, job: FoldJob) -> TrainConfig:
        """Optimisation settings."""

    def source(self, job: FoldJob) -> str:
        """The prepared Parquet table (path or URL) whose rows this stage turns into samples."""

    def to_samples(self, job: FoldJob, split: str, rows: pd.DataFrame) -> pd.DataFrame:
        """Source rows of the `train` or `val` split's studies → samples, one row each."""

    def collate(self, job: FoldJob, rows: dict[str, np.ndarray], rng: np.random.Generator, train: bool) -> dict[str, torch.Tensor]:
        """A batch of sample rows (columns → arrays) → tensors, augmented when train."""

    def build_model(self, job: FoldJob) -> nn.Module:
        """A fresh model."""

    def loss(self, job: FoldJob, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss and named parts."""

    def predict(self, job: FoldJob, model: nn.Module, samples: pd.DataFrame) -> pd.DataFrame:
        """Predictions for held-out samples: the stage's out-of-fold table."""


def numpy_batches(df: pd.DataFrame, batch_size: int, rng: np.random.Generator | None) -> Iterator[dict[str, np.ndarray]]:
    """Column batches of a samples frame; shuffled when rng is given."""
    order = rng.permutation(len(df)) if rng is not None else np.arange(len(df))
    for i in range(0, len(df), batch_size):
        part = df.iloc[order[i : i + batch_size]]
        yield {c: part[c].to_numpy() for c in part.columns}


def epoch_rng(seed: int, fold: int, epoch: int, rank: int = 0) -> np.random.Generator:
    """The augmentation generator of one worker's epoch: reproducible, different per epoch and rank."""
    return np.random.default_rng([seed, fold, epoch, rank])


def new_model(stage: Stage, job: FoldJob) -> nn.Module:
    """The stage's fresh model, its initial weights fixed by the fold's seed (not the process's RNG)."""
    torch.manual_seed(stage.train_config(job).seed * 1000 + job.fold)
    return stage.build_model(job)


def split_studies(job: FoldJob, split: str) -> list[int]:
    """Study ids of a fold's `train` (other folds) or `val` (this fold) split."""
    from spine_ray.storage import join, read_parquet

    folds = read_parquet(join(job.run_dir, "folds.parquet"))
    held = folds["fold"] == job.fold
    return sorted(folds.loc[held if split == "val" else ~held, "study_id"].astype(int).tolist())


def source_rows(stage: Stage, job: FoldJob, studies: list[int]) -> pd.DataFrame:
    """The stage's source rows of some studies (a filtered Parquet read)."""
    from spine_ray.storage import fs_for

    fs, path = fs_for(stage.source(job))
    return pd.read_parquet(path, filesystem=fs, filters=[("study_id", "in", studies)])


def samples(stage: Stage, job: FoldJob, split: str) -> pd.DataFrame:
    """All samples of a split, in-process (the Ray path maps `to_samples` over batches of studies)."""
    return stage.to_samples(job, split, source_rows(stage, job, split_studies(job, split)))


def run_fold(
    stage: Stage,
    job: FoldJob,
    *,
    device: torch.device | None = None,
    resume: dict[str, Any] | None = None,
    on_epoch_end: Any = None,
) -> tuple[nn.Module, dict[str, float], pd.DataFrame]:
    """Train one fold in-process and predict its held-out split: (model, metrics, oof table)."""
    cfg = stage.train_config(job)
    train = samples(stage, job, "train")
    val = samples(stage, job, "val")
    model = new_model(stage, job)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)

    def batches(epoch: int):
        rng = epoch_rng(cfg.seed, job.fold, epoch)
        for rows in numpy_batches(train, cfg.batch_size, rng):
            yield stage.collate(job, rows, rng, True)

    steps = -(-len(train) // cfg.batch_size)
    metrics = fit(
        model,
        lambda m, b: stage.loss(job, m, b),
        batches,
        steps,
        cfg,
        resume=resume,
        device=device,
        on_epoch_end=on_epoch_end,
    )
    model.eval()
    return model, metrics, stage.predict(job, model, val)


__all__ = ["FoldJob", "Stage", "new_model", "run_fold", "samples", "source_rows", "split_studies", "numpy_batches", "epoch_rng", "EpochResult"]
