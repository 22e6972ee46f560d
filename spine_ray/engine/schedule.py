"""Ray at the edge of training: fold-parallel Ray Train runs, scheduled as Ray Tune trials.

Before any fold trains, each distinct sample set of the stage is built once into a Parquet cache
(`spine_ray.engine.sample_cache`) that every fold reads by filter. The folds of a stage are then
dealt into lanes, one per slot the cluster can run at once (one fold per lane when all fit, as on a
GPU cluster that scales up), and every lane is submitted at once as a Tune trial; each trial
launches a `TorchTrainer` whose workers (`spine_ray.engine.worker`) run the fold driver on each of
the lane's folds in turn, so Ray's start-up is paid once per slot, not once per fold. A fold that
`needs` others (the axial localiser's fold k reads sagittal T2 fold k's points) goes into their
lane, after them; with one trial per fold it starts in a later Tune run, once they are done.

Ray shares out the cluster's GPUs (or CPUs): lanes that do not fit queue. Each lane's checkpoints
live under `{run_dir}/ray/train/{stage}-{member}-fold{k}[+n]` (its first fold's name, `+n` for the
n folds after it) and name the fold they belong to; re-running the same command skips finished
folds (their `done` marker exists) and resumes unfinished ones from their last checkpoint.
A worker that dies is restarted from the last checkpoint (`FailureConfig`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import pandas as pd

from spine_ray.core.config import to_dict
from spine_ray.core.raycluster import init_ray
from spine_ray.core.storage import join
from spine_ray.engine.fold import read_oof
from spine_ray.engine.resources import ResourcesConfig
from spine_ray.engine.sample_cache import with_caches
from spine_ray.engine.stage import FoldJob, Stage, is_done, job_key
from spine_ray.engine.tracking import tune_callbacks
from spine_ray.engine.worker import train_worker

log = logging.getLogger(__name__)


def lanes(jobs: list[FoldJob], slots: int) -> list[list[FoldJob]]:
    """Jobs dealt round-robin into `slots` lanes (one lane per job when they all fit).

    A job that `needs` others goes into its first need's lane, after it (so it never waits on
    another lane); the others are dealt round-robin. Deal every job of the stage, finished or not,
    so that a re-run on the same cluster puts each unfinished fold in the lane (and so the Ray
    Train run, whose checkpoints it resumes) it had.
    """
    slots = slots if slots >= 1 else len(jobs)
    keys = [job_key(j) for j in jobs]
    position = {k: i for i, k in enumerate(keys)}
    listed = {k: [n for n in j.needs if n in position] for k, j in zip(keys, jobs, strict=True)}  # needs outside the list are done
    free = [k for k in keys if not listed[k]]
    lane_of = {k: i % slots for i, k in enumerate(free)}
    for k in keys:
        for n in listed[k]:
            if position[n] > position[k]:
                raise ValueError(f"{k} needs {n}, which comes after it")
            lane_of.setdefault(k, lane_of[n])
            if lane_of[n] != lane_of[k]:  # it would wait on another lane
                raise ValueError(f"{k} needs {n}, which is dealt into another lane than {listed[k][0]}")
    dealt = [[j for k, j in zip(keys, jobs, strict=True) if lane_of[k] == i] for i in range(slots)]
    return [lane for lane in dealt if lane]


def lane_key(lane: list[FoldJob]) -> str:
    """A lane's name in progress tables and storage: its first fold's, `+N` for the N folds after it."""
    return job_key(lane[0]) + (f"+{len(lane) - 1}" if len(lane) > 1 else "")


def _fold_trial(config: dict[str, Any], stages: Mapping[str, Stage], lanes: dict[str, list[FoldJob]], resources: ResourcesConfig, storage: str) -> None:
    """One Tune trial: train one lane of folds with a TorchTrainer and relay its metrics to Tune."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    lane = lanes[config["fold"]]
    # Ray Train propagates this variable from here to the controller it starts.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(resources.poll_interval_s))
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"stages": {j.stage: stages[j.stage] for j in lane}, "jobs": lane, "resources": resources, "trial_started": time.time()},
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=resources.use_gpu,
            resources_per_worker=resources.worker_resources(),
        ),
        run_config=ray.train.RunConfig(
            name=f"{lane[0].stage}-{config['fold']}",
            storage_path=storage_root(storage),
            storage_filesystem=pyarrow_fs(storage),
            failure_config=ray.train.FailureConfig(max_failures=resources.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


def pyarrow_fs(url: str):
    """A pyarrow filesystem for a storage URL (fsspec-backed, so s3:// honours AWS_ENDPOINT_URL)."""
    import pyarrow.fs as pafs

    from spine_ray.core.storage import fs_for, is_local

    if is_local(url):
        return None
    fs, _ = fs_for(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def storage_root(url: str) -> str:
    """A storage URL as Ray Train/Tune's storage_path wants it (absolute local path, or bucket/key)."""
    from spine_ray.core.storage import fs_for, is_local

    if is_local(url):
        return os.path.abspath(url)
    return fs_for(url)[1]


def concurrent_folds(resources: ResourcesConfig, pending: int) -> int:
    """How many folds to start at once when the config says "all": as many as the cluster can run now.

    A started fold holds a Tune trial and a Ray Train controller (about 1 GB of host memory each)
    even while it waits for a GPU or CPU, so on a fixed machine the rest wait as trials instead. A
    cluster that has no GPU yet (an autoscaler adds them on demand) gets every fold at once.
    """
    import ray

    have = ray.cluster_resources()
    if resources.use_gpu:
        fit = int(have.get("GPU", 0) // (resources.num_workers * resources.gpus_per_worker))
    else:
        fit = int(have.get("CPU", 0) // (resources.num_workers * resources.cpus_per_worker))
    return min(pending, fit) if fit >= 1 else pending


def run_folds(stages: Stage | Mapping[str, Stage], jobs: list[FoldJob], resources: ResourcesConfig, samples_dir: str | None = None) -> list[pd.DataFrame]:
    """Train every unfinished fold, lanes of them in parallel (a Tune trial per lane); return all folds' OOF tables.

    `stages` is the jobs' one stage, or a table of stages by name (`job.stage`) for jobs of
    several stages. Jobs may belong to several members and stages: they share one Tune run, so
    every model is trained at once and the cluster's resources are shared out between them. Their
    samples are built first, once per distinct sample key, under `samples_dir` (default
    `{run_dir}/samples`). A job that `needs` others of the list starts after them: in their lane
    when folds are packed, in a later Tune run when each fold has its own trial.
    """
    by_name = stages if isinstance(stages, Mapping) else {j.stage: stages for j in jobs}
    what = "/".join(dict.fromkeys(j.stage for j in jobs))
    pending = [j for j in jobs if not is_done(j)]
    for j in jobs:
        if j not in pending:
            log.info("%s/%s fold %d already done: skipped", j.stage, j.member, j.fold)
    keys = {job_key(j) for j in jobs}
    for j in jobs:
        unknown = [n for n in j.needs if n not in keys]
        if unknown:
            raise ValueError(f"{job_key(j)} needs {unknown}, which are not jobs of this run")
    if pending:
        init_ray()
        limit = resources.max_concurrent_folds or concurrent_folds(resources, len(jobs))
        root = samples_dir or join(pending[0].run_dir, "samples")
        ready = {job_key(j): j for name in dict.fromkeys(j.stage for j in pending)
                 for j in with_caches(by_name[name], [p for p in pending if p.stage == name], root)}
        if resources.packs():
            # One Tune run: every job of the stage dealt into lanes (a re-run deals them alike), a job
            # after the folds it needs in the same lane; finished ones drop out.
            _run_lanes(by_name, jobs, ready, resources, limit, limit)
        else:
            # One trial per fold: a fold that needs others starts in a later Tune run, once they are done.
            done = {job_key(j) for j in jobs if job_key(j) not in ready}
            while waiting := [j for j in jobs if job_key(j) not in done]:
                now = [j for j in waiting if done.issuperset(j.needs)]
                if not now:
                    raise RuntimeError(f"{job_key(waiting[0])} needs folds that did not finish: {list(waiting[0].needs)}")
                _run_lanes(by_name, now, ready, resources, len(now), limit)
                finished = {job_key(j) for j in now if is_done(j)}
                if not finished:
                    break  # finished without their outputs: reported below
                done |= finished
    missing = [job_key(j) for j in jobs if not is_done(j)]
    if missing:
        raise RuntimeError(f"folds {missing} of {what} finished without their outputs")
    return [read_oof(j) for j in jobs]


def _run_lanes(stages: Mapping[str, Stage], jobs: list[FoldJob], ready: dict[str, FoldJob], resources: ResourcesConfig, slots: int, limit: int) -> None:
    """One Tune run: `jobs` dealt into `slots` lanes, each a trial of its `ready` jobs (unfinished, caches named), `limit` at once."""
    from ray import tune

    todo = {lane_key(lane): [ready[job_key(j)] for j in lane if job_key(j) in ready] for lane in lanes(jobs, slots)}
    todo = {k: v for k, v in todo.items() if v}
    pending = [j for lane in todo.values() for j in lane]
    # Logged to MLflow, one run per fold: its name and config (a lane's results say which of its folds).
    configs = {job_key(j): to_dict(j.config) if dataclasses.is_dataclass(j.config) else {} for j in pending}

    def fold_of(config: dict[str, Any], result: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        key = job_key(todo[config["fold"]][int(result.get("lane_index", 0))])
        return key, configs[key]

    first = pending[0]
    storage = join(first.run_dir, "ray")
    trainable = tune.with_parameters(_fold_trial, stages=stages, lanes=todo, resources=resources, storage=join(storage, "train"))
    what = "-".join(dict.fromkeys(j.stage for j in pending))
    tuner = tune.Tuner(
        # The trial only waits on its TorchTrainer, whose workers hold the CPUs/GPUs, so it
        # asks for no CPU (a head bundle must ask for something: a token of memory).
        tune.with_resources(trainable, {"cpu": 0, "memory": 64 * 2**20}),
        param_space={"fold": tune.grid_search(list(todo))},
        tune_config=tune.TuneConfig(max_concurrent_trials=min(len(todo), limit)),
        run_config=tune.RunConfig(
            name=f"{what}-{'-'.join(sorted({j.member for j in pending}))}",
            storage_path=storage_root(join(storage, "tune")),
            storage_filesystem=pyarrow_fs(storage),
            verbose=1,
            callbacks=tune_callbacks(first.run_dir, f"train-{what}", fold_of),
        ),
    )
    grid = tuner.fit()
    failed = [r for r in grid if r.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} fold(s) of {what} failed: {failed[0].error}")
