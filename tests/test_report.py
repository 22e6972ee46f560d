"""`spine-ray report`: its statistics against the metric, points drawn where they are, the report of a
smoke run (every section, numbers equal to cv.json and the metric), MLflow runs, and the page in a
real headless browser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from spine_ray.core.schema import LEVELS, N_TARGETS, SEVERITY_WEIGHTS
from spine_ray.ensemble.metric import score_arrays
from spine_ray.report import plots
from spine_ray.report.build import (
    calibration,
    condition_confusions,
    grade_scores,
    roc_auc,
    target_logloss,
)
from spine_ray.report.studies import reformat, study_panels

SECTIONS = ["summary", "conditions", "calibration", "localize", "studies", "training", "timeline", "blend"]


def _random_run(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    probs = rng.dirichlet([2, 1, 0.5], size=(n, N_TARGETS))
    labels = (rng.random((n, N_TARGETS, 1)) > probs.cumsum(-1)).sum(-1)
    labels[rng.random((n, N_TARGETS)) < 0.1] = -1  # some unlabelled targets
    return labels, probs


def test_per_target_log_losses_add_up_to_the_metrics_group_parts():
    labels, probs = _random_run()
    score = score_arrays(labels, probs)
    w = np.where(labels >= 0, np.asarray(SEVERITY_WEIGHTS)[np.maximum(labels, 0)], 0.0).sum(0)  # weight per target
    ll = np.array([target_logloss(labels, probs, t) for t in range(N_TARGETS)])
    for part, cols in (("spinal", slice(0, 5)), ("foraminal", slice(5, 15)), ("subarticular", slice(15, 25))):
        assert (ll[cols] * w[cols]).sum() / w[cols].sum() == pytest.approx(getattr(score, part))


def test_auc_confusion_and_grade_scores_on_known_cases():
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert roc_auc(np.array([0, 0, 1, 1]), np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert roc_auc(np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 0.75
    assert np.isnan(roc_auc(np.array([1, 1]), np.array([0.1, 0.2])))
    cm = np.array([[8, 2, 0], [1, 3, 0], [0, 1, 1]])
    g = grade_scores(cm)
    assert g["Normal/Mild"]["precision"] == pytest.approx(8 / 9) and g["Normal/Mild"]["recall"] == pytest.approx(0.8)
    assert g["Severe"]["f1"] == pytest.approx(2 * 1 * 0.5 / 1.5) and g["Moderate"]["support"] == 4
    labels, probs = _random_run()
    cms = condition_confusions(labels, probs)
    assert sum(int(m.sum()) for m in cms.values()) == int((labels >= 0).sum())


def test_calibration_error_is_small_for_calibrated_and_large_for_overconfident_predictions():
    labels, probs = _random_run(n=400)
    _, calibrated = calibration(labels, probs)
    sharp = probs**4 / (probs**4).sum(-1, keepdims=True)
    _, overconfident = calibration(labels, sharp)
    assert max(calibrated) < 0.03 and min(overconfident) > max(calibrated) and max(overconfident) > 0.1


def test_points_are_drawn_into_the_pixels_where_they_are():
    image = np.zeros((40, 50))
    rgb = plots.overlay(image, pred=[(10, 20)], gt=[(30, 5)], scale=3)
    assert rgb.shape == (120, 150, 3)
    centre = (10 * 3 + 1, 20 * 3 + 1)  # the middle of native pixel (10, 20) at 3×
    assert tuple(rgb[centre]) == (255, 48, 48)
    r = max(3, 2 * 3) + 1
    assert tuple(rgb[30 * 3 + 1, 5 * 3 + 1 + r]) == (48, 255, 96)  # the ring around the ground truth
    assert tuple(rgb[30 * 3 + 1, 5 * 3 + 1]) == (0, 0, 0)  # ...whose centre is left visible
    assert (rgb[:, :, 0] == 255).sum() > 0 and (rgb[60:, 60:] == 0).all()  # nothing drawn elsewhere


def test_reformat_through_the_affine_reproduces_a_slice_of_the_same_volume():
    rng = np.random.default_rng(0)
    vol = rng.integers(0, 1000, (6, 8, 9)).astype(np.uint16)
    aff = np.diag([3.0, 0.7, 0.7, 1.0])
    aff[:3, 3] = [10, -5, 2]
    meta = {"affine": aff}
    assert np.array_equal(reformat(meta, (8, 9), 2, [(vol, meta)]), vol[2])
    # The same voxels stored in reverse slice order, with the affine that says so.
    flipped = aff.copy()
    flipped[:3, 0] *= -1
    flipped[:3, 3] = aff[:3, 3] + 5 * aff[:3, 0]
    assert np.array_equal(reformat(meta, (8, 9), 2, [(vol[::-1], {"affine": flipped})]), vol[2])
    assert np.isnan(reformat(meta, (8, 9), 2, [(vol[:2], meta)])).all()  # the plane misses a thinner stack


# ---------------------------------------------------------------- on a smoke run

@pytest.fixture(scope="module")
def report(smoke_demo):
    out, summary = smoke_demo
    return Path(summary["report"]).parent, out


@pytest.mark.slow
def test_report_has_every_section_and_the_numbers_of_the_run(report):
    folder, out = report
    rep = json.loads((folder / "report.json").read_text())
    page = (folder / "index.html").read_text()
    assert rep["sections"] == SECTIONS
    for key in SECTIONS:
        assert f'<section id="{key}">' in page
    cv = json.loads((out / "run" / "cv.json").read_text())
    blend = json.loads((out / "run" / "blend.json").read_text())
    assert rep["scores"]["prior (out-of-fold)"] == cv["prior"] and rep["scores"]["oracle"] == cv["oracle"]
    for m, s in cv["members"].items():
        assert rep["scores"][f"member {m}"] == s
        assert f"{s['score']:.4f}" in page
    # What the per-target tables grade is the blend blend.json reports, scored by the metric.
    assert rep["graded"] == "blend"
    assert rep["scores"]["graded here: blend"] == pytest.approx(blend["scores"]["blend, fitted on all folds (in-sample)"])
    summary = json.loads((out / "summary.json").read_text())
    assert rep["held_out"]["test_score"] == summary["test_score"]
    assert rep["localize"] == json.loads((out / "run" / "localize" / "summary.json").read_text())
    labels = pd.read_csv(out / "run" / "train_labels.csv")
    assert sum(sum(map(sum, m)) for m in rep["confusion"].values()) == int(labels.drop(columns="study_id").notna().sum().sum())
    # Training curves: one row per fold and epoch of every model (smoke: 2 folds; 1 epoch for 3 views ×
    # 2 stage-1 members, grader a and the one-stage member; grader b trains 2 + 1 epochs in two steps;
    # the cross members a@s1, b@s1 train nothing).
    t = pd.DataFrame(rep["training"])
    assert len(t) == 2 * (3 * 2 + 1 + 3 + 1) and {"train_loss", "epoch_s"} <= set(t.columns)
    assert {"sag_t2", "sag_t2@s1"} <= set(t["member"])
    # Timeline: a bar per fold job (2 folds of 6 localisers, 2 graders, 1 one-stage member, 2 cross
    # predictions), one row per slot of the schedule (2 CPU lanes), bars on a row never overlapping.
    tl = pd.DataFrame(rep["timeline"]["folds"])
    assert len(tl) == 2 * (6 + 2 + 1 + 2) and set(tl["stage"]) == {"localize", "grade", "onestage", "cross"}
    assert sorted(tl["slot"].unique()) == [0, 1]
    for _, row in tl.groupby("slot"):
        spans = row.sort_values("start")[["start", "end"]].to_numpy()
        assert (spans[1:, 0] >= spans[:-1, 1]).all()
    assert 0 < rep["timeline"]["busy"] <= 1 and rep["timeline"]["slots"] == tl["slot"].nunique()
    assert rep["blend"] == blend["blend"]
    assert rep["infer"]["studies"] == 3
    for src in re.findall(r'<img src="([^"]+)"', page):
        assert (folder / src).stat().st_size > 1000, src
    assert len(rep["pictures"]) >= 2 and all(p["images"] for p in rep["pictures"])


@pytest.mark.slow
def test_a_known_point_of_a_synthetic_study_is_drawn_on_its_slice(smoke_demo):
    out, _ = smoke_demo
    labels = pd.read_parquet(out / "prepared" / "labels.parquet")
    gt = labels[(labels.condition == "spinal_canal_stenosis") & labels["slice"].notna()].iloc[0]
    points = pd.DataFrame([{
        "study_id": gt.study_id, "target": f"spinal_canal_stenosis_{gt.level}", "view": "sag_t2", "series_id": gt.series_id,
        "stack": gt.stack, "slice": gt.slice, "row": gt.row, "col": gt.col, "x_mm": gt.x_mm, "y_mm": gt.y_mm, "z_mm": gt.z_mm,
        "gt_slice": gt.slice, "gt_row": gt.row, "gt_col": gt.col,
    }])
    from spine_ray.data.volumes import read_volumes

    panels = study_panels(read_volumes(str(out / "prepared"), filters=[("study_id", "=", int(gt.study_id))]), points)
    rgb = panels[0]["rgb"]
    s = rgb.shape[0] // 64
    centre = (int(round((gt.row + 0.5) * s - 0.5)), int(round((gt.col + 0.5) * s - 0.5)))
    assert tuple(rgb[centre]) == (255, 48, 48)
    assert panels[0]["title"] == f"sag T2, slice {int(gt.slice)}"
    assert LEVELS  # the label level names the target drawn


@pytest.mark.slow
def test_every_training_fold_and_blend_search_is_in_mlflow(smoke_demo):
    import os

    from mlflow.tracking import MlflowClient

    out, _ = smoke_demo
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file://{out / 'run' / 'mlruns'}")
    names = {e.name: e.experiment_id for e in client.search_experiments()}
    # One experiment for the run's one schedule of fold jobs, one MLflow run per trained fold.
    assert {"spine-ray/train", "spine-ray/tune-ensemble-blend-batched"} <= set(names)
    blends = client.search_runs([names["spine-ray/tune-ensemble-blend-batched"]])
    # One trial per candidate structure (per-level temperatures × clip), each with its held-out score.
    # (On 6 studies the held-out halves' scores are large and unstable: logged finite is what is checked.)
    assert len(blends) == 4 and all(0 < r.data.metrics["held_out"] < float("inf") for r in blends)
    runs = client.search_runs([names["spine-ray/train"]])
    views = [f"{v}{s}" for v in ("sag_t2", "sag_t1", "axial") for s in ("", "@s1")]
    assert sorted(r.info.run_name for r in runs) == sorted(f"{m}-fold{k}" for m in (*views, "a", "b", "one") for k in (0, 1))
    stage2 = [r for r in runs if r.info.run_name.split("-fold")[0] in ("a", "b", "one")]
    grade = [r for r in stage2 if r.info.run_name.split("-fold")[0] in ("a", "b")]
    assert len(grade) == 2 * 2  # two members × two folds: one run per fold, though two lanes trained them
    assert len({r.info.run_name for r in grade}) == 4 and all(r.info.run_name == r.data.params["fold"] for r in grade)
    for r in grade:
        assert "train_loss" in r.data.metrics and "epoch_s" in r.data.metrics
        assert r.data.params["model/backbone"] in ("resnet10t", "test_resnet") and "train/lr" in r.data.params


@pytest.mark.slow
def test_report_opens_in_a_headless_browser_with_every_image(report, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    folder, _ = report
    # A copy of the page that, once loaded, writes how many images failed into the DOM.
    check = folder / "_check.html"
    check.write_text((folder / "index.html").read_text().replace(
        "</body>",
        "<script>window.addEventListener('load',()=>{const i=[...document.images];"
        "document.body.insertAdjacentHTML('beforeend',`<p id=check>images=${i.length} broken=${i.filter(x=>!x.complete||x.naturalWidth===0).length}</p>`)})</script></body>",
    ))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage", "--virtual-time-budget=10000", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([chromium, *flags, "--dump-dom", check.as_uri()], capture_output=True, text=True, timeout=120).stdout
    found = re.search(r"images=(\d+) broken=(\d+)", dom)
    assert found, dom[-500:]
    assert int(found[1]) >= 10 and int(found[2]) == 0
    shot = tmp_path / "page.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1280,2000", (folder / "index.html").as_uri()], capture_output=True, timeout=120)
    from matplotlib.image import imread

    pixels = imread(shot)
    ink = (pixels[..., :3] < 0.8).any(axis=-1).mean()  # share of pixels that are not (near) white
    assert pixels.shape[0] == 2000 and ink > 0.05, ink
    check.unlink()


def test_report_of_a_folder_that_is_not_a_run_is_one_line(tmp_path):
    import sys

    r = subprocess.run([sys.executable, "-m", "spine_ray.cli", "report", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "not a training run directory" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
