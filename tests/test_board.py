"""The job board: which job a slot trains next (pure Python, no Ray)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from spine_ray.engine.board import FINISHED, WAIT, Board
from spine_ray.engine.plan import PlanJob, priority_order, simulate


def _board(**kw) -> Board:
    # a → c, b → c; d alone. Priority order: a, b, d, c (as given).
    return Board(["a", "b", "d", "c"], {"c": ("a", "b")}, **kw)


def test_ready_jobs_go_out_in_priority_order_and_a_job_waits_for_its_needs():
    b = _board()
    assert [b.job_for("s0", 0), b.job_for("s1", 0), b.job_for("s2", 0)] == ["a", "b", "d"]
    assert b.job_for("s3", 0) == WAIT  # c needs a and b, which run
    b.finish("a")
    assert b.job_for("s3", 0) == WAIT
    b.finish("b")
    assert b.job_for("s3", 0) == "c"
    b.finish("c")
    b.finish("d")
    assert b.job_for("s0", 1) == FINISHED
    assert b.outcome()["done"] == ["a", "b", "d", "c"]


def test_every_rank_of_a_slot_gets_the_same_job_and_a_restart_resumes_the_held_one():
    b = _board()
    assert b.job_for("s0", 0) == "a" and b.job_for("s0", 0) == "a"  # rank 1 asks the same position
    assert b.position("s0") == 0  # a restarted worker group goes on with a
    assert b.job_for("s0", 1) == WAIT  # rank 1 asks for the next while rank 0 still writes a
    b.finish("a")
    assert b.position("s0") == 1 and b.job_for("s0", 1) == "b"
    with pytest.raises(ValueError, match="asked for its job 3"):
        b.job_for("s0", 3)


def test_a_failed_job_skips_what_needs_it_and_nothing_else():
    b = _board()
    assert [b.job_for("s0", 0), b.job_for("s1", 0)] == ["a", "b"]
    b.fail("a", "RuntimeError: boom")
    b.finish("b")
    assert b.current("s0") is None and b.current("s1") is None
    assert b.job_for("s0", 1) == "d"  # c can never run; d still does
    b.finish("d")
    assert b.job_for("s1", 1) == FINISHED
    out = b.outcome()
    assert out["failed"] == {"a": "RuntimeError: boom"} and out["skipped"] == {"c": "needs a, which failed"}
    assert out["done"] == ["b", "d"] and out["not_run"] == []


def test_done_jobs_are_skipped_and_a_slot_ends_when_nothing_is_left_for_it():
    b = Board(["a", "b", "c"], {}, done={"a"})
    assert b.job_for("s0", 0) == "b"
    assert b.job_for("s1", 0) == "c"
    b.finish("c")
    assert b.job_for("s1", 1) == FINISHED  # b still runs on s0, and nothing is left for s1: it may end
    b.finish("b")
    assert b.job_for("s0", 1) == FINISHED
    with pytest.raises(ValueError, match="not on the board"):
        Board(["a"], {"a": ("x",)})


def test_the_board_hands_out_jobs_as_the_plan_simulator_places_them():
    """Driven with the simulator's durations, the board reproduces its one-graph schedule."""
    jobs = [PlanJob("t2-0", "s", 2.0), PlanJob("t2-1", "s", 2.0), PlanJob("ax-0", "a", 3.0, ("t2-0",)),
            PlanJob("ax-1", "a", 3.0, ("t2-1",)), PlanJob("g-0", "g", 1.0, ("ax-0",)), PlanJob("one-0", "o", 4.0)]
    hours = {j.key: j.hours for j in jobs}
    board = Board(priority_order(jobs), {j.key: j.needs for j in jobs})
    slots, running, now, started = 2, {}, 0.0, {}
    index = dict.fromkeys(range(slots), 0)
    while True:
        for s in range(slots):
            if s not in running:
                key = board.job_for(f"s{s}", index[s])
                if key not in (WAIT, FINISHED):
                    running[s], started[key] = (now + hours[key], key), now
                    index[s] += 1
        if not running:
            break
        s = min(running, key=lambda s: (running[s][0], s))
        now, key = running.pop(s)
        board.finish(key)
    assert started == {p.key: p.start for p in simulate(jobs, slots)}


def _done(run: Path, stage: str, member: str, fold: int, start: float, end: float) -> None:
    d = run / stage / member / f"fold{fold}"
    d.mkdir(parents=True)
    (d / "done.json").write_text(json.dumps({"timeline": {"job_started": start, "finished": end, "slot": "slot0"}}))


def test_priorities_come_from_a_finished_runs_fold_times_and_the_proxy_fills_the_rest(tmp_path):
    """`resources.plan_from`: members measured in an earlier run get their mean fold time; the
    others get the size proxy scaled to the measured members, so every cost is in hours."""
    import pandas as pd

    from spine_ray.engine.schedule import job_graph
    from spine_ray.engine.stage import FoldJob
    from spine_ray.engine.timelines import fold_timelines, measured_hours
    from spine_ray.engine.train_loop import TrainConfig

    class Toy:
        def __init__(self, epochs: int) -> None:
            self.epochs = epochs

        def train_config(self, job):
            return TrainConfig(epochs=self.epochs)

    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame({"study_id": range(8), "fold": [0, 1] * 4}).to_parquet(run / "folds.parquet")
    jobs = [FoldJob(stage, member, k, 2, {}, str(tmp_path), str(run), {}, needs) for stage, member, needs in
            (("loc", "a", ()), ("grade", "g", ("a-fold{k}",)), ("one", "o", ())) for k in (0, 1)]
    jobs = [dataclasses.replace(j, needs=tuple(n.format(k=j.fold) for n in j.needs)) for j in jobs]
    stages = {"loc": Toy(10), "grade": Toy(2), "one": Toy(5)}
    proxy = {p.key: p.hours for p in job_graph(stages, jobs)}
    assert proxy["a-fold0"] == 10 * (4 + 4 / 3) and proxy["o-fold1"] == proxy["a-fold0"] / 2  # epochs × (train + val/3)
    before = tmp_path / "before"
    _done(before, "loc", "a", 0, 0.0, 3600.0)
    _done(before, "loc", "a", 1, 0.0, 7200.0)
    _done(before, "one", "o", 0, 100.0, 100.0 + 5 * 3600)
    assert measured_hours(str(before)) == {("loc", "a"): 1.5, ("one", "o"): 5.0}
    assert list(fold_timelines(str(before))["slot"]) == [0, 0, 0]
    hours = {p.key: p.hours for p in job_graph(stages, jobs, str(before))}
    scale = (2 * 1.5 + 2 * 5.0) / (2 * proxy["a-fold0"] + 2 * proxy["o-fold0"])
    assert hours["a-fold1"] == 1.5 and hours["o-fold0"] == 5.0
    assert hours["g-fold0"] == pytest.approx(scale * proxy["g-fold0"])
    # The one-stage member, measured the longest, now goes first; by the proxy the localiser did.
    assert priority_order(job_graph(stages, jobs, str(before)))[0] == "o-fold0"
    assert priority_order(job_graph(stages, jobs))[0] == "a-fold0"
