"""The command line: help, scoring, and one-line errors for user mistakes."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from spine_ray.core.schema import labels_from_matrix, submission_frame

CLI = [sys.executable, "-m", "spine_ray.cli"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def test_help_lists_commands():
    r = run("--help")
    assert r.returncode == 0
    for cmd in ("score", "baseline"):
        assert cmd in r.stdout


def test_score_and_baseline(tmp_path):
    rng = np.random.default_rng(0)
    studies = list(range(1, 41))
    labels = labels_from_matrix(studies, rng.choice(3, size=(40, 25), p=[0.7, 0.2, 0.1]).astype(np.int8))
    labels.to_csv(tmp_path / "train.csv", index=False)
    submission_frame(studies, np.full((40, 25, 3), 1 / 3)).to_csv(tmp_path / "sub.csv", index=False)
    r = run("score", str(tmp_path / "sub.csv"), "--labels", str(tmp_path / "train.csv"))
    assert r.returncode == 0, r.stderr
    assert "1.09" in r.stdout  # each group log(3) ≈ 1.0986
    r = run("baseline", "--labels", str(tmp_path / "train.csv"), "--folds", "4", "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "b" / "prior.csv").exists() and (tmp_path / "b" / "oof_prior.csv").exists()


def test_user_mistakes_are_one_line(tmp_path):
    r = run("score", str(tmp_path / "missing.csv"), "--labels", str(tmp_path / "missing.csv"))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "file not found" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (tmp_path / "bad.csv").write_text("study_id,foo\n1,2\n")
    r = run("baseline", "--labels", str(tmp_path / "bad.csv"))
    assert r.returncode == 2 and "missing columns" in r.stderr and "Traceback" not in r.stderr
