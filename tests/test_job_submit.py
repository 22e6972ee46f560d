"""`ray job submit` against a real local head with token authentication, as a user runs it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from ray.job_submission import JobStatus
from ray_head import AUTH_ENV_VARS, RAY, job_client, ray_head, submit_job

from spine_ray.core.schema import read_series, read_submission
from spine_ray.data.ingest import prepare
from spine_ray.infer import infer

REPO = Path(__file__).resolve().parents[1]
# The runtime env users pass: `ray job submit --working-dir . --runtime-env jobs/runtime_env.yaml`.
RUNTIME_ENV_FILE = REPO / "jobs" / "runtime_env.yaml"

pytestmark = pytest.mark.slow


def test_job_imports_the_uploaded_working_dir(job_head):
    # `ray job submit` quotes each argument, so an entrypoint is one command, not a shell line.
    probe = [
        "python", "-c",
        "import os, spine_ray; print('spine_ray at', spine_ray.__file__); print('probe', os.environ['PROBE'])",
    ]
    runtime_env = {"env_vars": {"PROBE": "set-by-runtime-env"}, "excludes": [".git", "/data/", "/runs/"]}
    job_id, r = submit_job(job_head, probe, REPO, runtime_env=runtime_env)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    origin = next(line for line in r.stdout.splitlines() if line.startswith("spine_ray at"))
    # Ray unpacks the uploaded package under the head's session dir and puts it first on PYTHONPATH.
    assert str(job_head.temp_dir) in origin and "runtime_resources" in origin, origin
    assert "probe set-by-runtime-env" in r.stdout


def test_submitted_train_job_runs_on_s3_and_its_run_scores_the_test_studies(job_head, ray_local, s3_bucket, synthetic, tmp_path, monkeypatch):
    """The user's path end to end: data on S3, `prepare`, `ray job submit -- spine-ray train` with
    every input and output (sample caches and Ray Train checkpoints included) on S3, then `infer`
    from the run on S3. The head's processes find the endpoint and credentials in their environment,
    as a cluster's nodes do from their instance profile (jobs/runtime_env.yaml carries no secrets).

    The smoke config's stage-1 variant and one-stage member are left out: they read and write
    through the same storage layer, and the local end-to-end run (`smoke_demo`) covers them.
    """
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.put(str(synthetic), f"{s3_bucket[5:]}/data", recursive=True)
    data, prepared, run, sub = (f"{s3_bucket}/{p}" for p in ("data", "prepared", "run", "submission.csv"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # anything written to a relative local path by mistake lands here

    prepare(data, prepared, "train", workers=1)
    entrypoint = ["spine-ray", "train", "--config", "jobs/smoke.yaml", "--set", f"prepared={prepared}", "--set", f"run_dir={run}",
                  "--set", "localize_variants=[]", "--set", "onestage=[]"]
    job_id, r = submit_job(job_head, entrypoint, REPO, runtime_env_file=RUNTIME_ENV_FILE)
    assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    assert job_client(job_head).get_job_status(job_id) == JobStatus.SUCCEEDED
    assert "stage 2 cross-validation, 2 folds" in r.stdout
    infer(data, run, sub, "test")

    fs.invalidate_cache()
    studies = read_series(f"{data}/test_series_descriptions.csv")["study_id"].unique()
    assert len(read_submission(sub, study_ids=studies)) == 25 * len(studies)
    for key in ("manifest.json", "labels.parquet"):
        assert fs.exists(f"{prepared[5:]}/{key}")
    for key in ("config.yaml", "folds.parquet", "localize/points.parquet", "oof.parquet", "cv.json", "samples",
                "grade/a/fold0/model.pt", "grade/b/fold1/done.json", "grade/b/fold1/metrics.jsonl"):
        assert fs.exists(f"{run[5:]}/{key}"), key
    assert fs.glob(f"{run[5:]}/ray/tune/**/experiment_state*.json")  # the run's Tune state went to the bucket too
    assert not fs.glob(f"{run[5:]}/**/resume.pt")  # each fold's resume state, written there every epoch, is gone once it is done
    assert set(json.loads(fs.cat(f"{run[5:]}/cv.json"))["members"]) == {"a", "b"}
    assert list(cwd.iterdir()) == [], "something was written to the local working directory"


@pytest.mark.parametrize(
    ("token_env", "refusal"),
    [({}, "Missing authentication token"), ({"RAY_AUTH_TOKEN": "0" * 64}, "Invalid authentication token")],
    ids=["no-token", "wrong-token"],
)
def test_head_refuses_client_without_its_token(job_head, tmp_path, token_env, refusal):
    env = {k: v for k, v in job_head.env.items() if k not in AUTH_ENV_VARS}
    env.update(HOME=str(tmp_path), RAY_AUTH_MODE="token", **token_env)  # no ~/.ray/auth_token to fall back on
    if not token_env:
        env.pop("RAY_AUTH_MODE")
    r = subprocess.run(
        [RAY, "job", "list", "--address", job_head.address], env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode != 0
    assert refusal in r.stderr, r.stderr[-2000:]


def test_documented_token_flow_with_default_token_file():
    """docs/scale-out.md: `ray get-auth-token --generate`, RAY_AUTH_MODE=token, start, submit."""
    with ray_head(num_cpus=1, token_in_home=True) as head:
        assert "RAY_AUTH_TOKEN_PATH" not in head.env and "RAY_AUTH_TOKEN" not in head.env
        job_id, r = submit_job(head, ["python", "-c", "print('hello from the job')"], REPO / "jobs")
        assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        assert "hello from the job" in r.stdout
        assert job_client(head).get_job_status(job_id) == JobStatus.SUCCEEDED
