"""What every model stage provides (the `Stage` protocol), the `FoldJob` it is given, and where a fold's outputs go.

A stage turns prepared tables into training samples (a pure function over a pandas batch of
studies; `spine_ray.engine.sample_cache` builds them once for all folds), augments sample rows into
fixed-shape arrays (from an explicit generator; Ray Data runs this on CPU workers while the
trainer steps), turns those arrays into tensors, builds its model, computes its loss and predicts
held-out samples. A stage may leave part of the augmentation to the training device: `augment`
then ships what it needs (stored patches and drawn parameters) and `on_device` finishes the batch.

The driver that trains a fold with these pieces is `spine_ray.engine.fold.fit_fold`; every stage is
named in one table, `spine_ray.stages.registry.STAGES`.

A stage may train a fold in steps (two-step training: all weights, then the head on a frozen
backbone): its optional `phases(job)` returns one job per step, each with its own config (loss,
schedule, frozen parameters), and `set_trainable(job, model)` freezes what that step leaves
alone. The steps share one model and one epoch count (`fold_epochs`) for the batch stream; a
checkpoint records its step (`phase`), so a resumed fold picks up inside the right one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, Protocol, TypeVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from spine_ray.core.storage import exists, join
from spine_ray.data.volumes import VOLUMES_DIR
from spine_ray.engine.train_loop import TrainConfig

Batch = dict[str, torch.Tensor]
C = TypeVar("C")  # a stage's member config: a frozen dataclass (ViewConfig, GradeConfig, OneStageConfig)


@dataclass(frozen=True)
class FoldJob(Generic[C]):
    """Everything a worker needs to train and predict one fold of one stage (picklable)."""

    stage: str  # a name in spine_ray.stages.registry.STAGES: "localize", "grade" or "onestage"
    member: str  # ensemble member name (the view for stage 1)
    fold: int
    n_folds: int
    config: C  # the member's typed config
    prepared: str  # the prepare output (volumes/, labels.parquet), path or URL
    run_dir: str  # where this run's tables go, path or URL
    # Tables the stage reads, name → URL: earlier stages' outputs (e.g. "points") and, once built,
    # the sample caches "samples:train" / "samples:val" (spine_ray.engine.sample_cache).
    inputs: dict[str, str]
    # Folds of the same run this one reads (their `{member}-fold{k}` keys): it starts only after
    # they are done, and builds its validation samples from their outputs itself (no shared cache).
    needs: tuple[str, ...] = ()


class Stage(Protocol[C]):
    """The pure pieces of one model stage, for members whose config is a `config_type`."""

    config_type: ClassVar[type]  # the member config class: what a stored model's config is read back as

    def train_config(self, job: FoldJob[C]) -> TrainConfig:
        """Optimisation settings."""

    def source(self, job: FoldJob) -> str:
        """The prepared Parquet table (path or URL) whose rows this stage turns into samples."""

    def sample_key(self, job: FoldJob, split: str) -> dict[str, Any]:
        """What a split's samples depend on besides the prepared data: config fields and the names
        of the `job.inputs` tables read. Jobs with equal keys share one sample cache."""

    def to_samples(self, job: FoldJob, split: str, rows: pd.DataFrame) -> pd.DataFrame:
        """Source rows of some studies → `train` or `val` samples, one row each."""

    def augment(self, job: FoldJob, rows: dict[str, np.ndarray], rng: np.random.Generator | None) -> dict[str, np.ndarray]:
        """Sample rows (columns → arrays) → fixed-shape arrays, first axis the sample; augmented when rng is given."""

    def to_batch(self, job: FoldJob, arrays: dict[str, np.ndarray]) -> Batch:
        """Augmented arrays of a batch → the tensors `loss` and the model take."""

    def build_model(self, member: str, config: C) -> nn.Module:
        """A fresh model of a member (training and loading a stored one both build it here)."""

    def loss(self, job: FoldJob, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Training loss and named parts (detached device tensors: the loop reads them once an epoch)."""

    def predict(self, job: FoldJob, model: nn.Module, samples: pd.DataFrame) -> pd.DataFrame:
        """Predictions for held-out samples: the stage's out-of-fold table."""

    # Optional, for stages that train in steps or freeze parameters (see the module docstring):
    #   phases(job) -> list[FoldJob]; set_trainable(job, model) -> None;
    #   select(job) -> str | None (the validation metric a step keeps its best epoch by);
    #   validate(job, model, val_samples) -> dict[str, float] (held-out metrics after every epoch);
    #   on_device(job, batch) -> Batch (a training batch's last step once on the training device,
    #   before `loss`: the grade stage augments there with `augment_on: device`).


