"""What every model stage provides, and the one driver that trains a fold.

A stage turns prepared tables into training samples (a pure function over a pandas batch of
studies; `spine_ray.sample_cache` builds them once for all folds), augments sample rows into
fixed-shape arrays (from an explicit generator; Ray Data runs this on CPU workers while the
trainer steps), turns those arrays into tensors, builds its model, computes its loss and predicts
held-out samples.

`fit_fold` is the only place a fold's model is built and trained: the plain in-process path
(`run_fold`, used by tests, GPU checks and `spine-ray tune-lr` trials) and the Ray Train workers
(`spine_ray.distributed`) differ only in where their batches come from.

A stage may train a fold in steps (two-step training: all weights, then the head on a frozen
backbone): its optional `phases(job)` returns one job per step, each with its own config (loss,
schedule, frozen parameters), and `set_trainable(job, model)` freezes what that step leaves
alone. The steps share one model and one epoch count (`fold_epochs`) for the batch stream; a
checkpoint records its step (`phase`), so a resumed fold picks up inside the right one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn

from spine_ray.train_loop import EpochResult, TrainConfig, fit

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class FoldJob:
    """Everything a worker needs to train and predict one fold of one stage (picklable)."""

    stage: str  # "localize" or "grade"
    member: str  # ensemble member name (the view for stage 1)
    fold: int
    n_folds: int
    config: Any  # the member's typed config (e.g. GradeConfig, ViewConfig): a frozen dataclass
    prepared: str  # the prepare output (volumes/, labels.parquet), path or URL
    run_dir: str  # where this run's tables go, path or URL
    # Tables the stage reads, name → URL: earlier stages' outputs (e.g. "points") and, once built,
    # the sample caches "samples:train" / "samples:val" (spine_ray.sample_cache).
    inputs: dict[str, str]
    # Folds of the same run this one reads (their `{member}-fold{k}` keys): it starts only after
    # they are done, and builds its validation samples from their outputs itself (no shared cache).
    needs: tuple[str, ...] = ()


class Stage(Protocol):
    """The pure pieces of one model stage."""

    def train_config(self, job: FoldJob) -> TrainConfig:
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

    def build_model(self, job: FoldJob) -> nn.Module:
        """A fresh model."""

    def loss(self, job: FoldJob, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Training loss and named parts."""

    def predict(self, job: FoldJob, model: nn.Module, samples: pd.DataFrame) -> pd.DataFrame:
        """Predictions for held-out samples: the stage's out-of-fold table."""

    # Optional, for stages that train in steps or freeze parameters (see the module docstring):
    #   phases(job) -> list[FoldJob]; set_trainable(job, model) -> None;
    #   select(job) -> str | None (the validation metric a step keeps its best epoch by).


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
    return stage.build_model(job)


