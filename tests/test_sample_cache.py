"""Samples built once for all folds (spine_ray.engine.sample_cache) and streamed per epoch (distributed.epoch_stream)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_training_machinery import N_STUDIES, LinearStage, make_run

from spine_ray.engine.resources import ResourcesConfig
from spine_ray.engine.sample_cache import (
    MANIFEST,
    cache_input,
    ensure_cache,
    read_cache,
    samples,
    split_studies,
    with_caches,
)
from spine_ray.engine.stream import EPOCH, StreamedBatches, epoch_parts, epoch_stream


class CountingStage(LinearStage):
    """LinearStage that counts the samples it builds and whose samples depend on `scale`."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.scale, self.built = scale, 0

    def sample_key(self, job, split):
        return {"scale": self.scale, "inputs": ["table"]}

    def to_samples(self, job, split, rows):
        out = super().to_samples(job, split, rows)
        out["y"] = out["y"] * self.scale
        self.built += len(out)
        return out


def test_each_sample_is_built_once_and_every_fold_and_rerun_reuses_it(tmp_path):
    jobs = make_run(tmp_path, n_folds=3)
    stage = CountingStage()
    root = str(tmp_path / "samples")
    cached = with_caches(stage, jobs, root, parallel=False)
    # One train and one val cache over all studies, whatever the number of folds.
    assert stage.built == 2 * N_STUDIES
    urls = {j.inputs[cache_input(s)] for j in cached for s in ("train", "val")}
    assert len(urls) == 2 and all(Path(u, MANIFEST).exists() for u in urls)
    # A re-run (and tune-lr, and any other fold) finds the finished caches and builds nothing.
    again = with_caches(stage, jobs, root, parallel=False)
    assert stage.built == 2 * N_STUDIES and [j.inputs for j in again] == [j.inputs for j in cached]
    for job in cached:
        for split in ("train", "val"):
            got = samples(stage, job, split)
            assert got["study_id"].tolist() == split_studies(job, split)  # its own studies only, in order
    # Cached samples equal the ones built in-process.
    plain = samples(stage, jobs[1], "train")
    np.testing.assert_array_equal(samples(stage, cached[1], "train")["y"], plain["y"])


def test_a_changed_sample_config_builds_a_new_cache(tmp_path):
    jobs = make_run(tmp_path)
    root = str(tmp_path / "samples")
    a = with_caches(CountingStage(1.0), jobs, root, parallel=False)[0]
    b = with_caches(CountingStage(2.0), jobs, root, parallel=False)[0]
    assert a.inputs[cache_input("train")] != b.inputs[cache_input("train")]
    ya = samples(CountingStage(), a, "train")["y"].to_numpy()
    yb = samples(CountingStage(), b, "train")["y"].to_numpy()
    np.testing.assert_allclose(yb, 2 * ya)


def test_an_interrupted_build_resumes_with_the_missing_parts_only(tmp_path):
    jobs = make_run(tmp_path)
    stage = CountingStage()
    root = str(tmp_path / "samples")
    url, manifest = ensure_cache(stage, jobs[0], "train", root, chunk=8, parallel=False)
    assert manifest["built_parts"] == N_STUDIES // 8 and manifest["samples"] == N_STUDIES
    # As if the build died after writing all parts but one, before its manifest.
    Path(url, MANIFEST).unlink()
    Path(url, "part-00002.parquet").unlink()
    _, again = ensure_cache(stage, jobs[0], "train", root, chunk=8, parallel=False)
    assert again["built_parts"] == 1 and again["reused_parts"] == N_STUDIES // 8 - 1
    assert stage.built == N_STUDIES + 8
    assert read_cache(url, list(range(1000, 1000 + N_STUDIES)))["study_id"].is_unique


