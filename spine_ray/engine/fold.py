"""The one fold driver and a fold's outputs: what every path (in-process, Ray Train, tune-lr) runs.

`fit_fold` is the only place a fold's model is built and trained. The plain in-process path
(`run_fold`, used by tests, GPU checks and `spine-ray tune-lr` trials) and the Ray Train workers
(`spine_ray.engine.worker`) differ only in where their batches come from: validation after every
epoch (`validator`), selection of a step's best epoch, checkpoints and metrics are the same.

A finished fold writes, under `fold_dir(job)`: `model.pt` (weights and the member config as plain
data, loadable weights-only: `spine_ray.stages.registry.load_fold_model` builds the network from it),
`oof.parquet` (the stage's out-of-fold table) and, last, `done.json` (rows, the resumed epoch,
the epochs steps selected, the fold's timeline).
"""

from __future__ import annotations

import dataclasses
import io
import json
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pandas as pd
import torch
from torch import nn

from spine_ray.core.config import to_dict
from spine_ray.core.storage import (
    atomic_write_bytes,
    atomic_write_parquet,
    atomic_write_text,
    join,
    read_parquet,
)
from spine_ray.engine import compile_cache
from spine_ray.engine.sample_cache import samples
from spine_ray.engine.stage import (
    Batch,
    FoldJob,
    Stage,
    collate,
    epoch_rng,
    fold_dir,
    job_key,
    new_model,
    numpy_batches,
    phases,
    steps_per_epoch,
)
from spine_ray.engine.train_loop import EpochResult, fit
from spine_ray.models.backbone import resolve_checkpointing, speed_up

SPEED_UP_DEVICES = ("cuda",)  # where `train.{channels_last, compile, cudnn_benchmark}` apply: no effect on CPU


def validator(stage: Stage, job: FoldJob, val: pd.DataFrame) -> Callable[[nn.Module], dict[str, float]] | None:
    """The per-epoch validation of a fold on its held-out samples (None for a stage that does not validate)."""
    if not hasattr(stage, "validate"):
        return None
    return lambda model: stage.validate(job, model, val)


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
    gpu_share: float = 1.0,
) -> tuple[nn.Module, dict[str, float]]:
    """A seeded fresh model trained on `batches(epoch)`; returns (bare model, metrics).

    Steps (`phases`) run in order on one model; step i sees epochs numbered after the earlier
    steps' (`batches(offset + e)`), and its checkpoints carry `phase` = i. `prepare` wraps the
    model for distributed training (Ray Train's `prepare_model`), once per step because DDP fixes
    the trainable parameters when it wraps; the returned model is the bare one, in eval mode. The
    metrics are the last step's, plus `phase{i}_selected_epoch` for every step that kept its best
    epoch by a validation metric (`select`). `gpu_share`: the part of the device this job holds
    (`resources.gpus_per_worker`), which settles `grad_checkpointing: auto`.
    """
    steps = phases(stage, job)
    model = new_model(stage, job)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    resolve_checkpointing(model, device, gpu_share)
    cfg0 = stage.train_config(job)
    compiled = device.type in SPEED_UP_DEVICES and "compile" in speed_up(model, cfg0.channels_last, cfg0.compile, cfg0.cudnn_benchmark)
    cache = compile_cache.begin(job.run_dir, model, job_key(job), compiled and cfg0.compile_cache)
    first = int(resume.get("phase", 0)) if resume is not None else 0
    if not 0 <= first < len(steps):
        raise ValueError(f"checkpoint of step {first}, but {job.member} trains in {len(steps)} step(s)")
    metrics: dict[str, float] = {}
    selected: dict[str, float] = {}
    offset = sum(stage.train_config(p).epochs for p in steps[:first])
    for i in range(first, len(steps)):
        step = steps[i]
        cfg = stage.train_config(step)
        if hasattr(stage, "set_trainable"):
            stage.set_trainable(step, model)
        wrapped = prepare(model) if prepare is not None else model

        def tagged(result: EpochResult, i: int = i) -> None:
            if cache is not None:  # the first epoch's shapes (and any new later), for the jobs still to start
                cache.save()
            result.state["phase"] = i
            result.metrics["phase"] = i
            if on_epoch_end is not None:
                on_epoch_end(result)

        metrics = fit(
            wrapped, lambda m, b, step=step: stage.loss(step, m, b), lambda e, o=offset: batches(o + e),
            steps_per_epoch(n_train, cfg.batch_size, world), cfg,
            validate=validate, on_epoch_end=tagged if on_epoch_end is not None or cache is not None else None,
            resume=resume if i == first else None, device=device,
            select=stage.select(step) if hasattr(stage, "select") else None,
            on_device=(lambda b, step=step: stage.on_device(step, b)) if hasattr(stage, "on_device") else None, world=world,
        )
        if "selected_epoch" in metrics:
            selected[f"phase{i}_selected_epoch"] = metrics["selected_epoch"]
        offset += cfg.epochs
    model.eval()
    return model, {**metrics, **selected}


