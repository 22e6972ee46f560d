"""Shared fixtures: the real competition tables (when present) and one local Ray per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# SPINE_RAY_REAL_TABLES points elsewhere, e.g. from a git worktree that is not beside ../shared.
SHARED = Path(
    os.environ.get("SPINE_RAY_REAL_TABLES", Path(__file__).resolve().parents[1].parent / "shared" / "rsna2024")
)


@pytest.fixture(scope="session")
def real_tables() -> Path:
    """The competition's real CSV tables in ../shared/rsna2024; skip when absent."""
    if not (SHARED / "train.csv").exists():
        pytest.skip(f"real competition tables not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """One local Ray instance for the whole test session (2 CPUs, no dashboard).

    It starts after the loopback S3 server so that its workers inherit the endpoint and
    credentials, as a cluster's workers inherit them from the environment on AWS.
    """
    import ray

    # Workers import test modules (stages defined in tests) by name, like the driver does.
    tests_dir = str(Path(__file__).resolve().parent)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p)
    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=1_000_000_000,
            log_to_driver=False,
            configure_logging=False,
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible server (moto's) on loopback; credentials and endpoint in the environment.

    Yields the endpoint URL. boto3, s3fs and pyarrow find it through AWS_ENDPOINT_URL, as they
    would find a MinIO or real AWS endpoint.
    """
    import socket

    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ENDPOINT_URL_S3": endpoint,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server):
    """A fresh, empty bucket on the loopback S3 server; yields `s3://name`."""
    import uuid

    import boto3

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return f"s3://{name}"


@pytest.fixture(scope="session")
def job_head(s3_server):
    """A real local Ray head (loopback, token auth, 2 CPUs) for `ray job submit` tests; see tests/ray_head.py.

    Started after the loopback S3 server, so its processes inherit the endpoint and credentials.
    """
    from ray_head import ray_head

    with ray_head(num_cpus=2) as head:
        yield head


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory) -> Path:
    """A tiny synthetic dataset in the Kaggle layout: 6 train + 2 test studies at 64 px."""
    from spine_ray.core.config import from_dict
    from spine_ray.synth.generate import generate
    from spine_ray.synth.study import SynthConfig

    out = tmp_path_factory.mktemp("synthetic")
    cfg = from_dict(SynthConfig, {"studies": 6, "test_studies": 2, "seed": 3, "acquisition": {"image_sizes": [64]}})
    generate(str(out), cfg, workers=1)
    return out


@pytest.fixture(scope="session")
def prepared(synthetic, ray_local, tmp_path_factory) -> Path:
    """The tiny synthetic train split, prepared into volumes and labels."""
    from spine_ray.data.ingest import prepare

    out = tmp_path_factory.mktemp("prepared")
    prepare(str(synthetic), str(out), "train", workers=1)
    return out


@pytest.fixture(scope="session")
def smoke_demo(ray_local, tmp_path_factory):
    """A reduced `spine-ray demo` with the smoke config (6 + 3 studies at 64 px): (out dir, summary).

    Session-scoped: the end-to-end checks and the report's checks share this one run.
    """
    from spine_ray.demo import DemoConfig, run_demo

    out = tmp_path_factory.mktemp("demo")
    root = Path(__file__).resolve().parents[1]
    summary = run_demo(str(out), str(root / "jobs" / "smoke.yaml"), DemoConfig(studies=6, test_studies=3, image_size=64, blend_trials=20), say=lambda _m: None)
    return out, summary
