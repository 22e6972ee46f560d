"""Ray at the edge of training: fold-parallel Ray Train runs, scheduled as Ray Tune trials.

Before any fold trains, each distinct sample set of the stage is built once into a Parquet cache
(`spine_ray.sample_cache`) that every fold reads by filter. The folds of a stage are then dealt
into lanes, one per slot the cluster can run at once (one fold per lane when all fit, as on a GPU
cluster that scales up), and every lane is submitted at once as a Tune trial; each trial launches a
`TorchTrainer` whose workers run the one fold driver (`spine_ray.fold.fit_fold`) on each of the
lane's folds in turn, so Ray's start-up is paid once per slot, not once per fold. A fold that
`needs` others (the axial localiser's fold k reads sagittal T2 fold k's points) goes into their
lane, after them; with one trial per fold it starts in a later Tune run, once they are done.
A worker's batches stream from a per-epoch pipeline: its share of
the fold's training studies, in an order fixed by the seed and epoch, read from the cache in parts
that are re-cropped and augmented (seeded per part) while the trainer steps, then mixed in a
shuffle buffer. On a GPU cluster the parts run as Ray Data CPU tasks and the object store holds
that streaming window, never a fold's whole training set; on a CPU-only box, where every CPU is a
trainer, the same parts run on a background thread of the worker (`ResourcesConfig.input_pipeline`).

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
import queue
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from spine_ray.config import to_dict
from spine_ray.fold import finish_fold, fit_fold, read_oof, validator
from spine_ray.raycluster import init_ray
from spine_ray.sample_cache import (
    cache_input,
    chunks,
    count_samples,
    read_cache,
    read_manifest,
    samples,
    split_studies,
    with_caches,
)
from spine_ray.stage import (
    FoldJob,
    Stage,
    columns,
    epoch_rng,
    fold_dir,
    fold_epochs,
    is_done,
    job_key,
    steps_per_epoch,
)
from spine_ray.storage import join
from spine_ray.tracking import tune_callbacks, write_epoch
from spine_ray.train_loop import EpochResult, load_state, save_state

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResourcesConfig:
    """How each fold is scaled and how many run at once."""

    num_workers: int = 1  # data-parallel workers per fold
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 2  # worker restarts per Ray Train run (a fold, or a lane of folds), each from the last checkpoint
    max_concurrent_folds: int = 0  # 0: as many as the cluster can run now (every fold, on a GPU cluster still scaling up)
    # "on": when folds outnumber the slots that can run now, each slot trains its share of them one
    # after another in one Ray Train run (a lane), so it pays Ray's start-up (a Tune trial, a
    # controller and worker processes that import torch: 7–25 s a fold on a 2-core box) once per
    # stage instead of once per fold. "off": one trial per fold; queued folds wait for a free slot,
    # or for the GPUs an autoscaler adds for them. "auto": on for CPU folds (short: start-up is a
    # large share), off with GPUs (hours a fold, and the cluster may grow).
    pack_folds: str = "auto"
    # How often Ray Train's controller collects worker reports (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S,
    # Ray's default 2 s). A worker's report blocks until the previous one is collected, so epochs
    # shorter than this are throttled to it; an explicit environment variable wins.
    poll_interval_s: float = 0.5
    # The input pipeline of each training worker: Ray Data tasks that read cached samples and
    # augment them. data_cpus is the CPU each task asks for; 0 lets them share the CPUs the
    # training workers hold (a laptop or CI box, where every CPU is a trainer). On a GPU node give
    # them real CPUs: data_concurrency tasks per worker, each data_cpus.
    data_cpus: float = 0.0
    data_concurrency: int = 1
    # Where augmentation runs: "ray" (Ray Data tasks, the GPU cluster's path), "thread" (a
    # background thread of the training worker, for CPU-only boxes where every CPU is a trainer
    # and worker processes would only add start-up and copies), "auto" (thread when data_cpus is 0
    # and there is no GPU, else ray). Both augment the same parts with the same generators.
    input_pipeline: str = "auto"
    chunk_studies: int = 4  # studies per augmentation task
    prefetch_batches: int = 4  # augmented parts ready ahead of the trainer
    # Shuffle buffer of augmented samples, in MB (at least two batches): samples of one part share
    # a few studies, so batches drawn from a small buffer hold several levels of the same study.
    # A whole epoch when it fits (the CPU demo); on real data a few hundred samples.
    shuffle_mb: float = 512.0
    stream_window_mb: int = 256  # object-store budget of one worker's stream (Ray Data backpressures beyond it)

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.cpus_per_worker <= 0:
            raise ValueError("num_workers must be ≥ 1 and cpus_per_worker > 0")
        if self.poll_interval_s <= 0:
            raise ValueError("poll_interval_s must be > 0")
        if self.data_cpus < 0 or self.data_concurrency < 1 or self.chunk_studies < 1 or self.prefetch_batches < 1 or self.shuffle_mb < 0:
            raise ValueError("data_cpus must be ≥ 0; data_concurrency, chunk_studies and prefetch_batches ≥ 1; shuffle_mb ≥ 0")
        if self.pack_folds not in ("auto", "on", "off"):
            raise ValueError(f"pack_folds must be auto, on or off, not {self.pack_folds!r}")
        if self.input_pipeline not in ("auto", "ray", "thread"):
            raise ValueError(f"input_pipeline must be auto, ray or thread, not {self.input_pipeline!r}")
        if self.stream_window_mb < 16:
            raise ValueError("stream_window_mb must be ≥ 16")

    def packs(self) -> bool:
        """Whether folds beyond the free slots train in lanes (what `pack_folds` resolves to)."""
        return self.pack_folds == "on" or (self.pack_folds == "auto" and not self.use_gpu)

    def pipeline(self) -> str:
        """The input pipeline that `auto` resolves to: "ray" or "thread"."""
        if self.input_pipeline != "auto":
            return self.input_pipeline
        return "thread" if self.data_cpus == 0 and not self.use_gpu else "ray"


EPOCH = "_epoch"  # the column that tags each augmented sample with its epoch in the stream


def augment_part(batch: dict[str, np.ndarray], stage: Stage, job: FoldJob, url: str, manifest: dict, rank: int) -> dict[str, np.ndarray]:
    """A Ray Data task (or a step of the thread pipeline): one part of a worker's epoch (a few studies) → augmented sample arrays.

    Its generator is fixed by (seed, fold, epoch, rank, part), so runs repeat whatever task ran where.
    """
    epoch, part, studies = int(batch["epoch"][0]), int(batch["part"][0]), [int(s) for s in batch["studies"][0]]
    cfg = stage.train_config(job)
    rng = epoch_rng(cfg.seed, job.fold, epoch, rank, part)
    rows = read_cache(url, studies, manifest)
    rows = rows.iloc[rng.permutation(len(rows))]
    out = stage.augment(job, columns(rows), rng)
    out[EPOCH] = np.full(len(rows), epoch, np.int64)
    return out


def epoch_parts(job: FoldJob, seed: int, epoch: int, chunk: int, rank: int = 0, world: int = 1) -> list[list[int]]:
    """A worker's studies in one epoch, in parts: the fold's training studies in a seeded order, every world-th."""
    order = np.random.default_rng([seed, job.fold, epoch]).permutation(split_studies(job, "train"))
    return chunks([int(s) for s in order[rank::world]], chunk)


def stream_parts(stage: Stage, job: FoldJob, resources: ResourcesConfig, epochs: range, rank: int = 0, world: int = 1) -> list[dict[str, Any]]:
    """Every part of a worker's epochs, in stream order: {"epoch", "part", "studies"}."""
    seed = stage.train_config(job).seed
    return [
        {"epoch": e, "part": i, "studies": p}
        for e in epochs for i, p in enumerate(epoch_parts(job, seed, e, resources.chunk_studies, rank, world))
    ]