class VolumeStage(Generic[C]):
    """What most stages share: members train with `config.train` and read the prepared volumes."""

    def train_config(self, job: FoldJob[C]) -> TrainConfig:
        """The member's optimisation settings."""
        return job.config.train

    def source(self, job: FoldJob[C]) -> str:
        """The prepared volume rows (one per image stack)."""
        return join(job.prepared, VOLUMES_DIR)


def phases(stage: Stage, job: FoldJob) -> list[FoldJob]:
    """The fold's training steps, one job each (a stage without `phases` trains in one)."""
    return list(stage.phases(job)) if hasattr(stage, "phases") else [job]


def fold_epochs(stage: Stage, job: FoldJob) -> int:
    """Epochs of all the fold's steps together: the length of its batch stream."""
    return sum(stage.train_config(p).epochs for p in phases(stage, job))


def collate(stage: Stage, job: FoldJob, rows: dict[str, np.ndarray], rng: np.random.Generator | None) -> Batch:
    """Sample rows → tensors in one go (augmented when rng is given)."""
    return stage.to_batch(job, stage.augment(job, rows, rng))


def columns(df: pd.DataFrame) -> dict[str, np.ndarray]:
    """A samples frame as the column → array mapping that `augment` takes."""
    return {c: df[c].to_numpy() for c in df.columns}


def numpy_batches(df: pd.DataFrame, batch_size: int, rng: np.random.Generator | None) -> Iterator[dict[str, np.ndarray]]:
    """Column batches of a samples frame; shuffled when rng is given."""
    order = rng.permutation(len(df)) if rng is not None else np.arange(len(df))
    for i in range(0, len(df), batch_size):
        yield columns(df.iloc[order[i : i + batch_size]])


def epoch_rng(seed: int, fold: int, epoch: int, rank: int = 0, part: int = -1) -> np.random.Generator:
    """The augmentation generator of one worker's epoch (or of one part of it): reproducible, different per epoch and rank."""
    return np.random.default_rng([seed, fold, epoch, rank] + ([part] if part >= 0 else []))


def new_model(stage: Stage, job: FoldJob) -> nn.Module:
    """The stage's fresh model, its initial weights fixed by the fold's seed (not the process's RNG)."""
    torch.manual_seed(stage.train_config(job).seed * 1000 + job.fold)
    return stage.build_model(job.member, job.config)


def steps_per_epoch(n_samples: int, batch_size: int, world: int = 1) -> int:
    """Optimizer steps per epoch and worker: every worker takes the same number (DDP needs it)."""
    return max(1, -(-n_samples // (batch_size * world)))


def fold_key(member: str, fold: int) -> str:
    """A fold's name in progress tables, storage and `FoldJob.needs`: `{member}-fold{k}`."""
    return f"{member}-fold{fold}"


def job_key(job: FoldJob) -> str:
    """A fold job's name (`fold_key` of its member and fold)."""
    return fold_key(job.member, job.fold)


def fold_path(run_dir: str, stage: str, member: str, fold: int) -> str:
    """A fold's folder in a run: `{run_dir}/{stage}/{member}/fold{k}`."""
    return join(run_dir, stage, member, f"fold{fold}")


def fold_dir(job: FoldJob) -> str:
    """Where a fold's final model, out-of-fold table and done marker go."""
    return fold_path(job.run_dir, job.stage, job.member, job.fold)


def is_done(job: FoldJob) -> bool:
    """A fold is done when its marker exists (written after its model and OOF table)."""
    return exists(join(fold_dir(job), "done.json"))
