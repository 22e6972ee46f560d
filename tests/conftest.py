"""Shared fixtures: the real competition tables (when present) and one local Ray per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "rsna2024"


@pytest.fixture(scope="session")
def real_tables() -> Path:
    """The competition's real CSV tables in ../shared/rsna2024; skip when absent."""
    if not (SHARED / "train.csv").exists():
        pytest.skip(f"real competition tables not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the whole test session (2 CPUs, no dashboard)."""
    import ray

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