def epoch_stream(stage: Stage, job: FoldJob, resources: ResourcesConfig, epochs: range, rank: int = 0, world: int = 1):
    """A worker's epochs, one after another, as one streaming Ray Dataset of augmented arrays.

    One pipeline for all epochs: tasks of the next epoch run while the trainer finishes this one,
    and nothing is materialised (the object store holds the streaming window).
    """
    import ray

    logging.getLogger("ray.data").setLevel(logging.WARNING)
    url = job.inputs[cache_input("train")]
    items = stream_parts(stage, job, resources, epochs, rank, world)
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    ds = ds.map_batches(
        augment_part, batch_size=1, batch_format="numpy",
        fn_kwargs={"stage": stage, "job": job, "url": url, "manifest": read_manifest(url), "rank": rank},
        num_cpus=resources.data_cpus, concurrency=resources.data_concurrency,
    )
    ctx = ds.context  # this dataset's own copy of the DataContext
    ctx.execution_options.preserve_order = True  # the same seed gives the same batches
    ctx.enable_progress_bars = False  # one pipeline per worker: bars would flood the driver's console
    # The object store holds a bounded window of this worker's stream, whatever the data's size.
    limits = ctx.execution_options.resource_limits
    ctx.execution_options.resource_limits = limits.copy(object_store_memory=resources.stream_window_mb * 2**20)
    return ds


