"""benchmarks/gpu_learn.py: its scoring helpers, the realistic synthesis it trains on, and a tiny run as the bare GPU machine would make it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks import gpu, gpu_learn
from spine_ray.core.schema import LABEL_COLUMNS, PROB_COLUMNS
from spine_ray.ensemble.metric import score_arrays

ROOT = Path(__file__).resolve().parents[1]
# What the bare GPU machine lacks (issue 28): the script must run without any of them.
ABSENT = ("ray", "pydicom", "optuna", "s3fs", "mlflow", "pylibjpeg", "pylibjpeg_rle")


def test_epochs_fit_the_time_at_the_rate_within_one_and_the_recipe() -> None:
    assert gpu_learn.fold_epochs(400, 100.0, 60.0, 20) == 15  # 6,000 samples in the time: 15 epochs of 400
    assert gpu_learn.fold_epochs(400, 100.0, 600.0, 20) == 20  # capped at the recipe's
    assert gpu_learn.fold_epochs(400, 100.0, -5.0, 20) == 1  # no time left: one epoch still


def test_rates_come_from_a_gpu_run_where_measured_else_the_issue(tmp_path: Path) -> None:
    issue = {u.key: u.issue[0] for u in gpu.UNITS}
    assert gpu_learn.unit_rates(None, cuda=True) == issue
    assert gpu_learn.unit_rates(None, cuda=False) == {}
    run = tmp_path / "gpu.json"
    run.write_text(json.dumps({"units": {"grade_convnext": {"fit_samples_per_s": 240.5}, "onestage": {"fit_samples_per_s": None}}}))
    assert gpu_learn.unit_rates(str(run), cuda=True) == {**issue, "grade_convnext": 240.5}


def test_member_probabilities_fall_back_to_the_prior_where_it_predicts_nothing() -> None:
    prior = np.tile(np.array([0.7, 0.2, 0.1]), (len(LABEL_COLUMNS), 1))
    rows = [
        {"row_id": f"7_{LABEL_COLUMNS[0]}", **dict(zip(PROB_COLUMNS, (0.2, 0.2, 0.6), strict=True))},
        {"row_id": f"9_{LABEL_COLUMNS[3]}", **dict(zip(PROB_COLUMNS, (0.0, 1.0, 0.0), strict=True))},
        {"row_id": f"8_{LABEL_COLUMNS[1]}", **dict(zip(PROB_COLUMNS, (1.0, 0.0, 0.0), strict=True))},  # not a held-out study
    ]
    oof = pd.DataFrame(rows).assign(member="m")
    probs, given = gpu_learn.member_probs(oof, [7, 9], prior)
    assert given == 2 and probs.shape == (2, len(LABEL_COLUMNS), 3)
    np.testing.assert_allclose(probs[0, 0], [0.2, 0.2, 0.6])
    np.testing.assert_allclose(probs[1, 3], [0.0, 1.0, 0.0])
    untouched = np.ones(probs.shape[:2], bool)
    untouched[0, 0] = untouched[1, 3] = False
    np.testing.assert_allclose(probs[untouched], np.broadcast_to(prior[0], (int(untouched.sum()), 3)))
    with pytest.raises(ValueError, match="twice"):  # a stage's OOF table holds a row once (`Stage.predict`)
        gpu_learn.member_probs(pd.concat([oof, oof.iloc[:1]]), [7, 9], prior)


def test_a_training_subset_keeps_the_held_out_fold_whole() -> None:
    folds = pd.DataFrame({"study_id": range(20), "fold": [i % 4 for i in range(20)]})
    sub = gpu_learn.training_subset(folds, 1, 6, seed=0)
    assert set(sub.loc[sub["fold"] == 1, "study_id"]) == set(folds.loc[folds["fold"] == 1, "study_id"])
    assert (sub["fold"] != 1).sum() == 6 and sub["study_id"].is_unique
    assert sub.equals(gpu_learn.training_subset(folds, 1, 6, seed=0))  # the same draw for the same seed
    with pytest.raises(SystemExit, match="hold 15 studies"):
        gpu_learn.training_subset(folds, 1, 16, seed=0)


def test_a_finished_synthesis_is_reused_and_another_one_refused(tmp_path: Path, monkeypatch) -> None:
    prep = tmp_path / "prep"
    wide = gpu_learn.prepared_synthesis(prep, 2, 64, 3, 1, "simple")
    monkeypatch.setattr(gpu_learn, "synth_prepared", lambda *a: pytest.fail("synthesised again"))
    assert gpu_learn.prepared_synthesis(prep, 2, 64, 3, 1, "simple").equals(wide)
    with pytest.raises(SystemExit, match="give another --work"):
        gpu_learn.prepared_synthesis(prep, 3, 64, 3, 1, "simple")


def test_the_paired_bootstrap_brackets_the_difference_and_is_zero_for_the_same_predictions() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (30, len(LABEL_COLUMNS)))
    labels[:3, :] = 2  # some severe labels in every condition's columns
    prior = np.full((30, len(LABEL_COLUMNS), 3), 1 / 3)
    better = np.where(np.eye(3, dtype=bool)[labels], 0.6, 0.2)  # 0.6 on the true grade
    assert gpu_learn.paired_bootstrap(labels, prior, prior, 50) == (0.0, 0.0)
    lo, hi = gpu_learn.paired_bootstrap(labels, better, prior, 200)
    diff = score_arrays(labels, better).score - score_arrays(labels, prior).score
    assert lo <= diff <= hi < 0


def test_realistic_synthesis_writes_the_presets_sizes_and_points_on_their_slices(tmp_path: Path) -> None:
    from spine_ray.data.volumes import read_table, read_volumes

    wide = gpu.synth_prepared(tmp_path / "prep", 1, 64, seed=2, workers=1, preset="realistic")
    volumes = read_volumes(str(tmp_path / "prep"))
    assert set(volumes["study_id"]) == set(wide["study_id"])
    assert set(volumes["series_description"]) == {"Sagittal T1", "Sagittal T2/STIR", "Axial T2"}
    sizes = {int(v) for v in (*volumes["rows"], *volumes["cols"])}
    assert sizes <= {384, 448, 512, 640}, sizes  # the realistic preset's acquisition, not the 64 px asked for the simple one
    labels = read_table(str(tmp_path / "prep"), "labels.parquet")
    points = labels[labels["slice"].notna()].merge(volumes[["study_id", "series_id", "n_slices"]], on=["study_id", "series_id"])
    assert len(points) > 10 and (points["slice"] < points["n_slices"]).all()
    assert json.loads((tmp_path / "prep" / "manifest.json").read_text())["config"]["preset"] == "realistic"


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX subprocess environment")
def test_tiny_run_without_the_packages_the_gpu_machine_lacks(tmp_path: Path) -> None:
    out = tmp_path / "learn.json"
    block = "; ".join(f"sys.modules[{name!r}] = None" for name in ABSENT)
    code = (f"import sys; {block}; from benchmarks import gpu_learn; "
            f"gpu_learn.main(['--size', 'tiny', '--preset', 'simple', '--studies', '6', '--folds', '2', '--train-studies', '2', '--epochs', '1', '--device', 'cpu',"
            f" '--bootstrap', '20', '--json', {str(out)!r}, '--work', {str(tmp_path / 'work')!r}])")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    meta = results["meta"]
    assert meta["ray"] is False and meta["held_out"] == 3 and meta["studies"] == 6  # Ray not importable: the in-process driver
    assert meta["train_studies"] == 2  # --train-studies: 2 of the other fold's 3
    assert results["oracle"]["score"] < results["prior"]["score"]
    assert set(results["members"]) == {"grade/convnext_small", "onestage/onestage_convnext_small"}
    for name, r in results["members"].items():
        assert r["epochs"] == 1 and len(r["train_loss"]) == 1 and math.isfinite(r["score"]), name
        lo, hi = r["minus_prior_5_95"]
        assert lo <= hi and math.isclose(r["minus_prior"], r["score"] - results["prior"]["score"])
    # The one-stage member grades spinal and foraminal targets only (15 a study); the grader every slot it has.
    assert 0 < results["members"]["onestage/onestage_convnext_small"]["targets_predicted"] <= 3 * 15
    assert results["members"]["grade/convnext_small"]["targets_predicted"] > 3 * 15
    assert "| grade/convnext_small | 1 of " in done.stdout and "| oracle |" in done.stdout
