"""Ray at the edge of training: fold-parallel Ray Train runs, scheduled as one Ray Tune trial per fold.

All K folds of a stage are submitted at once; each trial launches a `TorchTrainer` whose workers
run the plain loop (`spine_ray.train_loop.fit`) on Ray Data shards. Ray shares out the cluster's
GPUs (or CPUs): folds that do not fit queue. Each fold's checkpoints live under
`{run_dir}/ray/train/{stage}-{member}-fold{k}`; re-running the same command skips finished folds
(their `done` marker exists) and resumes unfinished ones from their last checkpoint (Ray Train v2
restores a run from its storage path and name). A worker that dies is restarted from the last
checkpoint (`FailureConfig`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import pandas as pd

from spine_ray.stage import FoldJob, Stage, epoch_rng, new_model, source_rows, split_studies
from spine_ray.storage import (
    atomic_write_bytes,
    atomic_write_parquet,
    atomic_write_text,
    exists,
    join,
    read_parquet,
    read_text,
)
from spine_ray.tracking import tune_callbacks, write_epoch
from spine_ray.train_loop import EpochResult, fit, load_state, save_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResourcesConfig:
    """How each fold is scaled and how many run at once."""

    num_workers: int = 1  # data-parallel workers per fold
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # worker restarts per fold, each from the last checkpoint
    max_concurrent_folds: int = 0  # 0: all folds at once (Ray queues what does not fit)
    # How often Ray Train's controller collects worker reports (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S,
    # Ray's default 2 s). A worker's report blocks until the previous one is collected, so epochs
    # shorter than this are throttled to it; an explicit environment variable wins.
    poll_interval_s: float = 0.5

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.cpus_per_worker <= 0:
            raise ValueError("num_workers must be ≥ 1 and cpus_per_worker > 0")
        if self.poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be > 0")


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster in RAY_ADDRESS, or start a local one (no dashboard, quiet)."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)


def fold_dir(job: FoldJob) -> str:
    """Where a fold's final model, out-of-fold table and done marker go."""
    return join(job.run_dir, job.stage, job.member, f"fold{job.fold}")


def is_done(job: FoldJob) -> bool:
    """A fold is done when its marker exists (written after its model and OOF table)."""
    return exists(join(fold_dir(job), "done.json"))


def _ray_dataset(stage: Stage, job: FoldJob, split: str):
    """The split's samples as a materialised Ray Dataset.

    The dataset is made over study ids, and each map task reads the source rows of its own
    studies (a filtered Parquet read, no shuffle): a sample may need every stack of a study
    (an axial slab, the five views of a level), so a study's rows never straddle two batches.
    """
    import ray

    # Blocks in study order, whichever map task finishes first: with the seeded local shuffle,
    # a fold sees the same samples in the same order on every run (the train ingest inherits this).
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    studies = split_studies(job, split)
    ds = ray.data.from_items([{"study_id": s} for s in studies], override_num_blocks=max(1, min(len(studies), 64)))
    ds = ds.map_batches(_ToSamples(stage, job, split), batch_format="pandas", batch_size=4)
    # Materialise so that training workers, which hold every CPU, never wait on preprocessing.
    return ds.materialize()


class _ToSamples:
    """A picklable map function: a batch of study ids → those studies' samples."""

    def __init__(self, stage: Stage, job: FoldJob, split: str) -> None:
        self.stage, self.job, self.split = stage, job, split

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return self.stage.to_samples(self.job, self.split, source_rows(self.stage, self.job, batch["study_id"].astype(int).tolist()))


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: the plain loop on this worker's shard, checkpoints via ray.train.report."""
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    stage: Stage = config["stage"]
    job: FoldJob = config["job"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    cfg = stage.train_config(job)
    model = new_model(stage, job)
    resume, resumed_from = None, -1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            resume = load_state(os.path.join(d, "state.pt"))
        resumed_from = int(resume["epoch"])
    device = ray.train.torch.get_device()
    model = ray.train.torch.prepare_model(model)
    shard = ray.train.get_dataset_shard("train")
    steps = max(1, -(-config["n_train"] // (cfg.batch_size * world)))

    def batches(epoch: int):
        rng = epoch_rng(cfg.seed, job.fold, epoch, rank)
        for rows in shard.iter_batches(
            batch_size=cfg.batch_size, batch_format="numpy", local_shuffle_buffer_size=4 * cfg.batch_size, local_shuffle_seed=int(rng.integers(2**31))
        ):
            yield stage.collate(job, rows, rng, True)

    # epoch_s: this epoch's training (since the last report returned); report_s: how long the last
    # report took (writing the checkpoint, persisting it to storage, syncing with the controller).
    clock = {"mark": time.perf_counter(), "report_s": 0.0}

    def report(result: EpochResult) -> None:
        t = time.perf_counter()
        metrics = {**result.metrics, "resumed_from_epoch": resumed_from, "epoch_s": t - clock["mark"], "report_s": clock["report_s"]}
        with tempfile.TemporaryDirectory() as d:
            if rank == 0:
                save_state(result.state, os.path.join(d, "state.pt"))
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d) if rank == 0 else None)
        if rank == 0:  # per-epoch metrics beside the fold's outputs, for `spine-ray report`
            write_epoch(fold_dir(job), metrics)
        clock["mark"] = time.perf_counter()
        clock["report_s"] = clock["mark"] - t

    fit(model, lambda m, b: stage.loss(job, m, b), batches, steps, cfg, resume=resume, device=device, on_epoch_end=report)
    if rank == 0:
        raw = getattr(model, "module", model)
        raw.eval()
        from spine_ray.stage import samples

        finish_fold(stage, job, raw, samples(stage, job, "val"), resumed_from)


def finish_fold(stage: Stage, job: FoldJob, model: Any, val: pd.DataFrame, resumed_from: int = -1) -> pd.DataFrame:
    """Predict the held-out split, write the final weights and OOF table, then the done marker."""
    import torch

    oof = stage.predict(job, model, val)
    out = fold_dir(job)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "config": job.config}, buf)
    atomic_write_bytes(join(out, "model.pt"), buf.getvalue())
    atomic_write_parquet(join(out, "oof.parquet"), oof)
    atomic_write_text(join(out, "done.json"), json.dumps({"fold": job.fold, "rows": len(oof), "resumed_from_epoch": resumed_from, "finished": time.time()}))
    return oof