def thread_stream(stage: Stage, job: FoldJob, resources: ResourcesConfig, epochs: range, rank: int = 0, world: int = 1) -> Iterator[dict[str, np.ndarray]]:
    """The same parts as `epoch_stream`, augmented by the same function on a background thread, `prefetch_batches` parts ahead.

    For a box where every CPU is a trainer: no worker processes to start, no object-store copies.
    The thread stops when the stream is closed; an augmentation error is raised in the trainer.
    """
    url = job.inputs[cache_input("train")]
    manifest = read_manifest(url)
    items = stream_parts(stage, job, resources, epochs, rank, world)
    ready: queue.Queue = queue.Queue(maxsize=resources.prefetch_batches)
    stop = threading.Event()

    def put(x: Any) -> None:
        while not stop.is_set():
            try:
                ready.put(x, timeout=0.1)
                return
            except queue.Full:
                continue

    def work() -> None:
        try:
            for it in items:
                if stop.is_set():
                    return
                one = {"epoch": np.array([it["epoch"]]), "part": np.array([it["part"]]), "studies": [it["studies"]]}
                put(augment_part(one, stage, job, url, manifest, rank))
            put(None)
        except BaseException as e:  # noqa: BLE001 - handed to the trainer, which raises it
            put(e)

    threading.Thread(target=work, name=f"augment-{job_key(job)}-r{rank}", daemon=True).start()
    try:
        while (block := ready.get()) is not None:
            if isinstance(block, BaseException):
                raise block
            yield block
    finally:
        stop.set()


