"""prepare → train (smoke) → infer with every input and output on an S3-compatible server.

The run leaves out the smoke config's stage-1 variant and one-stage member: they read and write
through the same storage layer as the members it trains, and the local end-to-end run
(`smoke_demo`, tests/test_pipeline_e2e.py) covers them; here they would add 8 of 18 folds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from spine_ray.config import load
from spine_ray.infer import infer
from spine_ray.ingest import prepare
from spine_ray.pipeline import PipelineConfig, train
from spine_ray.schema import read_series, read_submission

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def test_pipeline_runs_entirely_on_s3(ray_local, s3_bucket, synthetic, tmp_path, monkeypatch):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.put(str(synthetic), f"{s3_bucket[5:]}/data", recursive=True)
    data, prepared, run, sub = (f"{s3_bucket}/{p}" for p in ("data", "prepared", "run", "submission.csv"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # anything written to a relative local path by mistake lands here

    prepare(data, prepared, "train", workers=1)
    cfg = load(PipelineConfig, ROOT / "jobs" / "smoke.yaml", [f"prepared={prepared}", f"run_dir={run}", "localize_variants=[]", "onestage=[]"])
    report = train(cfg)
    infer(data, run, sub, "test")

    fs.invalidate_cache()
    studies = read_series(f"{data}/test_series_descriptions.csv")["study_id"].unique()
    assert len(read_submission(sub, study_ids=studies)) == 25 * len(studies)
    for key in ("manifest.json", "labels.parquet"):
        assert fs.exists(f"{prepared[5:]}/{key}")
    for key in ("config.yaml", "folds.parquet", "localize/points.parquet", "oof.parquet", "cv.json", "samples",
                "grade/a/fold0/model.pt", "grade/b/fold1/done.json"):
        assert fs.exists(f"{run[5:]}/{key}"), key
    # Ray Train checkpoints went to the bucket too.
    assert fs.glob(f"{run[5:]}/ray/train/**/state.pt")
    assert set(report["grade"]["members"]) == {"a", "b"}
    assert list(cwd.iterdir()) == [], "something was written to the local working directory"