def job_key(job: FoldJob) -> str:
    """A fold's name in progress tables and storage: `{member}-fold{k}`."""
    return f"{job.member}-fold{job.fold}"


def _fold_trial(config: dict[str, Any], stage: Stage, jobs: dict[str, FoldJob], resources: ResourcesConfig, storage: str) -> None:
    """One Tune trial: train one fold with a TorchTrainer and relay its metrics to Tune."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    job = jobs[config["fold"]]
    # Ray Train propagates this variable from here to the controller it starts.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(resources.poll_interval_s))
    train = _ray_dataset(stage, job, "train")
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"stage": stage, "job": job, "n_train": train.count()},
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=resources.use_gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker, **({"GPU": 1} if resources.use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=f"{job.stage}-{job_key(job)}",
            storage_path=_storage_root(storage),
            storage_filesystem=_pyarrow_fs(storage),
            failure_config=ray.train.FailureConfig(max_failures=resources.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
        ),
        datasets={"train": train},
    )
    trainer.fit()


def _pyarrow_fs(url: str):
    """A pyarrow filesystem for a storage URL (fsspec-backed, so s3:// honours AWS_ENDPOINT_URL)."""
    import pyarrow.fs as pafs

    from spine_ray.storage import fs_for, is_local

    if is_local(url):
        return None
    fs, _ = fs_for(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def _storage_root(url: str) -> str:
    from spine_ray.storage import fs_for, is_local

    if is_local(url):
        return os.path.abspath(url)
    return fs_for(url)[1]


def run_folds(stage: Stage, jobs: list[FoldJob], resources: ResourcesConfig) -> list[pd.DataFrame]:
    """Train every unfinished fold in parallel (Tune trial per fold); return all folds' OOF tables.

    Jobs may belong to several members of one stage: they share one Tune run, so every model of
    the stage is trained at once and the cluster's resources are shared out between them.
    """
    from ray import tune

    pending = [j for j in jobs if not is_done(j)]
    for j in jobs:
        if j not in pending:
            log.info("%s/%s fold %d already done: skipped", j.stage, j.member, j.fold)
    if pending:
        init_ray()
        first = pending[0]
        storage = join(first.run_dir, "ray")
        trainable = tune.with_parameters(
            _fold_trial,
            stage=stage,
            jobs={job_key(j): j for j in pending},
            resources=resources,
            storage=join(storage, "train"),
        )
        tuner = tune.Tuner(
            # The trial only waits on its TorchTrainer, whose workers hold the CPUs/GPUs, so it
            # asks for no CPU (a head bundle must ask for something: a token of memory).
            tune.with_resources(trainable, {"cpu": 0, "memory": 64 * 2**20}),
            param_space={"fold": tune.grid_search([job_key(j) for j in pending])},
            tune_config=tune.TuneConfig(max_concurrent_trials=resources.max_concurrent_folds or len(pending)),
            run_config=tune.RunConfig(
                name=f"{first.stage}-{'-'.join(sorted({j.member for j in pending}))}",
                storage_path=_storage_root(join(storage, "tune")),
                storage_filesystem=_pyarrow_fs(storage),
                verbose=1,
                callbacks=tune_callbacks(first.run_dir, f"train-{first.stage}", lambda c: {job_key(j): j.config for j in pending}[c["fold"]]),
            ),
        )
        grid = tuner.fit()
        failed = [r for r in grid if r.error is not None]
        if failed:
            raise RuntimeError(f"{len(failed)} fold(s) of stage {first.stage} failed: {failed[0].error}")
    missing = [job_key(j) for j in jobs if not is_done(j)]
    if missing:
        raise RuntimeError(f"folds {missing} of stage {jobs[0].stage} finished without their outputs")
    return [read_oof(j) for j in jobs]


def read_oof(job: FoldJob) -> pd.DataFrame:
    """A finished fold's out-of-fold table."""
    return read_parquet(join(fold_dir(job), "oof.parquet"))


def read_done(job: FoldJob) -> dict[str, Any]:
    """A finished fold's done marker."""
    return json.loads(read_text(join(fold_dir(job), "done.json")))


__all__ = ["ResourcesConfig", "run_folds", "init_ray", "finish_fold", "is_done", "read_oof", "read_done"]
