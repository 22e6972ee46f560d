"""The job board of a run: which fold job a slot trains next (pure Python; Ray holds one as an actor).

Every slot (a Tune trial: one GPU's worth of Ray Train workers, or a CPU lane) asks the board for
its next job by position: `job_for(slot, i)` is the slot's i-th job. The board hands out the
ready job (all its `needs` done) that comes first in the run's priority order (longest critical
path first, `spine_ray.engine.plan.priority_order`), and remembers the answer, so every rank of
a slot's Ray Train workers, asking for the same position, trains the same job, and a restarted
worker group asks `position(slot)` and resumes the job it held. When nothing is ready the answer
is WAIT (ask again when something finishes); when nothing is left that this slot could ever get,
FINISHED.

A job that failed for good (its slot's Ray Train run gave up after its own restarts) is marked
with `fail`; every job that needs it, directly or not, is skipped with the reason, and everything
else goes on. `outcome()` says what ran, what failed and what was skipped, for the driver's error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

WAIT = "wait"
FINISHED = "finished"


class Board:
    """Hands out jobs to slots in priority order as their needs finish; remembers who holds what."""

    def __init__(self, order: Sequence[str], needs: Mapping[str, Iterable[str]], done: Iterable[str] = ()) -> None:
        """`order`: every job key, highest priority first; `needs`: job → jobs it reads; `done`: finished before this run."""
        self.order = list(order)
        self.needs = {k: tuple(needs.get(k, ())) for k in self.order}
        unknown = sorted({n for ns in self.needs.values() for n in ns} - set(self.order))
        if unknown:
            raise ValueError(f"needs of jobs that are not on the board: {unknown[:3]}")
        self.done = set(done) & set(self.order)
        self.held: dict[str, list[str]] = {}  # slot → the jobs it was given, in order
        self.running: dict[str, str] = {}  # job → slot
        self.failed: dict[str, str] = {}  # job → its last error (failed for good)

    def _blocked(self, key: str) -> str | None:
        """The failed job that `key` needs, directly or not (None if none)."""
        stack, seen = [key], set()
        while stack:
            for n in self.needs[stack.pop()]:
                if n in self.failed:
                    return n
                if n not in seen:
                    seen.add(n)
                    stack.append(n)
        return None

    def _open(self) -> list[str]:
        """Jobs that may still be handed out: not done, not running, not failed, not blocked by a failure."""
        return [k for k in self.order if k not in self.done and k not in self.running and k not in self.failed and self._blocked(k) is None]

    def job_for(self, slot: str, index: int) -> str:
        """The slot's `index`-th job (handed out now if it has none yet), WAIT or FINISHED."""
        held = self.held.setdefault(slot, [])
        if index < len(held):
            return held[index]
        if index > len(held):
            raise ValueError(f"slot {slot} asked for its job {index}, but holds {len(held)}")
        if held and held[-1] in self.running:
            return WAIT  # rank 0 still writes the slot's last job; the other ranks wait for it
        open_ = self._open()
        ready = [k for k in open_ if all(n in self.done for n in self.needs[k])]
        if not ready:
            return WAIT if open_ and self.running else FINISHED
        key = ready[0]
        held.append(key)
        self.running[key] = slot
        return key

    def position(self, slot: str) -> int:
        """Where a (re)started slot goes on: its job still running, else the next new one."""
        held = self.held.get(slot, [])
        for i, k in enumerate(held):
            if self.running.get(k) == slot:
                return i
        return len(held)

    def finish(self, key: str) -> None:
        """A job's outputs are written."""
        self.running.pop(key, None)
        self.done.add(key)

    def current(self, slot: str) -> str | None:
        """The job a slot is running (None if none)."""
        held = self.held.get(slot, [])
        return held[-1] if held and self.running.get(held[-1]) == slot else None

    def fail(self, key: str, error: str) -> None:
        """A job failed for good: nothing that needs it will run."""
        self.running.pop(key, None)
        if key not in self.done:
            self.failed[key] = error

    def outcome(self) -> dict[str, dict[str, str] | list[str]]:
        """Done jobs, jobs failed for good (with their errors) and jobs skipped because they need one."""
        skipped = {k: f"needs {self._blocked(k)}, which failed" for k in self.order if k not in self.done and k not in self.failed and self._blocked(k)}
        return {"done": [k for k in self.order if k in self.done], "failed": dict(self.failed), "skipped": skipped,
                "not_run": [k for k in self.order if k not in self.done and k not in self.failed and k not in skipped]}


__all__ = ["Board", "WAIT", "FINISHED"]