def test_a_pool_builds_the_same_cache_as_this_process(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    jobs = make_run(tmp_path)
    stage = CountingStage()
    url, manifest = ensure_cache(stage, jobs[0], "train", str(tmp_path / "serial"), chunk=8, parallel=False)
    with ThreadPoolExecutor(2) as pool:
        url2, manifest2 = ensure_cache(stage, jobs[0], "train", str(tmp_path / "pooled"), chunk=8, parallel=False, pool=pool)
    assert manifest2["built_parts"] == manifest["built_parts"] == N_STUDIES // 8 and manifest2["parts"] == manifest["parts"]
    studies = list(range(1000, 1000 + N_STUDIES))
    pd.testing.assert_frame_equal(read_cache(url2, studies), read_cache(url, studies))


def test_a_cache_without_its_manifest_is_not_used(tmp_path):
    jobs = make_run(tmp_path)
    url, _ = ensure_cache(CountingStage(), jobs[0], "train", str(tmp_path / "samples"), parallel=False)
    manifest = json.loads(Path(url, MANIFEST).read_text())
    assert sum(sum(p["studies"].values()) for p in manifest["parts"]) == N_STUDIES


def test_epoch_streams_are_seeded_cover_the_fold_and_differ_between_epochs(ray_local, tmp_path):
    jobs = make_run(tmp_path)
    stage = LinearStage(epochs=3)
    job = with_caches(stage, jobs[:1], str(tmp_path / "samples"), parallel=False)[0]
    res = ResourcesConfig(chunk_studies=3)

    def stream(epochs: range, rank: int = 0, world: int = 1) -> dict[str, np.ndarray]:
        blocks = list(epoch_stream(stage, job, res, epochs, rank, world).iter_batches(batch_size=None))
        return {k: np.concatenate([b[k] for b in blocks]) for k in ("y", EPOCH)}

    train_y = np.sort(samples(stage, job, "train")["y"].to_numpy().astype(np.float32))
    both = stream(range(0, 2))
    e0, e1 = both["y"][both[EPOCH] == 0], both["y"][both[EPOCH] == 1]
    np.testing.assert_array_equal(np.sort(e0), train_y)  # every training sample once per epoch
    np.testing.assert_array_equal(np.sort(e1), train_y)
    assert not np.array_equal(e0, e1)  # a new order each epoch
    np.testing.assert_array_equal(stream(range(0, 1))["y"], e0)  # the seed fixes the order
    # Two workers split the studies between them, with no overlap.
    halves = np.concatenate([stream(range(0, 1), r, 2)["y"] for r in (0, 1)])
    np.testing.assert_array_equal(np.sort(halves), train_y)


@pytest.mark.parametrize("pipeline", ["ray", "thread"])
def test_streamed_batches_give_every_epoch_its_steps_the_same_way_twice(ray_local, tmp_path, pipeline):
    jobs = make_run(tmp_path)
    stage = LinearStage(epochs=2)
    job = with_caches(stage, jobs[:1], str(tmp_path / "samples"), parallel=False)[0]
    res = ResourcesConfig(chunk_studies=3, shuffle_mb=0, input_pipeline=pipeline)
    n = len(samples(stage, job, "train"))

    def run(steps: int) -> list[list[np.ndarray]]:
        batches = StreamedBatches(stage, job, res, steps)
        return [[b["y"].numpy() for b in batches(e)] for e in range(2)]

    exact = run(-(-n // 8))
    assert [len(e) for e in exact] == [-(-n // 8)] * 2
    np.testing.assert_array_equal(np.sort(np.concatenate(exact[0])), np.sort(samples(stage, job, "train")["y"].to_numpy().astype(np.float32)))
    again = run(-(-n // 8))
    for a, b in zip(exact, again, strict=True):
        np.testing.assert_array_equal(np.concatenate(a), np.concatenate(b))
    # A worker whose share is short of the steps every worker takes repeats samples, never stops early.
    longer = run(-(-n // 8) + 3)
    assert [len(e) for e in longer] == [-(-n // 8) + 3] * 2 and all(len(b) for b in longer[1])


def test_the_thread_pipeline_gives_the_ray_pipelines_batches(ray_local, tmp_path):
    jobs = make_run(tmp_path)
    stage = LinearStage(epochs=2)
    job = with_caches(stage, jobs[:1], str(tmp_path / "samples"), parallel=False)[0]
    steps = -(-len(samples(stage, job, "train")) // 8)

    def run(pipeline: str) -> list[np.ndarray]:
        batches = StreamedBatches(stage, job, ResourcesConfig(chunk_studies=3, shuffle_mb=0, input_pipeline=pipeline), steps)
        return [b["y"].numpy() for e in range(2) for b in batches(e)]

    for a, b in zip(run("ray"), run("thread"), strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_buffer_that_holds_the_epoch_mixes_every_part_into_every_batch(tmp_path):
    class Pairs(LinearStage):  # batches of two, so that a minimal buffer is a small share of the epoch
        def train_config(self, job):
            return dataclasses.replace(super().train_config(job), batch_size=2)

    jobs = make_run(tmp_path)
    stage = Pairs(epochs=1)
    job = with_caches(stage, jobs[:1], str(tmp_path / "samples"), parallel=False)[0]
    train = samples(stage, job, "train")
    part_of = {}  # each training sample's augmentation part (parts of 3 studies; one sample per study here)
    for i, studies in enumerate(epoch_parts(job, stage.train_config(job).seed, 0, 3)):
        part_of.update({float(np.float32(y)): i for y in train.set_index("study_id").loc[studies, "y"]})

    def order_kept(shuffle_mb: float) -> float:
        """Rank correlation between a sample's place in the epoch and its part's: 1 = parts in stream order."""
        res = ResourcesConfig(chunk_studies=3, shuffle_mb=shuffle_mb, input_pipeline="thread")
        ys = np.concatenate([b["y"].numpy() for b in StreamedBatches(stage, job, res, len(train) // 2)(0)])
        parts = np.array([part_of[float(y)] for y in ys])
        return float(np.corrcoef(np.arange(len(parts)), parts)[0, 1])

    # A two-batch buffer keeps the parts' order (each batch from neighbouring parts); an epoch-sized one does not.
    assert order_kept(0) > 0.45 and abs(order_kept(64)) < 0.25  # measured: 0.55 and −0.07


def test_a_failing_augmentation_is_raised_in_the_trainer(tmp_path):
    jobs = make_run(tmp_path)

    class Broken(LinearStage):
        def augment(self, job, rows, rng):
            raise OSError("cache shard unreadable")

    stage = Broken(epochs=1)
    job = with_caches(stage, jobs[:1], str(tmp_path / "samples"), parallel=False)[0]
    with pytest.raises(OSError, match="unreadable"):
        list(StreamedBatches(stage, job, ResourcesConfig(input_pipeline="thread"), 3)(0))


@pytest.mark.parametrize("bad", [{"data_cpus": -1}, {"data_concurrency": 0}, {"chunk_studies": 0}, {"stream_window_mb": 8}, {"shuffle_mb": -1}, {"input_pipeline": "gpu"}])
def test_resources_config_rejects_a_bad_input_pipeline(bad):
    with pytest.raises(ValueError):
        dataclasses.replace(ResourcesConfig(), **bad)
