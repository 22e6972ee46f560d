"""Ray at the edge of training: every fold job of a run, of every stage, in one Ray Tune run.

A run's jobs form a graph: a job `needs` the jobs whose outputs it reads (the axial localiser's
fold k reads sagittal T2 fold k's points; grade fold k validates on stage-1 fold k's points; a
cross prediction needs its grader fold). Before any job starts, each distinct sample set that does
not wait on another job is built once into a Parquet cache (`spine_ray.engine.sample_cache`).
Then one Tune run starts a trial per slot, one per fold job the cluster can run at once (a GPU's
worth of Ray Train workers, or a CPU lane). The slots share a job board (`spine_ray.engine.board`,
a Ray actor): each slot takes the ready job (its needs done) of longest critical path
(`spine_ray.engine.plan`), so no slot waits at a stage barrier while any job could run, and the
jobs that hold the end of the run back start first. A trial waits for its first job without
holding any CPU or GPU, then starts a `TorchTrainer` whose workers train the slot's jobs in turn
(`resources.pack_folds` on: Ray's start-up paid once per slot) or just that one (off: one Ray
Train run per job, so an autoscaler may hand the GPU back between jobs).

Re-running the same command skips finished jobs (their `done` marker exists) and resumes
unfinished ones from their last epoch (`resume.pt` in the fold's folder, whichever slot takes
it). A worker that dies is restarted from there (`FailureConfig`); a job that fails for good
fails alone: the jobs that need it are skipped, every other job runs, and the run then raises
one error naming them.
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
from spine_ray.core.storage import fs_for, is_local, join
from spine_ray.engine.board import FINISHED, Board
from spine_ray.engine.fold import read_oof
from spine_ray.engine.plan import PlanJob, priority_order
from spine_ray.engine.resources import ResourcesConfig
from spine_ray.engine.sample_cache import (
    cache_input,
    count_samples,
    read_manifest,
    split_studies,
    with_caches,
)
from spine_ray.engine.stage import FoldJob, Stage, fold_epochs, is_done, job_key
from spine_ray.engine.timelines import measured_hours
from spine_ray.engine.tracking import tune_callbacks
from spine_ray.engine.worker import next_job, train_worker

log = logging.getLogger(__name__)


def job_cost(stage: Stage, job: FoldJob) -> float:
    """A trained job's estimated work, for the schedule's priorities: a proxy in its own units (only the order matters).

    Each epoch passes over the training samples and validates on the held-out ones (a forward
    pass, about a third of a training step), and a sample's compute grows with its size: epochs ×
    (train + val / 3) samples × stored bytes per sample (from the job's sample cache when it has
    one, else 1).
    """
    url = job.inputs.get(cache_input("train"))
    per_sample = _bytes_per_sample(url) if url else 1.0
    return float(fold_epochs(stage, job) * sum(_passes(job, url)) * per_sample)


def _passes(job: FoldJob, url: str | None) -> tuple[float, float]:
    """(training samples, held-out samples / 3) of one epoch of a job."""
    studies = split_studies(job, "train")
    train = count_samples(url, studies) if url else len(studies)
    return float(train), len(split_studies(job, "val")) * max(train, 1) / max(len(studies), 1) / 3


def _bytes_per_sample(url: str) -> float:
    """Stored bytes per sample of a finished sample cache (its parts' sizes over its sample count)."""
    manifest = read_manifest(url)
    fs, root = fs_for(url)
    size = sum(fs.size(f"{root.rstrip('/')}/{p['file']}") for p in manifest["parts"])
    return size / max(int(manifest["samples"]), 1)


def job_graph(stages: Mapping[str, Stage], jobs: list[FoldJob], plan_from: str | None = None) -> list[PlanJob]:
    """The jobs as a plan graph (key, stage, cost, needs) for `spine_ray.engine.plan`.

    Costs are `job_cost` proxies (a job that trains nothing: one held-out pass of the first job it
    needs); with `plan_from` (a finished run of the same members), each
    member's measured mean fold time (`spine_ray.engine.timelines.measured_hours`), and for members
    that run lacks, the proxy scaled by measured / proxy over the members it has.
    """
    by_key = {job_key(j): j for j in jobs}
    cost: dict[str, float] = {}
    for j in sorted(jobs, key=lambda j: hasattr(stages[j.stage], "run")):
        if not hasattr(stages[j.stage], "run"):
            cost[job_key(j)] = job_cost(stages[j.stage], j)
        else:  # a prediction (cross) job: one held-out pass of the trained job it needs first
            first = by_key[j.needs[0]]
            train, val = _passes(first, first.inputs.get(cache_input("train")))
            cost[job_key(j)] = cost[j.needs[0]] * val / (fold_epochs(stages[first.stage], first) * (train + val))
    if plan_from:
        measured = measured_hours(plan_from)
        known = [j for j in jobs if (j.stage, j.member) in measured]
        scale = sum(measured[(j.stage, j.member)] for j in known) / max(sum(cost[job_key(j)] for j in known), 1e-12) if known else 1.0
        cost = {job_key(j): measured.get((j.stage, j.member), scale * cost[job_key(j)]) for j in jobs}
        log.info("priorities from %s: %d of %d jobs measured", plan_from, len(known), len(jobs))
    return [PlanJob(job_key(j), j.stage, cost[job_key(j)], tuple(j.needs)) for j in jobs]


def _slot_trial(config: dict[str, Any], stages: Mapping[str, Stage], jobs: dict[str, FoldJob], board: Any, resources: ResourcesConfig, storage: str) -> None:
    """One Tune trial, one slot: wait for a job, train the slot's jobs with a TorchTrainer, until the board has none left.

    The trial holds no CPU or GPU while it waits; its TorchTrainer's workers do while they train.
    A Ray Train run that gives up (its worker restarts spent) fails its job alone: the slot
    reports it to the board and goes on with the next.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    slot = config["slot"]
    per_run = 0 if resources.packs() else 1
    # Ray Train propagates this variable from here to the controller it starts.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(resources.poll_interval_s))
    trial_started = time.time()
    while (first := next_job(board, slot, ray.get(board.position.remote(slot)), resources.poll_interval_s)) != FINISHED:
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={"stages": stages, "jobs": jobs, "board": board, "slot": slot, "per_run": per_run,
                               "resources": resources, "trial_started": trial_started},
            scaling_config=ray.train.ScalingConfig(
                num_workers=resources.num_workers,
                use_gpu=resources.use_gpu,
                resources_per_worker=resources.worker_resources(),
            ),
            run_config=ray.train.RunConfig(
                name=f"{slot}-{first}",
                storage_path=storage_root(storage),
                storage_filesystem=pyarrow_fs(storage),
                failure_config=ray.train.FailureConfig(max_failures=resources.max_failures),
                callbacks=[TuneReportCallback()],
            ),
        )
        try:
            trainer.fit()
        except Exception as e:  # noqa: BLE001 - the job fails alone; the run reports it at the end
            key = ray.get(board.current.remote(slot))
            if key is None:
                raise
            line = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            log.error("%s failed on %s: %s", key, slot, line)
            ray.get(board.fail.remote(key, line))


def pyarrow_fs(url: str):
    """A pyarrow filesystem for a storage URL (fsspec-backed, so s3:// honours AWS_ENDPOINT_URL)."""
    import pyarrow.fs as pafs

    if is_local(url):
        return None
    fs, _ = fs_for(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def storage_root(url: str) -> str:
    """A storage URL as Ray Train/Tune's storage_path wants it (absolute local path, or bucket/key)."""
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
    """Train every unfinished job of the graph in one Tune run (a trial per slot); return all jobs' OOF tables.

    `stages` is the jobs' one stage, or a table of stages by name (`job.stage`). Every job whose
    needs are done is ready; free slots take ready jobs longest critical path first. Samples that
    wait on no other job are built first, once per distinct sample key, under `samples_dir`
    (default `{run_dir}/samples`); a job's held-out samples that read its needs' outputs are built
    by the job. Jobs that fail, and the jobs that need them, are named in one RuntimeError after
    every other job has run.
    """
    by_name = stages if isinstance(stages, Mapping) else {j.stage: stages for j in jobs}
    what = "/".join(dict.fromkeys(j.stage for j in jobs))
    keys = {job_key(j) for j in jobs}
    for j in jobs:
        unknown = [n for n in j.needs if n not in keys]
        if unknown:
            raise ValueError(f"{job_key(j)} needs {unknown}, which are not jobs of this run")
    pending = [j for j in jobs if not is_done(j)]
    for j in jobs:
        if j not in pending:
            log.info("%s/%s fold %d already done: skipped", j.stage, j.member, j.fold)
    if pending:
        init_ray()
        root = samples_dir or join(pending[0].run_dir, "samples")
        ready: dict[str, FoldJob] = {}
        for name in dict.fromkeys(j.stage for j in pending):
            mine = [j for j in pending if j.stage == name]
            # A job that trains nothing (`run`) reads no training samples: no caches to build for it.
            ready |= {job_key(j): j for j in (mine if hasattr(by_name[name], "run") else with_caches(by_name[name], mine, root))}
        graph = job_graph(by_name, [ready.get(job_key(j), j) for j in jobs], resources.plan_from)
        slots = resources.max_concurrent_folds or concurrent_folds(resources, len(pending))
        outcome = _run_board(by_name, ready, graph, resources, min(slots, len(pending)))
        if outcome["failed"] or outcome["skipped"]:
            failed, skipped = outcome["failed"], outcome["skipped"]
            first = next(iter(failed.items()), None)
            raise RuntimeError(
                f"{len(failed)} fold job(s) of {what} failed ({', '.join(failed)}"
                + (f"; first error: {first[1]}" if first else "") + ")"
                + (f"; {len(skipped)} skipped because they need one: {', '.join(skipped)}" if skipped else "")
            )
    missing = [job_key(j) for j in jobs if not is_done(j)]
    if missing:
        raise RuntimeError(f"folds {missing} of {what} finished without their outputs")
    return [read_oof(j) for j in jobs]


def _run_board(stages: Mapping[str, Stage], ready: dict[str, FoldJob], graph: list[PlanJob], resources: ResourcesConfig, slots: int) -> dict[str, Any]:
    """One Tune run of `slots` trials sharing a job board over the graph; returns the board's outcome."""
    import ray
    from ray import tune

    order = priority_order(graph)
    board = ray.remote(Board).options(num_cpus=0).remote(order, {p.key: p.needs for p in graph}, {p.key for p in graph if p.key not in ready})
    # Logged to MLflow, one run per fold: its name and config (every result says which job it is of).
    configs = {k: to_dict(j.config) if dataclasses.is_dataclass(j.config) else {} for k, j in ready.items()}

    def fold_of(config: dict[str, Any], result: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        key = str(result.get("job", config["slot"]))
        return key, configs.get(key, {})

    first = next(iter(ready.values()))
    storage = join(first.run_dir, "ray")
    trainable = tune.with_parameters(_slot_trial, stages=stages, jobs=ready, board=board, resources=resources, storage=join(storage, "train"))
    what = "-".join(dict.fromkeys(j.stage for j in ready.values()))
    names = [f"slot{i}" for i in range(slots)]
    log.info("%d job(s) on %d slot(s), first by priority: %s", len(ready), slots, ", ".join(k for k in order if k in ready)[:200])
    tuner = tune.Tuner(
        # The trial waits on the board and on its TorchTrainer, whose workers hold the CPUs/GPUs,
        # so it asks for no CPU (a head bundle must ask for something: a token of memory).
        tune.with_resources(trainable, {"cpu": 0, "memory": 64 * 2**20}),
        param_space={"slot": tune.grid_search(names)},
        tune_config=tune.TuneConfig(max_concurrent_trials=slots),
        run_config=tune.RunConfig(
            name=f"{what}-{len(ready)}jobs",
            storage_path=storage_root(join(storage, "tune")),
            storage_filesystem=pyarrow_fs(storage),
            verbose=1,
            callbacks=tune_callbacks(first.run_dir, "train", fold_of),
        ),
    )
    grid = tuner.fit()
    outcome = ray.get(board.outcome.remote())
    broken = [r for r in grid if r.error is not None]
    if broken and not outcome["failed"]:
        raise RuntimeError(f"{len(broken)} slot(s) of {what} failed: {broken[0].error}")
    return outcome
