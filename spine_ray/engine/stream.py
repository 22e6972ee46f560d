"""A training worker's batches: a per-epoch stream of augmented samples, mixed in a shuffle buffer.

Its share of the fold's training studies, in an order fixed by the seed and epoch, is read from
the sample cache (`spine_ray.engine.sample_cache`) in parts that are re-cropped and augmented
(seeded per part: runs repeat whatever task ran where) while the trainer steps. On a GPU cluster
the parts run as Ray Data CPU tasks and the object store holds that streaming window, never a
fold's whole training set; on a CPU-only box, where every CPU is a trainer, the same parts run on
a background thread of the worker (`ResourcesConfig.input_pipeline`).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

from spine_ray.engine.resources import ResourcesConfig
from spine_ray.engine.sample_cache import (
    cache_input,
    chunks,
    read_cache,
    read_manifest,
    split_studies,
)
from spine_ray.engine.stage import FoldJob, Stage, columns, epoch_rng, fold_epochs, job_key

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
