"""The job graph of a run and how its jobs are ordered on a number of slots (GPUs or CPU lanes): pure Python.

A job is one fold of one member (or one cross prediction); it `needs` the jobs whose outputs it
reads. Its priority is its critical path: the longest chain of work from its start to the end of
the graph, its own duration included. Scheduling the ready job of longest critical path first
(list scheduling) is what keeps slots busy to the end of a run; the schedule is deterministic
(ties go by key).

`simulate` replays a graph on N slots with given durations, either with the stage barriers of a
stage-by-stage run (each barrier group starts when the previous one is done, longest job first
within it) or as one graph (each job starts as soon as its needs are done and a slot is free);
`benchmarks/schedule.py` prints both for the recipe.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PlanJob:
    """One job of the graph: its key, its barrier group (stage-by-stage order), duration and needs."""

    key: str
    group: str
    hours: float
    needs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Placement:
    """Where and when a job ran in a schedule."""

    key: str
    group: str
    slot: int
    start: float
    end: float


def check_graph(jobs: Sequence[PlanJob]) -> None:
    """Refuse unknown needs, duplicate keys and cycles (one line naming a job)."""
    keys = [j.key for j in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate job keys: {sorted({k for k in keys if keys.count(k) > 1})[:3]}")
    known = set(keys)
    for j in jobs:
        unknown = [n for n in j.needs if n not in known]
        if unknown:
            raise ValueError(f"{j.key} needs {unknown}, which are not jobs of this graph")
    critical_paths(jobs)  # raises on a cycle


def critical_paths(jobs: Sequence[PlanJob]) -> dict[str, float]:
    """Per job: the longest chain of hours from its start to the end of the graph (its own included)."""
    by_key = {j.key: j for j in jobs}
    after: dict[str, list[str]] = {j.key: [] for j in jobs}
    for j in jobs:
        for n in j.needs:
            if n in after:
                after[n].append(j.key)
    out: dict[str, float] = {}
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(k: str) -> float:
        if state.get(k) == 2:
            return out[k]
        if state.get(k) == 1:
            raise ValueError(f"the job graph has a cycle through {k}")
        state[k] = 1
        out[k] = by_key[k].hours + max((visit(d) for d in after[k]), default=0.0)
        state[k] = 2
        return out[k]

    for j in jobs:
        visit(j.key)
    return out


def priority_order(jobs: Sequence[PlanJob]) -> list[str]:
    """Job keys, longest critical path first (ties by key): the order ready jobs get a slot."""
    cp = critical_paths(jobs)
    return sorted(cp, key=lambda k: (-cp[k], k))


def simulate(jobs: Sequence[PlanJob], slots: int, barriers: Sequence[str] | None = None) -> list[Placement]:
    """List-schedule the graph on `slots` identical slots; with `barriers` (group names in order), stage by stage.

    With barriers, a group's jobs become ready when every job of the groups before it is done,
    and a group is ordered longest job first (what one Tune run per stage does); jobs needing a
    later group are refused. Without, a job is ready when its needs are done, and ready jobs take
    free slots by critical path.
    """
    check_graph(jobs)
    if slots < 1:
        raise ValueError("slots must be ≥ 1")
    by_key = {j.key: j for j in jobs}
    if barriers is not None:
        rank = {g: i for i, g in enumerate(barriers)}
        missing = sorted({j.group for j in jobs} - set(rank))
        if missing:
            raise ValueError(f"groups {missing} are not in the barrier order {list(barriers)}")
        rank_of = {j.key: (rank[j.group], -j.hours, j.key) for j in jobs}
        for j in jobs:
            if any(rank[by_key[n].group] > rank[j.group] for n in j.needs):
                raise ValueError(f"{j.key} needs a job of a later group")
        order = sorted(by_key, key=lambda k: rank_of[k])
        prio = {k: i for i, k in enumerate(order)}
    else:
        prio = {k: i for i, k in enumerate(priority_order(jobs))}
    free = list(range(slots))
    heapq.heapify(free)
    running: list[tuple[float, int, str]] = []  # (end, slot, key)
    done: set[str] = set()
    placed: list[Placement] = []
    now = 0.0
    waiting = set(by_key)

    def ready(k: str) -> bool:
        if barriers is not None:
            group = rank[by_key[k].group]
            return all(rank[by_key[o].group] >= group or o in done for o in by_key)
        return all(n in done for n in by_key[k].needs)

    while waiting or running:
        for k in sorted((k for k in waiting if ready(k)), key=prio.__getitem__):
            if not free:
                break
            slot = heapq.heappop(free)
            j = by_key[k]
            placed.append(Placement(k, j.group, slot, now, now + j.hours))
            heapq.heappush(running, (now + j.hours, slot, k))
            waiting.discard(k)
        if not running:
            raise ValueError(f"jobs that can never start: {sorted(waiting)[:3]}")
        now, slot, k = heapq.heappop(running)
        done.add(k)
        heapq.heappush(free, slot)
        while running and running[0][0] == now:  # everything that ends at the same time frees its slot first
            _, slot, k = heapq.heappop(running)
            done.add(k)
            heapq.heappush(free, slot)
    return sorted(placed, key=lambda p: (p.start, p.slot))


def summary(placements: Sequence[Placement], slots: int, jobs: Sequence[PlanJob]) -> dict[str, float]:
    """Wall time, busy fraction of the slots, total work and the graph's critical path (hours)."""
    wall = max((p.end for p in placements), default=0.0)
    work = sum(p.end - p.start for p in placements)
    cp = max(critical_paths(jobs).values(), default=0.0)
    return {"wall_h": wall, "busy": work / (slots * wall) if wall else 0.0, "work_h": work, "critical_path_h": cp,
            "floor_h": max(cp, work / slots)}


def assign_slots(intervals: Sequence[tuple[float, float]]) -> list[int]:
    """A slot (row) per interval (start, end) so that no two in a slot overlap, in as few slots as were busy at once.

    Intervals are taken by start time; each goes to the free slot that became free last (so a lane
    of folds run back to back stays on one row), a new slot only when none is free.
    """
    order = sorted(range(len(intervals)), key=lambda i: (intervals[i][0], intervals[i][1], i))
    ends: list[float] = []  # per slot: when its last interval ended
    out = [0] * len(intervals)
    for i in order:
        start, end = intervals[i]
        free = [s for s, e in enumerate(ends) if e <= start]
        slot = max(free, key=lambda s: (ends[s], -s)) if free else len(ends)
        if slot == len(ends):
            ends.append(end)
        ends[slot] = end
        out[i] = slot
    return out
