"""Experiment tracking and per-epoch metrics: MLflow through Ray's integration, and a metrics table per fold.

Every Ray Tune run (the fold trials of `spine-ray train`, the trials of `tune-lr`, the blend
searches of `tune-ensemble`) gets `tune_callbacks(...)` in its RunConfig: Ray's
`MLflowLoggerCallback` logs each trial's config as parameters and each reported result as metrics,
one MLflow run per trial, so runs can be compared side by side (`mlflow ui --backend-store-uri …`).

Where it logs: `--tracking-uri` (or MLFLOW_TRACKING_URI as this process found it) when given, else
a local file store `{run_dir}/mlruns`. MLflow's own `set_tracking_uri` (which Ray's callback calls for
every run) writes MLFLOW_TRACKING_URI into the environment, so that variable cannot say where the
*next* run should log: the user's choice is kept in SPINE_RAY_TRACKING_URI instead (inherited by
subprocesses and Ray jobs), and MLFLOW_TRACKING_URI is read once, when this module is imported. The file store needs no server and no database driver, which is why
`mlflow-skinny` is enough; MLflow ≥ 3.7 refuses it unless MLFLOW_ALLOW_FILE_STORE is set, so we set
it for the file store only.

`write_epoch` keeps each fold's per-epoch metrics (as Ray Train reported them) in
`{fold_dir}/metrics.jsonl`, which `spine-ray report` draws as training curves.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

from spine_ray.core.storage import absolute, atomic_write_text, exists, is_local, join, read_text

METRICS_FILE = "metrics.jsonl"


# What the user's environment said before MLflow (which rewrites it for every run it sets up) ran here.
_ENV_URI = os.environ.get("MLFLOW_TRACKING_URI", "")


def tracking_uri(run_dir: str) -> str:
    """The user's tracking URI when one was given, else the file store `{run_dir}/mlruns` (local run dirs only)."""
    uri = os.environ.get("SPINE_RAY_TRACKING_URI", "") or _ENV_URI
    if uri:
        return uri
    if not is_local(run_dir):
        return ""  # an s3:// run dir has no file store beside it: set --tracking-uri to a server
    return "file://" + join(absolute(run_dir), "mlruns")


def tune_callbacks(run_dir: str, experiment: str, part: Callable[[dict[str, Any], dict[str, Any]], tuple[str, dict[str, Any]]] | None = None) -> list[Any]:
    """Callbacks for a Ray Tune RunConfig that log every trial to MLflow (none if tracking is off).

    `part` maps a trial's config and one of its results to the name and parameters of what that
    result belongs to: a fold trial's whole model and training config (where the trial's own config
    only names the fold), or, in a lane that trains several folds in turn, the fold it came from.
    Each part gets its own MLflow run, named after it: one run per fold either way.
    """
    uri = tracking_uri(run_dir)
    if not uri or os.environ.get("SPINE_RAY_TRACKING", "1") == "0":
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class _Logger(MLflowLoggerCallback):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._parts: dict[Any, str] = {}  # trial → the part (fold) its MLflow run is for

        def log_trial_start(self, trial: Any) -> None:
            if part is None:
                super().log_trial_start(trial)

        def log_trial_result(self, iteration: int, trial: Any, result: dict) -> None:
            if part is not None:
                name, params = part(trial.config, result)
                if self._parts.get(trial) != name:  # the trial's first result, or the next fold of its lane
                    if trial in self._trial_runs:
                        self.mlflow_util.end_run(run_id=self._trial_runs[trial], status="FINISHED")
                    run = self.mlflow_util.start_run(tags={**self.tags, "trial_name": str(trial)}, run_name=name)
                    self._trial_runs[trial] = run.info.run_id
                    self.mlflow_util.log_params(run_id=run.info.run_id, params_to_log={"fold": name, **flatten(params)})
                    self._parts[trial] = name
            super().log_trial_result(iteration, trial, result)

        def log_trial_end(self, trial: Any, failed: bool = False) -> None:
            if trial in self._trial_runs:  # a trial that failed before its first result has no run
                super().log_trial_end(trial, failed)

    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return [_Logger(tracking_uri=uri, experiment_name=f"spine-ray/{experiment}", tags={"run_dir": run_dir}, save_artifact=False)]


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config → flat `a/b/c` keys, so that MLflow shows (and compares) each value as its own parameter."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= flatten(v, f"{prefix}{k}/")
        else:
            out[f"{prefix}{k}"] = v
    return out


def set_tracking_uri(uri: str | None) -> None:
    """Make `--tracking-uri` the tracking URI of this process (and of what it starts)."""
    if uri:
        os.environ["SPINE_RAY_TRACKING_URI"] = uri


def write_epoch(fold_dir: str, metrics: dict[str, Any]) -> None:
    """Add one epoch's metrics to `{fold_dir}/metrics.jsonl`, replacing that epoch and later ones (a resumed fold).

    Epochs count from 0 in each training step (`phase`), so an epoch is ordered by (phase, epoch).
    """
    path = join(fold_dir, METRICS_FILE)
    at = (int(metrics.get("phase", 0)), int(metrics["epoch"]))
    old = [json.loads(line) for line in (read_text(path).splitlines() if exists(path) else []) if line]
    kept = [json.dumps(r) for r in old if (int(r.get("phase", 0)), int(r["epoch"])) < at]
    row = {k: (v.item() if hasattr(v, "item") else v) for k, v in metrics.items()}  # numpy scalars → JSON
    atomic_write_text(path, "\n".join([*kept, json.dumps(row)]) + "\n")