def local_batches(stage: Stage, job: FoldJob, train: pd.DataFrame) -> Callable[[int], Iterator[Batch]]:
    """In-process batches of a samples frame: shuffled and augmented per epoch, on the calling thread."""
    cfg = stage.train_config(job)

    def batches(epoch: int) -> Iterator[Batch]:
        rng = epoch_rng(cfg.seed, job.fold, epoch)
        for rows in numpy_batches(train, cfg.batch_size, rng):
            yield collate(stage, job, rows, rng)

    return batches


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
    epoch (steps that `select` a metric keep their best epoch by it), as under Ray Train.
    """
    train, val = samples(stage, job, "train"), samples(stage, job, "val")
    model, metrics = fit_fold(
        stage, job, local_batches(stage, job, train), len(train), device=device, resume=resume, on_epoch_end=on_epoch_end,
        validate=validator(stage, job, val),
    )
    oof = stage.predict(job, model, val)
    compile_cache.save_active()  # the prediction's shapes
    return model, metrics, oof


def finish_fold(
    stage: Stage, job: FoldJob, model: nn.Module, val: pd.DataFrame, metrics: dict[str, float] | None = None,
    resumed_from: int = -1, timeline: dict[str, float] | None = None,
) -> pd.DataFrame:
    """Predict the held-out split, write the final weights and OOF table, then the done marker.

    The marker keeps the epochs that steps selected (`phase{i}_selected_epoch`) and the fold's
    timeline (epoch seconds: its lane's Tune trial started, the lane's Ray Train worker started,
    this fold's turn in the lane began, training started and finished, the marker written), to
    show where a fold's wall time goes beyond its epochs.
    """
    oof = stage.predict(job, model, val)
    compile_cache.save_active()  # the prediction's shapes
    out = fold_dir(job)
    buf = io.BytesIO()
    # Weights and the member config as plain data only: loadable with weights_only=True (no code runs).
    config = to_dict(job.config) if dataclasses.is_dataclass(job.config) else job.config
    torch.save({"model": model.state_dict(), "config": config, "stage": job.stage, "member": job.member}, buf)
    atomic_write_bytes(join(out, "model.pt"), buf.getvalue())
    atomic_write_parquet(join(out, "oof.parquet"), oof)
    selected = {k: int(v) for k, v in (metrics or {}).items() if k.endswith("_selected_epoch")}
    mark_done(job, len(oof), resumed_from, selected, timeline)
    return oof


def mark_done(job: FoldJob, rows: int, resumed_from: int = -1, selected: dict[str, int] | None = None, timeline: dict[str, Any] | None = None) -> None:
    """Write a job's done marker, last of its outputs: rows, the resumed epoch, the epochs steps selected, its timeline."""
    done = {"fold": job.fold, "rows": rows, "resumed_from_epoch": resumed_from, "selected": selected or {}, "finished": time.time()}
    atomic_write_text(join(fold_dir(job), "done.json"), json.dumps({**done, "timeline": {**(timeline or {}), "finished": done["finished"]}}))


def read_oof(job: FoldJob) -> pd.DataFrame:
    """A finished fold's out-of-fold table."""
    return read_parquet(join(fold_dir(job), "oof.parquet"))
