"""`spine-ray train`: every model stage in order, all folds of a stage in parallel.

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
    grade/{member}/fold{k}/    model.pt, oof.parquet, done.json (stage 2, per member and fold);
                          oof@{variant}.parquet: the fold's model on a variant's points (spine_ray.stages.cross)
    oof.parquet           row_id, study_id, fold, member, normal_mild, moderate, severe; a member run on
                          a variant's points is named `{member}@{variant}`
    onestage/{member}/fold{k}/ model.pt, oof.parquet, done.json (one-stage members, spinal + foraminal rows)
    cv.json               CV score and its parts per member, the prior on the same folds, the oracle
    label_flags.parquet   `spine-ray clean-labels`: labels the OOF ensemble disbelieves (`exclude_labels` of a rerun)
    samples/              sample caches, built once per (data, stage config, split) and shared by every fold
    ray/                  Ray Train checkpoints and Ray Tune experiment state
"""

from __future__ import annotations

import dataclasses
import json
import logging
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
from spine_ray.engine.schedule import run_folds
from spine_ray.engine.stage import FoldJob, fold_dir, job_key
from spine_ray.ensemble.baseline import write_prior
from spine_ray.ensemble.blend import member_matrix
from spine_ray.ensemble.metric import score_arrays
from spine_ray.ensemble.prior import fit_prior, oof_prior
from spine_ray.run_config import PipelineConfig
from spine_ray.stages.localize import error_summary, variant_member
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


def train_localize(cfg: PipelineConfig) -> pd.DataFrame:
    """Stage 1: the sagittal views, and the axial view placed by the sagittal T2 points.

    The axial localiser trains on label points; its held-out slabs sit on the sagittal T2
    out-of-fold points. When folds are packed into lanes (CPU), axial fold k follows sagittal T2
    fold k in its lane and reads that fold's points: one Tune run for the stage. With one trial
    per fold (GPU), the axial folds start once all sagittal ones are done, on their points table.
    Every stage-1 variant trains alongside the main localisers and writes its own points table;
    returns the main localisers' error summary.
    """
    stage = STAGES["localize"]
    members = cfg.stage1_members()
    sagittal = [j for v, loc in members for view in ("sag_t2", "sag_t1") for j in fold_jobs(cfg, "localize", variant_member(view, v), getattr(loc, view), {})]
    if cfg.resources.packs():
        axial_jobs = [
            dataclasses.replace(j, inputs={"spinal_points": join(fold_dir(t2), "oof.parquet")}, needs=(job_key(t2),))
            for v, loc in members
            for j, t2 in zip(fold_jobs(cfg, "localize", variant_member("axial", v), loc.axial, {}),
                             fold_jobs(cfg, "localize", variant_member("sag_t2", v), loc.sag_t2, {}), strict=True)
        ]
        tables = run_folds(stage, sagittal + axial_jobs, cfg.resources, cfg.samples_dir)
        sag, axial = _by_variant(sagittal, tables[: len(sagittal)]), _by_variant(axial_jobs, tables[len(sagittal) :])
    else:
        sag = _by_variant(sagittal, run_folds(stage, sagittal, cfg.resources, cfg.samples_dir))
        axial_jobs = []
        for v, loc in members:
            spinal_url = join(cfg.run_dir, "localize", variant_member("spinal_points", v) + ".parquet")
            atomic_write_parquet(spinal_url, sag[v][sag[v]["view"] == "sag_t2"])
            axial_jobs += fold_jobs(cfg, "localize", variant_member("axial", v), loc.axial, {"spinal_points": spinal_url})
        axial = _by_variant(axial_jobs, run_folds(stage, axial_jobs, cfg.resources, cfg.samples_dir))
    summaries = {}
    for v, _ in members:
        points = pd.concat([sag[v], axial[v]], ignore_index=True).sort_values(["study_id", "target"]).reset_index(drop=True)
        atomic_write_parquet(points_url(cfg, v), points)
        summaries[v] = error_summary(points)
        summary_url = join(cfg.run_dir, "localize", variant_member("summary", v) + ".json")
        atomic_write_text(summary_url, json.dumps(summaries[v].reset_index().to_dict(orient="records"), indent=2))
    return summaries[""]


def _by_variant(jobs: list[FoldJob], tables: list[pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Fold tables of stage-1 jobs concatenated per variant (the part of the member after '@')."""
    out: dict[str, list[pd.DataFrame]] = {}
    for job, table in zip(jobs, tables, strict=True):
        out.setdefault(job.member.partition("@")[2], []).append(table)
    return {v: pd.concat(ts, ignore_index=True) for v, ts in out.items()}


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
    if not cfg.exclude_labels:
        return {"points": points_url(cfg)}
    read_flags(cfg.exclude_labels)  # a bad table fails here, in one line
    return {"points": points_url(cfg), "exclude_labels": cfg.exclude_labels}


def train_grade(cfg: PipelineConfig, folds: pd.DataFrame) -> dict:
    """Stage 2: every member × fold in parallel; writes oof.parquet and cv.json, returns the CV report."""
    inputs = stage_inputs(cfg, "grade")
    jobs = [j for m in cfg.grade for j in fold_jobs(cfg, "grade", m.name, m, inputs)]
    one = [j for m in cfg.onestage for j in fold_jobs(cfg, "onestage", m.name, m, {})]
    # Graders and one-stage members in one Ray run: neither waits for the other's last fold.
    trained = run_folds(STAGES, jobs + one, cfg.resources, cfg.samples_dir)
    tables, one_tables = trained[: len(jobs)], trained[len(jobs) :]
    if cfg.localize_variants:
        from spine_ray.stages.cross import run_cross

        variants = {v.name: points_url(cfg, v.name) for v in cfg.localize_variants}
        missing = [u for u in variants.values() if not exists(u)]
        if missing:
            raise SchemaError(missing[0], "no points for this stage-1 variant: train the localize stage first")
        tables += run_cross(STAGES["grade"], jobs, variants, cfg.resources, cfg.samples_dir or join(cfg.run_dir, "samples"))
    tables += one_tables
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


def train(cfg: PipelineConfig, stage: str | None = None) -> dict:
    """Run one stage, or every stage in order; returns what each stage reported."""
    stages = TRAINED_IN_ORDER if stage is None else (stage,)
    unknown = [s for s in stages if s not in TRAINED_IN_ORDER]
    if unknown:
        raise SchemaError("--stage", f"unknown stage {unknown[0]!r} (one of {list(TRAINED_IN_ORDER)})")
    cfg = resolved(cfg)
    folds = setup_run(cfg)
    report: dict = {}
    for s in stages:
        match s:
            case "localize":
                report["localize"] = train_localize(cfg)
            case "grade":
                report["grade"] = train_grade(cfg, folds)
    return report


__all__ = ["train", "setup_run", "training_labels", "stage_inputs", "points_url"]
