"""Tracking: per-epoch metrics survive a resumed fold without duplicates; MLflow goes where it is told."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from spine_ray.engine.tracking import (
    METRICS_FILE,
    flatten,
    set_tracking_uri,
    tracking_uri,
    tune_callbacks,
    write_epoch,
)


def read_epochs(fold_dir: str) -> list[dict[str, Any]]:
    """A fold's metrics.jsonl rows, oldest first ([] when it has none)."""
    path = Path(fold_dir, METRICS_FILE)
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def test_a_resumed_fold_replaces_the_epochs_it_trains_again(tmp_path):
    fold = str(tmp_path / "grade" / "a" / "fold0")
    for e in range(3):
        write_epoch(fold, {"epoch": e, "train_loss": np.float32(1.0 - e / 10), "phase": 0})
    write_epoch(fold, {"epoch": 1, "train_loss": 0.5, "phase": 0})  # restarted from epoch 0's checkpoint
    rows = read_epochs(fold)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[1] == {"epoch": 1, "train_loss": 0.5, "phase": 0}
    assert read_epochs(str(tmp_path / "nothing")) == []


def test_a_second_training_step_keeps_the_first_steps_epochs(tmp_path):
    # Epochs count from 0 again in step 2 (two-step training): (phase, epoch) orders them.
    fold = str(tmp_path / "grade" / "a" / "fold0")
    for phase, epoch in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        write_epoch(fold, {"epoch": epoch, "phase": phase})
    write_epoch(fold, {"epoch": 1, "phase": 1, "resumed": True})
    assert [(r["phase"], r["epoch"]) for r in read_epochs(fold)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert read_epochs(fold)[-1]["resumed"]


def test_tracking_goes_to_the_run_dir_unless_told_otherwise(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("SPINE_RAY_TRACKING_URI", "")  # unset; restored after the test, whatever --tracking-uri sets below
    monkeypatch.setattr("spine_ray.engine.tracking._ENV_URI", "")
    assert tracking_uri(str(tmp_path / "run")) == f"file://{tmp_path / 'run' / 'mlruns'}"
    assert tracking_uri("s3://bucket/run") == ""  # no file store beside a remote run: off unless a server is given
    # Ray's callback sets MLflow's URI for a run, and MLflow writes it into MLFLOW_TRACKING_URI:
    # the next run in this process must still log beside its own run dir.
    mlflow.set_tracking_uri(f"file://{tmp_path / 'first' / 'mlruns'}")
    assert tracking_uri(str(tmp_path / "second")) == f"file://{tmp_path / 'second' / 'mlruns'}"
    mlflow.set_tracking_uri(None)
    set_tracking_uri("http://mlflow.internal:5000")  # --tracking-uri
    assert tracking_uri("s3://bucket/run") == "http://mlflow.internal:5000"
    (cb,) = tune_callbacks(str(tmp_path / "run"), "train-grade")
    assert cb.tracking_uri == "http://mlflow.internal:5000" and cb.experiment_name == "spine-ray/train-grade"
    monkeypatch.setenv("SPINE_RAY_TRACKING", "0")
    assert tune_callbacks(str(tmp_path / "run"), "x") == []


def test_nested_configs_become_one_parameter_per_value():
    assert flatten({"model": {"backbone": "resnet10t", "dims": [1, 2]}, "lr": 0.1}) == {"model/backbone": "resnet10t", "model/dims": [1, 2], "lr": 0.1}

