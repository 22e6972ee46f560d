"""Cross-ensembling: every stage-2 member predicts on the points of every stage-1 variant.

The 5th-place team's best private-LB ensemble ran each grader on the points of each localiser
variant and blended the pairs. Stage 2 trains on label points, so the trained fold models do not
depend on stage 1 at all: only the held-out crops (and, at inference, the test crops) move to a
variant's points. A cross member therefore costs one prediction pass per fold, not a training run,
and it stays out-of-fold: the variant's points of fold k come from its localisers trained without
fold k, and the grader of fold k never saw those studies either.

A cross job (`stage` "cross", member `{grader}@{variant}`, fold k) needs grader fold k and the
variant's three localisers of fold k; its inputs name their fold-k points tables (`points/{view}`).
`CrossStage.run` loads `grade/{grader}/fold{k}/model.pt` (`spine_ray.stages.registry.load_fold_model`),
builds fold k's held-out samples on those points and writes, under `cross/{grader}@{variant}/fold{k}/`,
`oof.parquet` (the grade OOF columns, member `{grader}@{variant}`) and then `done.json`, like a
trained fold, so the run's schedule runs it on a slot as soon as its needs are done and a re-run
skips it.
"""

from __future__ import annotations

import dataclasses

import torch

from spine_ray.core.storage import atomic_write_parquet, join
from spine_ray.engine.fold import mark_done
from spine_ray.engine.sample_cache import samples
from spine_ray.engine.stage import FoldJob, fold_dir
from spine_ray.stages.grade.config import GradeConfig
from spine_ray.stages.registry import STAGES, load_fold_model


def grader_job(job: FoldJob) -> FoldJob:
    """The grade fold a cross job predicts with, its held-out crops on the cross job's points."""
    grader = job.member.partition("@")[0]
    return dataclasses.replace(job, stage="grade", member=grader, needs=())


class CrossStage:
    """A trained grader fold on a stage-1 variant's points: a job that trains nothing (`run`)."""

    config_type = GradeConfig

    def run(self, job: FoldJob[GradeConfig], device: torch.device | str | None = None, timeline: dict[str, float] | None = None) -> int:
        """Predict the grader fold on the job's points; write its OOF table and done marker; returns its rows."""
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        grade, inner = STAGES["grade"], grader_job(job)
        model, _ = load_fold_model(job.run_dir, "grade", inner.member, job.fold, device)
        oof = grade.predict(inner, model, samples(grade, inner, "val")).assign(member=job.member)
        atomic_write_parquet(join(fold_dir(job), "oof.parquet"), oof)
        mark_done(job, len(oof), timeline=timeline)
        return len(oof)


__all__ = ["CrossStage", "grader_job"]
