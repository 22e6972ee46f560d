"""The job graph and its schedules: critical paths, stage barriers against one graph, slot rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from spine_ray.core.config import load
from spine_ray.engine.plan import (
    PlanJob,
    assign_slots,
    critical_paths,
    priority_order,
    simulate,
    summary,
)
from spine_ray.pipeline import plan_jobs
from spine_ray.run_config import PipelineConfig

JOBS = Path(__file__).resolve().parents[1] / "jobs"


def _chain() -> list[PlanJob]:
    # Two folds: a long localiser then a grader each, and an independent long one-stage fold.
    return [
        PlanJob("loc0", "sagittal", 2.0), PlanJob("loc1", "sagittal", 1.0),
        PlanJob("gr0", "grade", 1.0, ("loc0",)), PlanJob("gr1", "grade", 1.0, ("loc1",)),
        PlanJob("one0", "onestage", 2.5),
    ]


def test_critical_path_and_priority():
    cp = critical_paths(_chain())
    assert cp == {"loc0": 3.0, "loc1": 2.0, "gr0": 1.0, "gr1": 1.0, "one0": 2.5}
    assert priority_order(_chain()) == ["loc0", "one0", "loc1", "gr0", "gr1"]


def test_one_graph_fills_the_gap_a_stage_barrier_leaves():
    jobs = _chain()
    old = simulate(jobs, 2, ("sagittal", "grade", "onestage"))
    new = simulate(jobs, 2)
    # Barriers: loc0 | loc1 (2 h), then gr0 | gr1 (1 h), then one0 alone (2.5 h).
    assert summary(old, 2, jobs)["wall_h"] == pytest.approx(5.5)
    # One graph: the one-stage fold starts at once beside loc0; at 2 h loc1 (longer path) goes before
    # gr0, which takes the one-stage fold's slot at 2.5 h; gr1 follows loc1 at 3 h.
    assert summary(new, 2, jobs)["wall_h"] == pytest.approx(4.0)
    starts = {p.key: p.start for p in new}
    assert starts == pytest.approx({"loc0": 0.0, "one0": 0.0, "loc1": 2.0, "gr0": 2.5, "gr1": 3.0})
    for p in new:  # every job after its needs
        job = next(j for j in jobs if j.key == p.key)
        assert all(starts[n] + next(j.hours for j in jobs if j.key == n) <= p.start + 1e-9 for n in job.needs)
    assert simulate(jobs, 2) == new  # deterministic


def test_bad_graphs_are_refused_in_one_line():
    with pytest.raises(ValueError, match="not jobs of this graph"):
        simulate([PlanJob("a", "g", 1.0, ("b",))], 1)
    with pytest.raises(ValueError, match="cycle"):
        simulate([PlanJob("a", "g", 1.0, ("b",)), PlanJob("b", "g", 1.0, ("a",))], 1)
    with pytest.raises(ValueError, match="later group"):
        simulate([PlanJob("a", "x", 1.0, ("b",)), PlanJob("b", "y", 1.0)], 1, ("x", "y"))


def test_slots_are_rows_of_folds_that_never_overlap():
    spans = [(0.0, 2.0), (0.0, 1.0), (1.0, 3.0), (2.0, 4.0), (2.5, 3.0)]
    slots = assign_slots(spans)
    assert max(slots) + 1 == 3  # at most three ran at once (2.5 to 3.0)
    for s in set(slots):
        mine = sorted(spans[i] for i in range(len(spans)) if slots[i] == s)
        assert all(a[1] <= b[0] for a, b in zip(mine, mine[1:], strict=False))
    assert slots[2] == slots[1]  # the fold that followed one back to back stays on its row


def test_the_recipe_graph_has_per_fold_needs_and_beats_its_barriers_on_8_gpus():
    cfg = load(PipelineConfig, JOBS / "rsna2024.yaml")
    jobs = plan_jobs(cfg, lambda m: 1.0, cross_hours=0.1)
    keys = {j.key for j in jobs}
    assert len(jobs) == cfg.folds * (6 + len(cfg.grade) + len(cfg.onestage) + len(cfg.grade) * len(cfg.localize_variants))
    axial = next(j for j in jobs if j.key == "axial@effnet-fold3")
    assert axial.needs == ("sag_t2@effnet-fold3",)
    grader = next(j for j in jobs if j.group == "grade" and j.key.endswith("fold2"))
    assert set(grader.needs) == {"sag_t2-fold2", "sag_t1-fold2", "axial-fold2"} <= keys
    cross = next(j for j in jobs if j.group == "cross" and j.key.endswith("fold1"))
    grader_name = cross.key.partition("@")[0]
    assert set(cross.needs) == {f"{grader_name}-fold1", "sag_t2@effnet-fold1", "sag_t1@effnet-fold1", "axial@effnet-fold1"} <= keys
    assert all(not j.needs for j in jobs if j.group == "onestage")
    old = summary(simulate(jobs, 8, ("sagittal", "axial", "grade", "onestage", "cross")), 8, jobs)
    new = summary(simulate(jobs, 8), 8, jobs)
    assert new["wall_h"] < old["wall_h"] and new["busy"] > old["busy"]
