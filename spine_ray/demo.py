"""`spine-ray demo`: the whole system on the synthetic default, in one command.

synthesise a train and a test set → prepare both → train every stage (two grade members) →
tune the ensemble blend → infer on the test studies → score against their labels → write the
HTML report into the run. Prints one table (prior, each member, blend, test score, oracle, share
of the prior→oracle gap closed) and the time of each step, and writes `summary.json` and a README
into the output folder.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from spine_ray.core.config import from_dict, load
from spine_ray.core.storage import atomic_write_text, exists, join

RUN_README = """# spine-ray demo run

What each file is (every table is Parquet or CSV with documented columns; see the project README):

- `data/` — the synthetic dataset in the Kaggle layout: `train_images/`, `test_images/`,
  `train.csv`, `train_label_coordinates.csv`, `*_series_descriptions.csv`, `test_labels.csv`
  (the held-out labels), `oracle_submission.csv` (Bayes-optimal test probabilities).
- `prepared/`, `prepared_test/` — `spine-ray prepare` outputs: `volumes/` (one row per image stack),
  `labels.parquet` (train), `errors.parquet`, `manifest.json` (written last).
- `run/` — `spine-ray train`: `config.yaml`, `folds.parquet`, `train_labels.csv`, `prior.csv`,
  `localize/` (stage-1 models per view and fold, `points.parquet` out-of-fold points, `summary.json`
  errors), `grade/` (stage-2 models per member and fold), `oof.parquet` (out-of-fold predictions
  of every member), `cv.json` (CV scores), `blend.json` (`spine-ray tune-ensemble`), `ray/`
  (Ray Train checkpoints, Ray Tune state).
- `submission.csv` — `spine-ray infer` on the test studies; `submission.csv.report.json` says
  which studies fell back to the prior and why.
- `run/report/index.html` — `spine-ray report`: scores, confusion matrices, calibration, stage-1
  errors, the studies with their points drawn, training curves, the blend (open it from disk).
- `run/mlruns/` — every training fold, Tune trial and blend search in MLflow
  (`mlflow ui --backend-store-uri run/mlruns`).
- `summary.json` — the table printed at the end: `prior`, `members`, `blend_cv`, `test_score`,
  `oracle`, `gap_closed`, `seconds` (per step), `report` (its path).
"""


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo dataset."""

    studies: int = 60
    test_studies: int = 16
    image_size: int = 128
    seed: int = 0
    blend_trials: int = 200
    report_studies: int = 3  # pictures of this many worst and random studies in the report


def run_demo(out: str, config: str, demo: DemoConfig, overrides: tuple[str, ...] = (), say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every step into `out`; returns the summary (also written as summary.json)."""

    from spine_ray.core.schema import read_labels, read_submission, submission_frame
    from spine_ray.core.storage import absolute
    from spine_ray.data.ingest import prepare
    from spine_ray.ensemble.baseline import read_prior
    from spine_ray.ensemble.metric import score_frames
    from spine_ray.ensemble.prior import predict_prior
    from spine_ray.ensemble.tune_ensemble import tune_ensemble
    from spine_ray.infer import infer
    from spine_ray.pipeline import train
    from spine_ray.report.build import ReportConfig, build_report
    from spine_ray.run_config import PipelineConfig
    from spine_ray.synth.generate import generate
    from spine_ray.synth.study import SynthConfig

    out = absolute(out)
    data, run = join(out, "data"), join(out, "run")
    seconds: dict[str, float] = {}

    def step(name: str, fn: Callable[[], Any]) -> Any:
        say(f"[bold]▶ {name}[/]")
        t = time.perf_counter()
        result = fn()
        seconds[name] = round(time.perf_counter() - t, 1)
        say(f"  {name}: {seconds[name]:.0f} s")
        return result

    synth_cfg = from_dict(SynthConfig, {"studies": demo.studies, "test_studies": demo.test_studies, "seed": demo.seed, "acquisition": {"image_sizes": [demo.image_size]}})
    if not exists(join(data, "manifest.json")):
        step("synthesise", lambda: generate(data, synth_cfg, workers=0, log=say))
    step("prepare", lambda: (prepare(data, join(out, "prepared"), "train"), prepare(data, join(out, "prepared_test"), "test")))
    cfg = load(PipelineConfig, config, [f"prepared={join(out, 'prepared')}", f"run_dir={run}", f"oracle={join(data, 'oracle_train.csv')}", *overrides])
    report = step("train", lambda: train(cfg))
    blend = step("tune-ensemble", lambda: tune_ensemble(run, trials=demo.blend_trials, seed=demo.seed))
    sub = join(out, "submission.csv")
    step("infer", lambda: infer(data, run, sub, "test"))
    test_labels = read_labels(join(data, "test_labels.csv"))
    test = score_frames(test_labels, read_submission(sub)).as_dict()
    oracle = score_frames(test_labels, read_submission(join(data, "oracle_submission.csv"))).as_dict()
    grade = report["grade"]
    # The gap is measured on the held-out test studies: prior, submission and oracle alike.
    prior_sub = submission_frame(test_labels["study_id"], predict_prior(read_prior(join(run, "prior.csv")), len(test_labels)))
    prior = score_frames(test_labels, prior_sub).as_dict()["score"]
    summary = {
        "prior": prior,
        "prior_cv": grade["prior"]["score"],
        "members": {m: s["score"] for m, s in grade["members"].items()},
        "blend_cv": blend["scores"]["blend, fitted on all folds (in-sample)"]["score"],
        "blend_cv_held_out": blend["scores"]["blend, halves (held-out)"]["score"],
        "test_score": test["score"],
        "oracle": oracle["score"],
        "oracle_cv": grade.get("oracle", {}).get("score"),
        "gap_closed": (prior - test["score"]) / (prior - oracle["score"]),
        "seconds": seconds,
    }
    atomic_write_text(join(out, "summary.json"), json.dumps(summary, indent=2))
    # The report reads summary.json (held-out scores), so it comes after it; then the summary names it.
    step("report", lambda: build_report(run, join(run, "report"), ReportConfig(studies=demo.report_studies)))
    summary["report"] = join(run, "report", "index.html")
    atomic_write_text(join(out, "summary.json"), json.dumps(summary, indent=2))
    atomic_write_text(join(out, "README.md"), RUN_README)
    return summary
