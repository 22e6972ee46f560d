"""End to end: a reduced `spine-ray demo` (synthesise → prepare → train → tune-ensemble → infer →
score) on a tiny synthetic set with the smoke config, then checks of each output and the fallbacks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spine_ray.core.config import load
from spine_ray.core.schema import N_TARGETS, read_labels, read_series, read_submission
from spine_ray.ensemble.metric import score_frames
from spine_ray.infer import infer
from spine_ray.run_config import PipelineConfig

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(smoke_demo):
    return smoke_demo


@pytest.fixture(scope="module")
def smoke_run(demo):
    out, _ = demo
    run = out / "run"
    return run, load(PipelineConfig, run / "config.yaml"), json.loads((run / "cv.json").read_text())


@pytest.fixture(scope="module")
def synthetic_data(demo):
    return demo[0] / "data"


def test_demo_summary_is_consistent_with_its_files(demo):
    out, summary = demo
    assert set(summary) >= {"prior", "members", "blend_cv", "test_score", "oracle", "gap_closed", "seconds", "report"}
    assert json.loads((out / "summary.json").read_text()) == summary
    assert set(summary["seconds"]) == {"synthesise", "prepare", "train", "tune-ensemble", "infer", "report"}
    assert Path(summary["report"]).is_file()
    labels = read_labels(str(out / "data" / "test_labels.csv"))
    assert summary["test_score"] == pytest.approx(score_frames(labels, read_submission(str(out / "submission.csv"))).score)
    assert summary["gap_closed"] == pytest.approx((summary["prior"] - summary["test_score"]) / (summary["prior"] - summary["oracle"]))
    blend = json.loads((out / "run" / "blend.json").read_text())
    # The blend never does worse than the best single member on the folds it was fitted on.
    scores = blend["scores"]
    best = min(v["score"] for k, v in scores.items() if k.startswith("member "))
    assert scores["blend, fitted on all folds (in-sample)"]["score"] <= best + 1e-9
    assert (out / "README.md").exists()


def test_stage1_points_are_out_of_fold_for_every_study_and_view(smoke_run, demo):
    run, _, _ = smoke_run
    points = pd.read_parquet(run / "localize" / "points.parquet")
    labels = pd.read_parquet(demo[0] / "prepared" / "labels.parquet")
    assert set(points["study_id"]) == set(labels["study_id"])
    assert set(points["view"]) == {"sag_t2", "sag_t1", "axial"}
    summary = json.loads((run / "localize" / "summary.json").read_text())
    assert {r["view"] for r in summary} == {"sag_t2", "sag_t1", "axial"}
    # Every point is out-of-fold: predicted by the model of the fold that held its study out.
    folds = pd.read_parquet(run / "folds.parquet").set_index("study_id")["fold"]
    assert (points["fold"].to_numpy() == folds.loc[points["study_id"]].to_numpy()).all()


def test_train_writes_oof_for_every_member_and_cv(smoke_run):
    run, cfg, report = smoke_run
    oof = pd.read_parquet(run / "oof.parquet")
    folds = pd.read_parquet(run / "folds.parquet").set_index("study_id")["fold"]
    assert set(oof["member"]) == {"a", "b", "a@s1", "b@s1", "one"}
    assert not oof.duplicated(["member", "row_id"]).any()  # every row_id at most once per member
    assert (oof["fold"].to_numpy() == folds.loc[oof["study_id"]].to_numpy()).all()  # out-of-fold
    assert np.allclose(oof[["normal_mild", "moderate", "severe"]].sum(axis=1), 1, atol=1e-5)
    cv = json.loads((run / "cv.json").read_text())
    assert set(cv["members"]) == {"a", "b", "a@s1", "b@s1", "one"} and "prior" in cv and "oracle" in cv
    assert cv["oracle"]["score"] < cv["prior"]["score"]
    assert report == cv


def test_cross_members_are_the_trained_graders_on_the_variant_points(smoke_run):
    run, cfg, _ = smoke_run
    oof = pd.read_parquet(run / "oof.parquet").set_index(["member", "row_id"]).sort_index()
    main, variant = (pd.read_parquet(run / "localize" / f) for f in ("points.parquet", "points@s1.parquet"))
    # The variant's localisers are their own models (another seed), so their points differ ...
    both = main.merge(variant, on=["study_id", "target"], suffixes=("", "_v"))
    assert len(both) and not np.allclose(both[["row", "col"]].to_numpy(), both[["row_v", "col_v"]].to_numpy())
    assert (run / "localize" / "summary@s1.json").exists() and (run / "localize" / "sag_t2@s1" / "fold1" / "model.pt").exists()
    # ... and the cross member is the same grader (no training of its own) predicting out-of-fold on them.
    assert not (run / "grade" / "a@s1").exists()
    for m in ("a", "b"):
        own, cross = oof.loc[m], oof.loc[f"{m}@s1"]
        shared = own.index.intersection(cross.index)
        assert len(shared) and (own.loc[shared, "fold"] == cross.loc[shared, "fold"]).all()
        assert not np.allclose(own.loc[shared, ["normal_mild", "moderate", "severe"]], cross.loc[shared, ["normal_mild", "moderate", "severe"]])
    blend = json.loads((run / "blend.json").read_text())
    assert set(blend["blend"]["members"]) == {"a", "b", "a@s1", "b@s1", "one"}  # tune-ensemble weighs every pair


def test_the_one_stage_member_predicts_the_sagittal_targets_out_of_fold(smoke_run):
    from spine_ray.stages.localize import FORAMINAL, SPINAL

    run, _, report = smoke_run
    oof = pd.read_parquet(run / "oof.parquet")
    one = oof[oof["member"] == "one"]
    assert len(one) and set(one["row_id"].str.split("_", n=1).str[1]) <= set(SPINAL) | set(FORAMINAL)
    folds = pd.read_parquet(run / "folds.parquet").set_index("study_id")["fold"]
    assert (one["fold"].to_numpy() == folds.loc[one["study_id"]].to_numpy()).all()
    assert report["filled_from_prior"]["one"] >= 10 * len(folds)  # subarticular rows come from the prior
    assert (run / "onestage" / "one" / "fold1" / "model.pt").exists()
    blend = json.loads((run / "blend.json").read_text())
    assert "one" not in blend["eligible"]["subarticular"]  # it does not enter a group it does not predict


def test_infer_writes_a_complete_valid_submission(smoke_run, synthetic_data, tmp_path):
    synthetic = synthetic_data
    run, _, _ = smoke_run
    out = tmp_path / "submission.csv"
    rep = infer(str(synthetic), str(run), str(out), "test")
    studies = read_series(str(synthetic / "test_series_descriptions.csv"))["study_id"].unique()
    sub = read_submission(str(out), study_ids=studies)
    assert len(sub) == len(studies) * N_TARGETS
    assert rep.studies == len(studies) and rep.fallback_studies == 0


def test_missing_series_and_corrupt_study_fall_back_to_the_prior(smoke_run, synthetic_data, tmp_path):
    synthetic = synthetic_data
    run, _, _ = smoke_run
    data = tmp_path / "data"
    shutil.copytree(synthetic, data, ignore=shutil.ignore_patterns("train_images"))
    series = read_series(str(data / "test_series_descriptions.csv"))
    no_t1, corrupt = sorted(series["study_id"].unique())[:2]
    for s in series[(series.study_id == no_t1) & (series.series_description == "Sagittal T1")].series_id:
        shutil.rmtree(data / "test_images" / str(no_t1) / str(s))
    for f in (data / "test_images" / str(corrupt)).rglob("*.dcm"):
        f.write_bytes(b"not a dicom file")
    out = tmp_path / "submission.csv"
    rep = infer(str(data), str(run), str(out), "test")
    sub = read_submission(str(out), study_ids=series["study_id"].unique())
    assert len(sub) == series["study_id"].nunique() * N_TARGETS
    prior = pd.read_csv(run / "prior.csv").set_index("target")
    bad = sub[sub.row_id.str.startswith(f"{corrupt}_")]
    bad = bad.set_index(bad.row_id.str.split("_", n=1).str[1])
    assert np.allclose(bad.loc[prior.index, ["normal_mild", "moderate", "severe"]].to_numpy(), prior.to_numpy())
    assert rep.fallback_studies == 1
    assert str(corrupt) in rep.notes and str(no_t1) in rep.notes
    assert "no files" in rep.notes[str(no_t1)]
    # Without Sagittal T1 the 10 foraminal targets come from the prior; the rest are predicted.
    assert rep.notes[str(no_t1)].startswith("10 targets from the prior")
    assert json.loads(Path(str(out) + ".report.json").read_text())["fallback_studies"] == 1


def test_two_step_member_keeps_its_best_auc_epoch_under_ray_train(smoke_run):
    # `spine-ray train` trains through Ray Train workers: they validate after every epoch as the
    # in-process driver does, so step 1 of a `select: auc` member keeps its best-AUC epoch.
    run, cfg, _ = smoke_run
    member = next(m for m in cfg.grade if m.two_step is not None and m.two_step.select == "auc")
    selected = 0
    for k in range(cfg.folds):
        fold = run / "grade" / member.name / f"fold{k}"
        rows = [json.loads(line) for line in (fold / "metrics.jsonl").read_text().splitlines()]
        step1 = [r for r in rows if r["phase"] == 0]
        assert [r["epoch"] for r in step1] == list(range(member.train.epochs))  # step 2's epochs did not overwrite them
        assert [r["phase"] for r in rows].count(1) == member.two_step.epochs
        done = json.loads((fold / "done.json").read_text())
        if all("val_auc" in r for r in step1):  # a held-out split with both classes
            assert done["selected"] == {"phase0_selected_epoch": int(np.argmax([r["val_auc"] for r in step1]))}
            selected += 1
    assert selected, "no fold validated its two-step member under Ray Train"


def test_every_stage_trains_in_one_schedule_and_stage_two_starts_before_stage_one_ends(smoke_run):
    # One Tune run for the whole run: a grade fold starts once its localisers' fold is done, a
    # cross prediction once its grader fold is, a one-stage fold whenever a slot is free.
    run, cfg, _ = smoke_run
    assert len([p for p in (run / "ray" / "tune").iterdir() if p.is_dir()]) == 1
    spans = {(stage, d.parent.name, int(d.name.removeprefix("fold"))): json.loads((d / "done.json").read_text())["timeline"]
             for stage in ("localize", "grade", "onestage", "cross") for d in (run / stage).glob("*/fold*")}
    assert {s for s, _, _ in spans} == {"localize", "grade", "onestage", "cross"}
    for (stage, member, k), t in spans.items():
        if stage == "grade":
            assert all(spans[("localize", view, k)]["finished"] <= t["job_started"] for view in ("sag_t2", "sag_t1", "axial"))
        if stage == "cross":
            assert spans[("grade", member.partition("@")[0], k)]["finished"] <= t["job_started"]
    # No stage barrier: stage 2 starts while stage 1 still trains (here the stage-1 variant's folds).
    assert min(t["job_started"] for (s, _, _), t in spans.items() if s == "grade") < max(
        t["finished"] for (s, _, _), t in spans.items() if s == "localize")
    assert len({t["worker_started"] for t in spans.values()}) < len(spans) / 4  # lanes: a slot's Ray Train workers take job after job


def test_every_member_predicts_in_its_training_precision(smoke_run, demo, monkeypatch):
    """Inference (and OOF, validation: the same stage functions) runs each member under its training autocast, which
    takes effect on CUDA; here it is let act on the CPU: every member's probabilities move by bf16's rounding, no more."""
    from spine_ray.data.volumes import read_volumes
    from spine_ray.engine import train_loop
    from spine_ray.infer import StudyPredictor

    run, cfg, _ = smoke_run
    assert all(m.config.train.amp and m.config.train.amp_dtype == "bfloat16" for m in cfg.members())  # the defaults
    volumes = read_volumes(str(demo[0] / "prepared"))
    study = volumes[volumes["study_id"] == volumes["study_id"].iloc[0]]
    predictor = StudyPredictor(str(run))
    full, masks = predictor.member_probs(study)
    monkeypatch.setattr(train_loop, "AMP_DEVICES", ("cuda", "cpu"))
    half, half_masks = predictor.member_probs(study)
    assert set(half) == set(full) == {"a", "b", "a@s1", "b@s1", "one"}
    for name in full:
        assert np.array_equal(masks[name], half_masks[name]), name
        assert np.isfinite(half[name]).all() and np.allclose(half[name].sum(-1), 1, atol=1e-3), name
        assert not np.array_equal(half[name], full[name]), f"{name} did not run under autocast"
        assert np.abs(half[name] - full[name]).max() < 0.05, name
