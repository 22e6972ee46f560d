"""One Ray Train worker: the fold driver (`spine_ray.engine.fold.fit_fold`) on the jobs its slot takes from the board.

The worker asks the run's job board (`spine_ray.engine.board`) for its slot's next job, trains it
on its streamed share (`StreamedBatches`), validates after every epoch on rank 0 as the
in-process driver does, reports metrics per epoch, keeps the fold's resume state (`resume.pt` in
the fold's folder), and writes the fold's outputs on rank 0; then asks for the next. A job that
trains nothing (`stage.run`, e.g. a cross prediction) runs on rank 0 alone.
"""

from __future__ import annotations

import io
import time
from typing import Any

from spine_ray.core.storage import atomic_write_bytes, exists, join, read_bytes, remove
from spine_ray.engine.board import FINISHED, WAIT
from spine_ray.engine.fold import finish_fold, fit_fold, validator
from spine_ray.engine.resources import ResourcesConfig
from spine_ray.engine.sample_cache import cache_input, count_samples, samples, split_studies
from spine_ray.engine.stage import FoldJob, Stage, fold_dir, is_done, job_key, steps_per_epoch
from spine_ray.engine.stream import StreamedBatches
from spine_ray.engine.tracking import write_epoch
from spine_ray.engine.train_loop import EpochResult, load_state, save_state


def resume_url(job: FoldJob) -> str:
    """Where a fold keeps its last epoch's training state until it is done."""
    return join(fold_dir(job), "resume.pt")


def train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: trains the slot's jobs from the board in turn (`per_run` of them, 0: until none is left).

    Every rank asks the board for the slot's job by position, so all train the same one; a
    restarted worker group starts at the job the slot still holds and resumes it from its
    `resume.pt`, whichever slot trained it before.
    """
    import ray
    import ray.train
    import ray.train.torch

    stages: dict[str, Stage] = config["stages"]
    jobs: dict[str, FoldJob] = config["jobs"]
    board, slot, per_run = config["board"], config["slot"], int(config.get("per_run", 0))
    resources: ResourcesConfig = config["resources"]
    rank = ray.train.get_context().get_world_rank()
    lane = {"trial_started": config.get("trial_started", time.time()), "worker_started": time.time(), "slot": slot}
    start = ray.get(board.position.remote(slot))
    index = start
    while not per_run or index < start + per_run:
        key = next_job(board, slot, index, resources.poll_interval_s)
        if key == FINISHED:
            break
        job = jobs[key]
        stage = stages[job.stage]
        if not is_done(job):
            timeline = {**lane, "job_started": time.time()}
            if hasattr(stage, "run"):
                if rank == 0:
                    stage.run(job, ray.train.torch.get_device(), timeline)
            else:
                resume = load_state(io.BytesIO(read_bytes(resume_url(job))), resume_url(job)) if exists(resume_url(job)) else None
                _train_job(stage, job, index, resources, resume, timeline)
        if rank == 0:
            ray.get(board.finish.remote(key))
        index += 1


def next_job(board: Any, slot: str, index: int, poll_s: float) -> str:
    """The slot's `index`-th job once the board hands it out (or FINISHED), asking every `poll_s` seconds."""
    import ray

    while (key := ray.get(board.job_for.remote(slot, index))) == WAIT:
        time.sleep(poll_s)
    return key


def _train_job(stage: Stage, job: FoldJob, index: int, resources: ResourcesConfig, resume: dict[str, Any] | None, timeline: dict[str, Any]) -> None:
    """Train one fold, the slot's `index`-th job (resuming from `resume`, a state of this fold) and, on rank 0, finish it."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    resumed_from = int(resume["epoch"]) if resume is not None else -1
    device = ray.train.torch.get_device()
    n_train = count_samples(job.inputs[cache_input("train")], split_studies(job, "train"))
    steps = steps_per_epoch(n_train, stage.train_config(job).batch_size, world)

    # epoch_s: this epoch's training (since the last report returned); report_s: how long the last
    # report took (writing the resume state, syncing with the controller).
    clock = {"mark": time.perf_counter(), "report_s": 0.0}

    def report(result: EpochResult) -> None:
        t = time.perf_counter()
        metrics = {**result.metrics, "resumed_from_epoch": resumed_from, "epoch_s": t - clock["mark"], "report_s": clock["report_s"],
                   "lane_index": index, "job": job_key(job)}
        if rank == 0:
            buf = io.BytesIO()
            save_state({**result.state, "job": job_key(job)}, buf)
            atomic_write_bytes(resume_url(job), buf.getvalue())
        ray.train.report(metrics)
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
        validate=validator(stage, job, val) if val is not None else None, gpu_share=min(resources.gpus_per_worker, 1.0),
    )
    timeline["training_finished"] = time.time()
    if val is not None:
        finish_fold(stage, job, model, val, metrics, resumed_from, timeline)
        remove(resume_url(job))
