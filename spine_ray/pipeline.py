"""`spine-ray train`: every fold job of every model stage in one schedule, each as soon as its inputs exist.

A run directory holds everything a run produced (paths or URLs):

    config.yaml           the PipelineConfig that made it
    train_labels.csv      the training labels (train.csv format), from the prepared labels
    folds.parquet         study_id, fold: study-level folds, stratified, fixed by the seed
    prior.csv             the prior fitted on all training labels (target, normal_mild, moderate, severe)
    localize/{view}/fold{k}/   model.pt, oof.parquet, done.json (stage 1, per view and fold)
    localize/points.parquet    stage-1 out-of-fold points of every view (see spine_ray.stages.localize)
    localize/summary.json      out-of-fold localisation error per view
    localize/{view}@{variant}/fold{k}/, localize/points@{variant}.parquet, localize/summary@{variant}.json
                          the same for each stage-1 variant (`localize_variants`, cross-ensembling)
    grade/{member}/fold{k}/    model.pt, oof.parquet, done.json (stage 2, per member and fold)
    cross/{member}@{variant}/fold{k}/  oof.parquet, done.json: grader fold k on the variant's points (spine_ray.stages.cross)
    oof.parquet           row_id, study_id, fold, member, normal_mild, moderate, severe; a member run on
                          a variant's points is named `{member}@{variant}`
    onestage/{member}/fold{k}/ model.pt, oof.parquet, done.json (one-stage members, spinal + foraminal rows)
    cv.json               CV score and its parts per member, the prior on the same folds, the oracle
    label_flags.parquet   `spine-ray clean-labels`: labels the OOF ensemble disbelieves (`exclude_labels` of a rerun)
    samples/              sample caches, built once per (data, stage config, split) and shared by every fold
    {stage}/{member}/fold{k}/resume.pt   an unfinished fold's last epoch (model, optimizer, schedule), until it is done
    ray/                  Ray Train and Ray Tune run state (metrics per epoch and slot)
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd

from spine_ray.core.config import save
from spine_ray.core.schema import (
    LABEL_COLUMNS,
    SchemaError,
    label_matrix,
    labels_from_matrix,
    read_labels,
    with_target,
)
from spine_ray.core.storage import (
    absolute,
    atomic_write_bytes,
    atomic_write_parquet,
    atomic_write_text,
    exists,
    join,
    read_parquet,
)
from spine_ray.data.label_flags import read_flags
from spine_ray.data.volumes import LABELS_FILE, read_manifest
from spine_ray.engine.folds import assign_folds
from spine_ray.engine.plan import PlanJob
from spine_ray.engine.schedule import run_folds
from spine_ray.engine.stage import FoldJob, Stage, fold_dir, fold_key, fold_path, is_done, job_key
from spine_ray.ensemble.baseline import write_prior
from spine_ray.ensemble.blend import member_matrix
from spine_ray.ensemble.metric import score_arrays
from spine_ray.ensemble.prior import fit_prior, oof_prior
from spine_ray.run_config import Member, PipelineConfig
from spine_ray.stages.localize import VIEWS, error_summary, variant_member
from spine_ray.stages.registry import STAGES, stage_named

log = logging.getLogger(__name__)

TRAINED_IN_ORDER = ("localize", "grade")  # `--stage`: stage 1, then stage 2 with the one-stage members and cross predictions


def training_labels(prepared: str) -> pd.DataFrame:
    """Wide labels (train.csv format) of every study in a prepared train split."""
    long = read_parquet(join(prepared, LABELS_FILE))
    long = with_target(long.drop_duplicates(["study_id", "condition", "level"]))
    wide = long.pivot(index="study_id", columns="target", values="severity").reindex(columns=list(LABEL_COLUMNS))
    matrix = wide.fillna(-1).to_numpy(dtype=np.int8)
    return labels_from_matrix(wide.index.astype(np.int64), matrix)


def resolved(cfg: PipelineConfig) -> PipelineConfig:
    """The config with its local paths made absolute, as every stage and worker must see them."""
    return dataclasses.replace(
        cfg, prepared=absolute(cfg.prepared), run_dir=absolute(cfg.run_dir), oracle=absolute(cfg.oracle) if cfg.oracle else None,
        samples_dir=absolute(cfg.samples_dir) if cfg.samples_dir else None,
        exclude_labels=absolute(cfg.exclude_labels) if cfg.exclude_labels else None,
    )


def setup_run(cfg: PipelineConfig) -> pd.DataFrame:
    """Write config, labels, folds and prior (folds are kept on re-runs); returns the folds."""
    try:
        read_manifest(cfg.prepared)
    except Exception as e:  # noqa: BLE001 - reported as one line
        raise SchemaError(cfg.prepared, f"not a finished prepare output ({e}); run `spine-ray prepare` first") from None
    labels = training_labels(cfg.prepared)
    save(cfg, join(cfg.run_dir, "config.yaml"))
    atomic_write_bytes(join(cfg.run_dir, "train_labels.csv"), labels.to_csv(index=False).encode())
    folds_url = join(cfg.run_dir, "folds.parquet")
    if exists(folds_url):
        folds = read_parquet(folds_url)
        if set(folds["study_id"]) != set(labels["study_id"]):
            raise SchemaError(folds_url, "its studies differ from the prepared labels; use a new run_dir")
    else:
        folds = assign_folds(labels, cfg.folds, cfg.seed)
        atomic_write_parquet(folds_url, folds)
    write_prior(fit_prior(label_matrix(labels)), join(cfg.run_dir, "prior.csv"))
    return folds


def fold_jobs(cfg: PipelineConfig, stage: str, member: str, config: Any, inputs: dict[str, str]) -> list[FoldJob]:
    """One FoldJob per fold of a member."""
    return [FoldJob(stage, member, k, cfg.folds, config, cfg.prepared, cfg.run_dir, inputs) for k in range(cfg.folds)]


def _oof_of(cfg: PipelineConfig, stage: str, member: str, fold: int) -> str:
    return join(fold_path(cfg.run_dir, stage, member, fold), "oof.parquet")


def _points_inputs(cfg: PipelineConfig, variant: str, folds: list[int]) -> tuple[dict[str, str], tuple[str, ...]]:
    """A stage-1 member's points tables of some folds as job inputs and the jobs that write them.

    One fold: `points/{view}`; several: `points/{view}/fold{k}`, view by view, fold by fold (the
    order of the run's points table, so that they read back as exactly its rows).
    """
    members = [variant_member(view, variant) for view in VIEWS]
    name = (lambda view, k: f"points/{view}") if len(folds) == 1 else (lambda view, k: f"points/{view}/fold{k}")
    inputs = {name(view, k): _oof_of(cfg, "localize", m, k) for view, m in zip(VIEWS, members, strict=True) for k in folds}
    return inputs, tuple(fold_key(m, k) for m in members for k in folds)


def stage1_jobs(cfg: PipelineConfig) -> list[FoldJob]:
    """Every stage-1 fold job of every variant: sagittal T2 and T1, and axial fold k after sagittal T2 fold k."""
    jobs = []
    for v, loc in cfg.stage1_members():
        jobs += [j for view in ("sag_t2", "sag_t1") for j in fold_jobs(cfg, "localize", variant_member(view, v), getattr(loc, view), {})]
        t2 = variant_member("sag_t2", v)
        jobs += [dataclasses.replace(j, inputs={"spinal_points": _oof_of(cfg, "localize", t2, j.fold)}, needs=(fold_key(t2, j.fold),))
                 for j in fold_jobs(cfg, "localize", variant_member("axial", v), loc.axial, {})]
    return jobs


def stage2_jobs(cfg: PipelineConfig) -> list[FoldJob]:
    """Every grade fold (on its fold's stage-1 points), one-stage fold and cross prediction of the run.

    Grade fold k validates on the main localisers' fold-k out-of-fold points and draws its slice
    jitter from their errors, so it needs just those three jobs (with `slice_errors: run`, from
    every stage-1 fold's errors: it needs them all); a one-stage fold needs nothing; a
    cross prediction (grader × stage-1 variant × fold) needs grader fold k and the variant's fold-k
    localisers.
    """
    extra = label_flags(cfg)
    jobs = []
    for m in cfg.grade:
        for j in fold_jobs(cfg, "grade", m.name, m, {}):
            points, needs = _points_inputs(cfg, "", [j.fold] if m.slice_errors == "fold" else list(range(cfg.folds)))
            jobs.append(dataclasses.replace(j, inputs={**points, **extra}, needs=needs))
    jobs += [j for m in cfg.onestage for j in fold_jobs(cfg, "onestage", m.name, m, {})]
    for v in cfg.localize_variants:
        for m in cfg.grade:
            for j in fold_jobs(cfg, "cross", variant_member(m.name, v.name), m, {}):
                points, needs = _points_inputs(cfg, v.name, [j.fold])
                jobs.append(dataclasses.replace(j, inputs=points, needs=(fold_key(m.name, j.fold), *needs)))
    return jobs


def plan_jobs(cfg: PipelineConfig, hours: Callable[[Member], float], cross_hours: float = 0.0) -> list[PlanJob]:
    """The run's job graph exactly as `train` schedules it (`stage1_jobs` + `stage2_jobs`), priced by `hours` per member.

    Groups name the stage barriers of a stage-by-stage run (sagittal, axial, grade, onestage,
    cross), for `spine_ray.engine.plan.simulate` and `benchmarks/schedule.py`.
    """
    def group(job: FoldJob) -> str:
        if job.stage == "localize":
            return "axial" if job.member.partition("@")[0] == "axial" else "sagittal"
        return job.stage

    return [PlanJob(job_key(j), group(j), cross_hours if j.stage == "cross" else hours(Member(j.stage, j.member, j.config)), j.needs)
            for j in stage1_jobs(cfg) + stage2_jobs(cfg)]


def write_points(cfg: PipelineConfig, jobs: list[FoldJob], tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Stage 1's points table and error summary per variant, from its fold tables; returns the main localisers' summary."""
    by_variant: dict[str, list[pd.DataFrame]] = {}
    for job, table in zip(jobs, tables, strict=True):
        by_variant.setdefault(job.member.partition("@")[2], []).append(table)
    summaries = {}
    for v, parts in by_variant.items():
        # Sagittal T2, then T1, then axial rows (the jobs' order): a stable sort keeps it within a target.
        points = pd.concat(parts, ignore_index=True).sort_values(["study_id", "target"]).reset_index(drop=True)
        atomic_write_parquet(points_url(cfg, v), points)
        summaries[v] = error_summary(points)
        summary_url = join(cfg.run_dir, "localize", variant_member("summary", v) + ".json")
        atomic_write_text(summary_url, json.dumps(summaries[v].reset_index().to_dict(orient="records"), indent=2))
    return summaries[""]


def points_url(cfg: PipelineConfig, variant: str = "") -> str:
    """Stage 1's out-of-fold points table of a run (of a stage-1 variant when named)."""
    return join(cfg.run_dir, "localize", variant_member("points", variant) + ".parquet")


def stage_inputs(cfg: PipelineConfig, stage: str) -> dict[str, str]:
    """The tables a stage's folds read from earlier stages (and the label flags), checked before any worker starts."""
    stage_named(stage)
    if stage != "grade":
        return {}
    if not exists(points_url(cfg)):
        raise SchemaError(points_url(cfg), "no stage-1 points: train the localize stage first")
    return {"points": points_url(cfg), **label_flags(cfg)}


def label_flags(cfg: PipelineConfig) -> dict[str, str]:
    """The grade folds' `exclude_labels` input when the run has one (its table checked here, in one line), else none."""
    if not cfg.exclude_labels:
        return {}
    read_flags(cfg.exclude_labels)
    return {"exclude_labels": cfg.exclude_labels}


def write_cv(cfg: PipelineConfig, folds: pd.DataFrame, tables: list[pd.DataFrame]) -> dict:
    """Stage 2's outputs from every grade, cross and one-stage fold table: oof.parquet and cv.json; returns the CV report."""
    oof = pd.concat(tables, ignore_index=True)
    # gt_heatmap members validated on label points: scored in cv.json as an upper bound, never blended.
    atomic_write_parquet(join(cfg.run_dir, "oof.parquet"), oof[~oof["member"].isin([m.name for m in cfg.onestage if m.gt_heatmap])])
    labels = read_labels(join(cfg.run_dir, "train_labels.csv"))
    lm = label_matrix(labels)
    studies = labels["study_id"].astype(int).tolist()
    fold_of = folds.set_index("study_id").loc[studies, "fold"].to_numpy()
    prior_oof = oof_prior(lm, fold_of)
    report: dict = {"prior": score_arrays(lm, prior_oof).as_dict(), "members": {}, "filled_from_prior": {}}
    mm = member_matrix(oof, studies, cfg.grade_members() + [m.name for m in cfg.onestage], prior_oof)
    for m, probs in zip(mm.members, mm.probs, strict=True):
        report["members"][m] = score_arrays(lm, probs).as_dict()
        report["filled_from_prior"][m] = mm.filled[m]
    if cfg.oracle:
        from spine_ray.core.schema import read_submission
        from spine_ray.ensemble.metric import score_frames

        report["oracle"] = score_frames(labels, read_submission(cfg.oracle)).as_dict()
    atomic_write_text(join(cfg.run_dir, "cv.json"), json.dumps(report, indent=2))
    return report


def run_stages() -> dict[str, Stage]:
    """Every stage a run's schedule runs jobs of: the trained ones, and cross predictions."""
    from spine_ray.stages.cross import CrossStage

    return {**STAGES, "cross": CrossStage()}


def train(cfg: PipelineConfig, stage: str | None = None) -> dict:
    """Train every fold job of the run in one schedule (or those of one stage); returns what each stage reported.

    All stages' jobs go to one Ray run (`spine_ray.engine.schedule.run_folds`), each starting once
    the jobs it reads are done: grade fold k right after its localisers' fold k, one-stage folds
    from the start, a cross prediction once its grader fold is done. `--stage localize` trains
    stage 1 alone; `--stage grade` trains the rest on a finished stage 1.
    """
    stages = TRAINED_IN_ORDER if stage is None else (stage,)
    unknown = [s for s in stages if s not in TRAINED_IN_ORDER]
    if unknown:
        raise SchemaError("--stage", f"unknown stage {unknown[0]!r} (one of {list(TRAINED_IN_ORDER)})")
    cfg = resolved(cfg)
    folds = setup_run(cfg)
    first, second = stage1_jobs(cfg), stage2_jobs(cfg) if "grade" in stages else []
    if "localize" not in stages:
        missing = [j for j in first if not is_done(j)]
        if missing:
            raise SchemaError(fold_dir(missing[0]), "no stage-1 points: train the localize stage first")
    tables = run_folds(run_stages(), first + second, cfg.resources, cfg.samples_dir)
    report: dict = {"localize": write_points(cfg, first, tables[: len(first)])}
    if second:
        # oof.parquet lists graders, then cross members, then one-stage members.
        rank = {"grade": 0, "cross": 1, "onestage": 2}
        kinds = sorted(range(len(second)), key=lambda i: rank[second[i].stage])
        report["grade"] = write_cv(cfg, folds, [tables[len(first) + i] for i in kinds])
    return {s: report[s] for s in stages}


__all__ = ["train", "setup_run", "training_labels", "stage_inputs", "points_url", "stage1_jobs", "stage2_jobs", "plan_jobs"]
