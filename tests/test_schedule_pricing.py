"""benchmarks/schedule.py's pricing: a member's GPU-hours from its unit's measured rate and the recipe's epochs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import schedule
from spine_ray.core.config import load
from spine_ray.run_config import PipelineConfig

ROOT = Path(__file__).resolve().parents[1]


def test_members_are_priced_by_their_epochs_samples_and_unit_rate(tmp_path: Path) -> None:
    cfg = load(PipelineConfig, str(ROOT / "jobs" / "rsna2024.yaml"))
    members = {m.name: m for m in cfg.members()}
    rates = schedule.H200_RATES
    grade = members["convnext_small"]
    # 20 epochs of 5 samples a study over 4/5 of 1,975 studies, the held-out 1/5 predicted once at a third of the cost.
    expected = 5 * 1975 * (20 * 4 / 5 + 1 / 15) / 90.6 / 3600
    assert schedule.unit_hours(grade, rates, 5) == pytest.approx(expected)
    # The two-step member keeps its best epoch by validation AUC: it validates after each of its 15 + 5 epochs.
    two = members["convnext_small_2step"]
    assert schedule.validates_each_epoch(two) and not schedule.validates_each_epoch(grade)
    assert not any(schedule.validates_each_epoch(m) for m in cfg.members() if m.stage != "grade")
    assert schedule.unit_hours(two, rates, 5) == pytest.approx(5 * 1975 * 20 * (4 / 5 + 1 / 15) / 90.6 / 3600)
    assert schedule.unit_of(members["efficientnet_b3"]) == "grade_effnet"
    assert schedule.epochs_of(members["convnext_small_2step"]) == 15 + 5  # both steps
    sag, sag_effnet = members["sag_t1"], members["sag_t1@effnet"]
    assert schedule.unit_of(sag) == "sag_t2"  # the T1 view is priced at the measured T2 rate
    assert schedule.unit_hours(sag_effnet, rates, 5) / schedule.unit_hours(sag, rates, 5) == pytest.approx(90.6 / 69.2)
    # gpu.py's JSON overrides the units it measured; twice the rate halves the hours.
    out = tmp_path / "gpu.json"
    out.write_text(json.dumps({"units": {"grade_convnext": {"fit_samples_per_s": 181.2}, "not_a_unit": {"fit_samples_per_s": 1.0}}}))
    measured = schedule.read_rates(str(out))
    assert measured["grade_convnext"] == 181.2 and measured["axial"] == rates["axial"] and "not_a_unit" not in measured
    assert schedule.unit_hours(grade, measured, 5) == pytest.approx(expected / 2)
    # A fold job's start-up (compilation, the worker's start) is added once per fold, whatever its epochs.
    assert schedule.unit_hours(grade, rates, 5, startup_s=180.0) == pytest.approx(expected + 0.05)
    assert "180 s of start-up a fold job" in schedule.members_table(cfg, rates, 1975, startup_s=180.0)
    table = schedule.members_table(cfg, rates, 1975)
    assert "| grade/convnext_small | grade_convnext | 90.6 | 20 |" in table
