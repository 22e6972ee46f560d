"""Cross-ensembling: every stage-2 member predicts on the points of every stage-1 variant.

The 5th-place team's best private-LB ensemble ran each grader on the points of each localiser
variant and blended the pairs. Stage 2 trains on label points, so the trained fold models do not
depend on stage 1 at all: only the held-out crops (and, at inference, the test crops) move to a
variant's points. A cross member therefore costs one prediction pass per fold, not a training run,
and it stays out-of-fold: the variant's points of fold k come from its localisers trained without
fold k, and the grader of fold k never saw those studies either.

Per (member, fold, variant) `predict_cross` loads `grade/{member}/fold{k}/model.pt`
(`spine_ray.stages.registry.load_fold_model`), builds the
validation samples on `localize/points@{variant}.parquet` (a sample cache of its own, keyed by
those points) and writes `grade/{member}/fold{k}/oof@{variant}.parquet`: the OOF table with
member `{member}@{variant}`. Finished files are kept, so an interrupted pass resumes.
`run_cross` runs the pending ones as Ray tasks (one GPU or `cpus_per_worker` CPUs each).
"""

from __future__ import annotations

import dataclasses

import pandas as pd
import torch

from spine_ray.core.storage import atomic_write_parquet, exists, join, read_parquet
from spine_ray.engine.resources import ResourcesConfig
from spine_ray.engine.sample_cache import samples
from spine_ray.engine.stage import FoldJob, Stage, fold_dir
from spine_ray.stages.localize import variant_member
from spine_ray.stages.registry import load_fold_model


def cross_url(job: FoldJob, variant: str) -> str:
    """Where a fold's predictions on a variant's points go."""
    return join(fold_dir(job), f"oof@{variant}.parquet")


def cross_job(job: FoldJob, points: str) -> FoldJob:
    """The fold job with its validation crops on other stage-1 points (sample caches rebuilt for them)."""
    inputs = {k: v for k, v in job.inputs.items() if not k.startswith("samples:")}
    return dataclasses.replace(job, inputs={**inputs, "points": points})


def predict_cross(stage: Stage, job: FoldJob, variant: str) -> int:
    """Predict one trained fold on the job's points; writes its cross OOF table, returns its rows (pure PyTorch)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _ = load_fold_model(job.run_dir, job.stage, job.member, job.fold, device)
    oof = stage.predict(job, model, samples(stage, job, "val")).assign(member=variant_member(job.member, variant))
    atomic_write_parquet(cross_url(job, variant), oof)
    return len(oof)


def run_cross(stage: Stage, jobs: list[FoldJob], points: dict[str, str], resources: ResourcesConfig, samples_dir: str) -> list[pd.DataFrame]:
    """Every trained fold of `jobs` on every variant's points (variant → points URL); returns the cross OOF tables."""
    cross = [(cross_job(j, url), v) for v, url in points.items() for j in jobs]
    pending = [(j, v) for j, v in cross if not exists(cross_url(j, v))]
    if pending:
        import ray

        from spine_ray.core.raycluster import init_ray
        from spine_ray.engine.sample_cache import with_caches

        init_ray()
        built = with_caches(stage, [j for j, _ in pending], samples_dir)
        task = ray.remote(predict_cross).options(
            num_cpus=resources.cpus_per_worker, num_gpus=resources.gpus_per_worker if resources.use_gpu else 0, max_retries=resources.max_failures,
        )
        ray.get([task.remote(stage, j, v) for j, (_, v) in zip(built, pending, strict=True)])
    return [read_parquet(cross_url(j, v)) for j, v in cross]


__all__ = ["run_cross", "predict_cross", "cross_job", "cross_url"]