def steps_per_epoch(n_samples: int, batch_size: int, world: int = 1) -> int:
    """Optimizer steps per epoch and worker: every worker takes the same number (DDP needs it)."""
    return max(1, -(-n_samples // (batch_size * world)))


def fit_fold(
    stage: Stage,
    job: FoldJob,
    batches: Callable[[int], Iterable[Batch]],
    n_train: int,
    *,
    device: torch.device | None = None,
    world: int = 1,
    prepare: Callable[[nn.Module], nn.Module] | None = None,
    resume: dict[str, Any] | None = None,
    on_epoch_end: Callable[[EpochResult], None] | None = None,
    validate: Callable[[nn.Module], dict[str, float]] | None = None,
) -> tuple[nn.Module, dict[str, float]]:
    """The one fold driver: a seeded fresh model trained on `batches(epoch)`; returns (bare model, last metrics).

    Steps (`phases`) run in order on one model; step i sees epochs numbered after the earlier
    steps' (`batches(offset + e)`), and its checkpoints carry `phase` = i. `prepare` wraps the
    model for distributed training (Ray Train's `prepare_model`), once per step because DDP fixes
    the trainable parameters when it wraps; the returned model is the bare one, in eval mode.
    """
    steps = phases(stage, job)
    model = new_model(stage, job)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    first = int(resume.get("phase", 0)) if resume is not None else 0
    if not 0 <= first < len(steps):
        raise ValueError(f"checkpoint of step {first}, but {job.member} trains in {len(steps)} step(s)")
    metrics: dict[str, float] = {}
    offset = sum(stage.train_config(p).epochs for p in steps[:first])
    for i in range(first, len(steps)):
        step = steps[i]
        cfg = stage.train_config(step)
        if hasattr(stage, "set_trainable"):
            stage.set_trainable(step, model)
        wrapped = prepare(model) if prepare is not None else model

        def tagged(result: EpochResult, i: int = i) -> None:
            result.state["phase"] = i
            result.metrics["phase"] = i
            on_epoch_end(result)

        metrics = fit(
            wrapped, lambda m, b, step=step: stage.loss(step, m, b), lambda e, o=offset: batches(o + e),
            steps_per_epoch(n_train, cfg.batch_size, world), cfg,
            validate=validate, on_epoch_end=tagged if on_epoch_end is not None else None,
            resume=resume if i == first else None, device=device,
            select=stage.select(step) if hasattr(stage, "select") else None,
        )
        offset += cfg.epochs
    model.eval()
    return model, metrics


def local_batches(stage: Stage, job: FoldJob, train: pd.DataFrame) -> Callable[[int], Iterator[Batch]]:
    """In-process batches of a samples frame: shuffled and augmented per epoch, on the calling thread."""
    cfg = stage.train_config(job)

    def batches(epoch: int) -> Iterator[Batch]:
        rng = epoch_rng(cfg.seed, job.fold, epoch)
        for rows in numpy_batches(train, cfg.batch_size, rng):
            yield collate(stage, job, rows, rng)

    return batches


def split_studies(job: FoldJob, split: str) -> list[int]:
    """Study ids of a fold's `train` (other folds) or `val` (this fold) split; `all` for every study."""
    from spine_ray.storage import join, read_parquet

    folds = read_parquet(join(job.run_dir, "folds.parquet"))
    held = folds["fold"] == job.fold
    chosen = folds if split == "all" else folds.loc[held if split == "val" else ~held]
    return sorted(chosen["study_id"].astype(int).tolist())


def source_rows(stage: Stage, job: FoldJob, studies: list[int]) -> pd.DataFrame:
    """The stage's source rows of some studies (a filtered Parquet read)."""
    from spine_ray.storage import fs_for

    fs, path = fs_for(stage.source(job))
    return pd.read_parquet(path, filesystem=fs, filters=[("study_id", "in", studies)])


def samples(stage: Stage, job: FoldJob, split: str) -> pd.DataFrame:
    """A fold's samples of a split: from its sample cache when the job has one, else built in-process."""
    from spine_ray.sample_cache import cache_input, read_cache

    studies = split_studies(job, split)
    if cache_input(split) in job.inputs:
        return read_cache(job.inputs[cache_input(split)], studies)
    return stage.to_samples(job, split, source_rows(stage, job, studies))


def run_fold(
    stage: Stage,
    job: FoldJob,
    *,
    device: torch.device | None = None,
    resume: dict[str, Any] | None = None,
    on_epoch_end: Callable[[EpochResult], None] | None = None,
) -> tuple[nn.Module, dict[str, float], pd.DataFrame]:
    """Train one fold in-process and predict its held-out split: (model, metrics, oof table).

    A stage with `validate(job, model, samples)` is validated on the held-out split after every
    epoch (steps that `select` a metric keep their best epoch by it).
    """
    train, val = samples(stage, job, "train"), samples(stage, job, "val")
    validate = (lambda m: stage.validate(job, m, val)) if hasattr(stage, "validate") else None
    model, metrics = fit_fold(
        stage, job, local_batches(stage, job, train), len(train), device=device, resume=resume, on_epoch_end=on_epoch_end, validate=validate,
    )
    return model, metrics, stage.predict(job, model, val)