class ShufflePool:
    """A shuffle buffer of sample rows, held as (block, row) references: a draw copies only the rows it takes."""

    def __init__(self) -> None:
        self.blocks: dict[int, dict[str, np.ndarray]] = {}
        self.left: dict[int, int] = {}
        self.refs = np.empty((0, 2), np.int64)
        self.added = 0

    def __len__(self) -> int:
        return len(self.refs)

    def add(self, block: dict[str, np.ndarray]) -> None:
        n = len(block[EPOCH])
        if n == 0:
            return
        bid, self.added = self.added, self.added + 1
        self.blocks[bid], self.left[bid] = block, n
        self.refs = np.concatenate([self.refs, np.stack([np.full(n, bid), np.arange(n)], 1)])

    def take(self, n: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """n rows (or what is left) drawn at random without replacement."""
        pick = rng.choice(len(self.refs), size=min(n, len(self.refs)), replace=False)
        chosen, self.refs = self.refs[pick], np.delete(self.refs, pick, axis=0)
        keys = next(iter(self.blocks.values())).keys()
        out = {k: np.stack([self.blocks[b][k][r] for b, r in chosen]) for k in keys}
        for b in chosen[:, 0].tolist():
            self.left[b] -= 1
            if not self.left[b]:
                del self.blocks[b], self.left[b]
        return out


def buffer_samples(block: dict[str, np.ndarray], batch_size: int, shuffle_mb: float) -> int:
    """How many augmented samples the shuffle buffer holds: shuffle_mb's worth at this block's bytes per sample, ≥ 2 batches."""
    n = max(1, len(block[EPOCH]))
    per_sample = sum(v.nbytes for v in block.values()) / n
    return max(2 * batch_size, int(shuffle_mb * 2**20 / max(per_sample, 1.0)))


class StreamedBatches:
    """`batches(epoch)` for the fold driver, fed by `epoch_stream` or `thread_stream`: exactly `steps` batches per epoch.

    Samples of an epoch go through a seeded shuffle buffer (mixing parts) into batches; a worker
    whose share runs short repeats its epoch's first samples, so every DDP worker steps equally often.
    The stream starts at the first epoch asked for (a resumed run starts mid-way).
    """

    def __init__(self, stage: Stage, job: FoldJob, resources: ResourcesConfig, steps: int, rank: int = 0, world: int = 1, pin: bool = False) -> None:
        self.stage, self.job, self.res, self.steps, self.rank, self.world, self.pin = stage, job, resources, steps, rank, world, pin
        self.cfg = stage.train_config(job)
        self.blocks: Iterator[dict[str, np.ndarray]] | None = None
        self.pending: dict[str, np.ndarray] | None = None  # a block of the next epoch, read ahead

    def _next_block(self) -> dict[str, np.ndarray] | None:
        if self.pending is not None:
            block, self.pending = self.pending, None
            return block
        return next(self.blocks, None)

    def _open(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        epochs = range(epoch, fold_epochs(self.stage, self.job))
        if self.res.pipeline() == "thread":
            return thread_stream(self.stage, self.job, self.res, epochs, self.rank, self.world)
        ds = epoch_stream(self.stage, self.job, self.res, epochs, self.rank, self.world)
        return iter(ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=self.res.prefetch_batches))

    def _epoch_blocks(self, epoch: int) -> Iterator[dict[str, np.ndarray]]:
        if self.blocks is None:
            self.blocks = self._open(epoch)
        while (block := self._next_block()) is not None:
            tags = block[EPOCH]
            mine = tags == epoch
            if mine.all():
                yield block
                continue
            if mine.any():
                yield {k: v[mine] for k, v in block.items()}
            self.pending = {k: v[~mine] for k, v in block.items()}
            return

    def _tensors(self, arrays: dict[str, np.ndarray]) -> dict:
        batch = self.stage.to_batch(self.job, {k: v for k, v in arrays.items() if k != EPOCH})
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin else batch

    def __call__(self, epoch: int) -> Iterator[dict]:
        rng = epoch_rng(self.cfg.seed, self.job.fold, epoch, self.rank)
        bs, size = self.cfg.batch_size, 0
        pool = ShufflePool()
        seen: list[dict[str, np.ndarray]] = []  # what to repeat if this worker's share runs short
        done = 0
        for block in self._epoch_blocks(epoch):
            size = size or buffer_samples(block, bs, self.res.shuffle_mb)
            pool.add(block)
            if len(seen) < 4:
                seen.append(block)
            while done < self.steps and len(pool) >= size + bs:
                yield self._tensors(pool.take(bs, rng))
                done += 1
        while done < self.steps and len(pool):
            yield self._tensors(pool.take(bs, rng))
            done += 1
        if done < self.steps and not seen:
            raise RuntimeError(f"{self.job.stage}/{self.job.member} fold {self.job.fold}: worker {self.rank} has no training samples")
        while done < self.steps:
            if not len(pool):
                for block in seen:
                    pool.add(block)
            yield self._tensors(pool.take(bs, rng))
            done += 1


def _train_worker(config: dict[str, Any]) -> None:
    """One Ray Train worker: trains its lane's folds in turn, each with the fold driver on this worker's streamed share.

    Checkpoints (via ray.train.report) carry the fold they belong to: a restarted worker group, or
    a re-run of the same lane, skips the lane's finished folds and resumes the first unfinished one
    from its last checkpoint.
    """
    import ray.train
    import ray.train.torch

    stage: Stage = config["stage"]
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
        _train_job(stage, job, index, resources, resume if owner == job_key(job) else None, {**lane, "job_started": time.time()})
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


def _fold_trial(config: dict[str, Any], stage: Stage, lanes: dict[str, list[FoldJob]], resources: ResourcesConfig, storage: str) -> None:
    """One Tune trial: train one lane of folds with a TorchTrainer and relay its metrics to Tune."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    lane = lanes[config["fold"]]
    # Ray Train propagates this variable from here to the controller it starts.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(resources.poll_interval_s))
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"stage": stage, "jobs": lane, "resources": resources, "trial_started": time.time()},
        scaling_config=ray.train.ScalingConfig(
            num_workers=resources.num_workers,
            use_gpu=resources.use_gpu,
            resources_per_worker={"CPU": resources.cpus_per_worker, **({"GPU": 1} if resources.use_gpu else {})},
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

    from spine_ray.storage import fs_for, is_local

    if is_local(url):
        return None
    fs, _ = fs_for(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def storage_root(url: str) -> str:
    """A storage URL as Ray Train/Tune's storage_path wants it (absolute local path, or bucket/key)."""
    from spine_ray.storage import fs_for, is_local

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
        fit = int(have.get("GPU", 0) // resources.num_workers)
    else:
        fit = int(have.get("CPU", 0) // (resources.num_workers * resources.cpus_per_worker))
    return min(pending, fit) if fit >= 1 else pending


def run_folds(stage: Stage, jobs: list[FoldJob], resources: ResourcesConfig, samples_dir: str | None = None) -> list[pd.DataFrame]:
    """Train every unfinished fold, lanes of them in parallel (a Tune trial per lane); return all folds' OOF tables.

    Jobs may belong to several members of one stage: they share one Tune run, so every model of
    the stage is trained at once and the cluster's resources are shared out between them. Their
    samples are built first, once per distinct sample key, under `samples_dir` (default
    `{run_dir}/samples`). A job that `needs` others of the list starts after them: in their lane
    when folds are packed, in a later Tune run when each fold has its own trial.
    """
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
        ready = {job_key(j): j for j in with_caches(stage, pending, samples_dir or join(pending[0].run_dir, "samples"))}
        if resources.packs():
            # One Tune run: every job of the stage dealt into lanes (a re-run deals them alike), a job
            # after the folds it needs in the same lane; finished ones drop out.
            _run_lanes(stage, jobs, ready, resources, limit, limit)
        else:
            # One trial per fold: a fold that needs others starts in a later Tune run, once they are done.
            done = {job_key(j) for j in jobs if job_key(j) not in ready}
            while waiting := [j for j in jobs if job_key(j) not in done]:
                now = [j for j in waiting if done.issuperset(j.needs)]
                if not now:
                    raise RuntimeError(f"{job_key(waiting[0])} needs folds that did not finish: {list(waiting[0].needs)}")
                _run_lanes(stage, now, ready, resources, len(now), limit)
                finished = {job_key(j) for j in now if is_done(j)}
                if not finished:
                    break  # finished without their outputs: reported below
                done |= finished
    missing = [job_key(j) for j in jobs if not is_done(j)]
    if missing:
        raise RuntimeError(f"folds {missing} of stage {jobs[0].stage} finished without their outputs")
    return [read_oof(j) for j in jobs]


def _run_lanes(stage: Stage, jobs: list[FoldJob], ready: dict[str, FoldJob], resources: ResourcesConfig, slots: int, limit: int) -> None:
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
    trainable = tune.with_parameters(_fold_trial, stage=stage, lanes=todo, resources=resources, storage=join(storage, "train"))
    tuner = tune.Tuner(
        # The trial only waits on its TorchTrainer, whose workers hold the CPUs/GPUs, so it
        # asks for no CPU (a head bundle must ask for something: a token of memory).
        tune.with_resources(trainable, {"cpu": 0, "memory": 64 * 2**20}),
        param_space={"fold": tune.grid_search(list(todo))},
        tune_config=tune.TuneConfig(max_concurrent_trials=min(len(todo), limit)),
        run_config=tune.RunConfig(
            name=f"{first.stage}-{'-'.join(sorted({j.member for j in pending}))}",
            storage_path=storage_root(join(storage, "tune")),
            storage_filesystem=pyarrow_fs(storage),
            verbose=1,
            callbacks=tune_callbacks(first.run_dir, f"train-{first.stage}", fold_of),
        ),
    )
    grid = tuner.fit()
    failed = [r for r in grid if r.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} fold(s) of stage {first.stage} failed: {failed[0].error}")


__all__ = ["ResourcesConfig", "run_folds", "init_ray"]
