"""One Ray Train worker: the fold driver (`spine_ray.engine.fold.fit_fold`) on a lane of folds.

The worker trains its lane's folds in turn on its streamed share of each (`StreamedBatches`),
validates after every epoch on rank 0 as the in-process driver does, reports metrics and a
checkpoint per epoch (tagged with its fold), and writes each fold's outputs on rank 0.
"""

from __future__ import annotations

import os
import tempfile
import time
from typing import Any

from spine_ray.engine.fold import finish_fold, fit_fold, validator
from spine_ray.engine.resources import ResourcesConfig
from spine_ray.engine.sample_cache import cache_input, count_samples, samples, split_studies
from spine_ray.engine.stage import FoldJob, Stage, fold_dir, is_done, job_key, steps_per_epoch
from spine_ray.engine.stream import StreamedBatches
from spine_ray.engine.tracking import write_epoch
from spine_ray.engine.train_loop import EpochResult, load_state, save_state


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: trains its lane's folds in turn, each with the fold driver on this worker's streamed share.

    Checkpoints (via ray.train.report) carry the fold they belong to: a restarted worker group, or
    a re-run of the same lane, skips the lane's finished folds and resumes the first unfinished one
    from its last checkpoint.
    """
    import ray.train
    import ray.train.torch

    stages: dict[str, Stage] = config["stages"]  # a lane may hold folds of several stages
    jobs: list[FoldJob] = config["jobs"]
    resources: ResourcesConfig = config["resources"]
    lane = {"trial_started": config.get("trial_started", time.time()), "worker_started": time.time()}
    resume = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = load_state(os.path.join(d, "state.pt"))
    for index, job in enumerate(jobs):
        if is_done(job):  # finished before this worker group (re)started
            continue
        owner = resume.get("job", job_key(jobs[0])) if resume is not None else None
        _train_job(stages[job.stage], job, index, resources, resume if owner == job_key(job) else None, {**lane, "job_started": time.time()})
        resume = None


def _train_job(stage: Stage, job: FoldJob, index: int, resources: ResourcesConfig, resume: dict[str, Any] | None, timeline: dict[str, float]) -> None:
    """Train one fold, the lane's `index`-th (resuming from `resume`, a checkpoint state of this fold) and, on rank 0, finish it."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    resumed_from = int(resume["epoch"]) if resume is not None else -1
    device = ray.train.torch.get_device()
    n_train = count_samples(job.inputs[cache_input("train")], split_studies(job, "train"))
    steps = steps_per_epoch(n_train, stage.train_config(job).batch_size, world)

    # epoch_s: this epoch's training (since the last report returned); report_s: how long the last
    # report took (writing the checkpoint, persisting it to storage, syncing with the controller).
    clock = {"mark": time.perf_counter(), "report_s": 0.0}

    def report(result: EpochResult) -> None:
        t = time.perf_counter()
        metrics = {**result.metrics, "resumed_from_epoch": resumed_from, "epoch_s": t - clock["mark"], "report_s": clock["report_s"], "lane_index": index}
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                save_state({**result.state, "job": job_key(job)}, os.path.join(d, "state.pt"))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d) if rank == 0 else None)
        if rank == 0:  # per-epoch metrics beside the fold's outputs, for `spine-ray report`
            write_epoch(fold_dir(job), metrics)
        clock["mark"] = time.perf_counter()
        clock["report_s"] = clock["mark"] - t

    pin = str(device).startswith("cuda")
    # Rank 0 validates after every epoch, as the in-process driver does (its held-out samples are
    # read once); it alone writes the fold's outputs, so the other ranks need no selection.
    val = samples(stage, job, "val") if rank == 0 else None
    timeline["training_started"] = time.time()
    model, metrics = fit_fold(
        stage, job, StreamedBatches(stage, job, resources, steps, rank, world, pin), n_train,
        device=device, world=world, prepare=ray.train.torch.prepare_model, resume=resume, on_epoch_end=report,
        validate=validator(stage, job, val) if val is not None else None,
    )
    timeline["training_finished"] = time.time()
    if val is not None:
        finish_fold(stage, job, model, val, metrics, resumed_from, timeline)
