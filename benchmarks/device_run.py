"""The GPU session's one command: the throughput tables, then "does it learn", inside one deadline.

A session is lent 15 minutes of device time, the machine's start (one to two minutes) included, and
one command runs at most 10 minutes: so the GPU work of issue 28 is one call. This driver (standard
library only: it imports neither torch nor Ray) unpacks the Ray archive where it travelled
(`.whl/ray-site.tar.xz`, `benchmarks/device_pack.sh`), then runs, each as a child process in its own
process group with its output both printed and kept under --out:

  1. `benchmarks/gpu.py --size real` (the speed figures, which come first) with --gpu-share of the time
     left as its budget (it sizes its windows to fit, units in the order a cut-short run should keep),
     stopped at the deadline at the latest; its tables are printed again from its JSON, which it
     saves after every unit, so a run stopped half-way still reports what it measured (`gpu_tables.md`);
  2. `benchmarks/gpu_learn.py` (item 6: one fold of the one-stage member and of the grader on
     realistic studies) with what is left, its epochs sized by the rates step 1 measured, if at least
     --learn-min-s is left; the one-stage member alone (the open question) under --both-min-s.

A step past its time gets SIGINT (its `finally` blocks run: the working folder, Ray's shutdown), then
SIGKILL 20 s later, and Ray's processes are stopped before the next step. `device_run.json` records
each step's command, exit status, seconds and whether it was stopped.

On the device machine (run timeout 600 s, carry [".whl"]):

    python3 benchmarks/device_run.py --out $OUT

On CPU at the tiny size (tests/test_device_run.py runs a smaller one):

    python benchmarks/device_run.py --out /tmp/dev --total-s 300 --gpu-args "--size tiny --device cpu --studies 3 --steps 2 --no-ray" \\
        --learn-args "--size tiny --preset simple --studies 6 --folds 2 --epochs 1 --device cpu --no-ray"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Step:
    """What one child process did."""

    name: str
    cmd: list[str]
    rc: int | None = None
    seconds: float = 0.0
    stopped: bool = False  # past its time: interrupted (then killed if it did not end)
    skipped: str = ""  # why it did not run


def plan(left_s: float, gpu_share: float, learn_min_s: float) -> tuple[float, float]:
    """(gpu.py's budget, the time kept for gpu_learn.py) out of `left_s`: the speed figures get `gpu_share` of it, and
    all of it where what would be left for learning is under `learn_min_s` (then nothing is kept for it)."""
    gpu = gpu_share * left_s
    if left_s - gpu < learn_min_s:
        return left_s, 0.0
    return gpu, left_s - gpu


ONESTAGE = "onestage:onestage_convnext_small"


def learn_members(left_s: float, both_min_s: float, learn_args: list[str]) -> list[str]:
    """gpu_learn.py's --members for `left_s` seconds: its default (both) from `both_min_s` up, else the one-stage member
    alone (about 1.5 minutes go to synthesis, then each member its share: one member with all of it learns more); none
    where --learn-args names them."""
    if "--members" in learn_args or left_s >= both_min_s:
        return []
    return ["--members", ONESTAGE]


def run_step(step: Step, timeout_s: float, log: Path, env: dict[str, str], grace_s: float = 20.0) -> Step:
    """Run `step.cmd` in its own process group, its output printed and written to `log`; past `timeout_s` SIGINT, then
    SIGKILL after `grace_s`."""
    t0 = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(step.cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, start_new_session=True)

        def pump() -> None:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                out.write(line)
                out.flush()

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            step.stopped = True
            print(f"[device_run] {step.name}: past its {timeout_s:.0f} s: interrupting", flush=True)
            _signal(proc, signal.SIGINT)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                _signal(proc, signal.SIGKILL)
                proc.wait()
        reader.join(timeout=10)
    step.rc, step.seconds = proc.returncode, time.monotonic() - t0
    return step


def _signal(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def unpack(archive: Path, site: Path, py: str) -> str:
    """The unpacked Ray archive's folder for PYTHONPATH ('' where no archive travelled: the scripts run without Ray)."""
    if not archive.exists():
        print(f"[device_run] no {archive}: the scripts take their in-process path", flush=True)
        return ""
    if not (site / "ray").exists():
        site.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "xJf", str(archive), "-C", str(site)], check=True)
        subprocess.run([py, "-m", "compileall", "-q", "-j0", str(site)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return str(site)


def child_env(site: str, environ: dict[str, str]) -> dict[str, str]:
    """The children's environment: the unpacked archive and the repository first on PYTHONPATH, then what was set."""
    path = [p for p in (site, str(ROOT), environ.get("PYTHONPATH", "")) if p]
    return {**environ, "PYTHONPATH": os.pathsep.join(path), "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def stop_ray(py: str, env: dict[str, str]) -> None:
    """Stop what Ray a stopped step may have left running (its services die with their parent; this is for the rest)."""
    try:
        subprocess.run([py, "-m", "ray.scripts.scripts", "stop", "--force"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=60, check=False)
    except subprocess.TimeoutExpired:
        print("[device_run] `ray stop` did not finish in 60 s", flush=True)


def main(argv: list[str] | None = None) -> list[Step]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="where logs, JSON and tables go ($OUT on the device)")
    ap.add_argument("--total-s", type=float, default=570.0, help="the deadline, from the start (the run's timeout less the way back)")
    ap.add_argument("--gpu-share", type=float, default=0.65, help="gpu.py's part of the time left after unpacking")
    ap.add_argument("--learn-min-s", type=float, default=150.0, help="gpu_learn.py runs only with at least this many seconds left")
    ap.add_argument("--archive", default=str(ROOT / ".whl" / "ray-site.tar.xz"))
    ap.add_argument("--site", default="/tmp/site")
    ap.add_argument("--gpu-args", default="--size real", help="more arguments for gpu.py")
    ap.add_argument("--learn-args", default="", help="more arguments for gpu_learn.py")
    ap.add_argument("--both-min-s", type=float, default=330.0, help="under this many seconds left, gpu_learn.py trains the one-stage member alone")
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args(argv)

    t0 = time.monotonic()
    deadline = t0 + args.total_s
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = args.python
    site = unpack(Path(args.archive), Path(args.site), py)
    env = child_env(site, dict(os.environ))
    print(f"[device_run] unpacked in {time.monotonic() - t0:.0f} s; {deadline - time.monotonic():.0f} s left", flush=True)
    steps: list[Step] = []

    def record() -> None:
        (out / "device_run.json").write_text(json.dumps({"total_s": args.total_s, "steps": [asdict(s) for s in steps]}, indent=1))

    gpu_json = out / "gpu.json"
    budget, _ = plan(deadline - time.monotonic(), args.gpu_share, args.learn_min_s)
    gpu = Step("gpu", [py, "benchmarks/gpu.py", *shlex.split(args.gpu_args), "--budget-s", f"{budget:.0f}", "--json", str(gpu_json)])
    steps.append(run_step(gpu, deadline - time.monotonic(), out / "gpu.log", env))
    if gpu.stopped or gpu.rc:
        stop_ray(py, env)
    record()
    if gpu_json.exists():  # the tables of what it measured, also when it was stopped before printing them
        tables = subprocess.run([py, "benchmarks/gpu.py", "--table", str(gpu_json)], cwd=ROOT, env=env, capture_output=True, text=True, check=False)
        (out / "gpu_tables.md").write_text(tables.stdout + tables.stderr)
        if gpu.stopped or gpu.rc:
            print(tables.stdout, flush=True)

    left = deadline - time.monotonic()
    rates = ["--rates", str(gpu_json)] if gpu_json.exists() else []
    extra = shlex.split(args.learn_args)
    learn = Step("learn", [py, "benchmarks/gpu_learn.py", *extra, *learn_members(left, args.both_min_s, extra), *rates,
                           "--budget-s", f"{max(0.0, left - 30):.0f}", "--json", str(out / "learn.json")])
    if left < args.learn_min_s:
        learn.skipped = f"{left:.0f} s left, under --learn-min-s {args.learn_min_s:.0f}"
        print(f"[device_run] learn: skipped ({learn.skipped})", flush=True)
        steps.append(learn)
    else:
        steps.append(run_step(learn, left - 5, out / "learn.log", env))
        if learn.stopped or learn.rc:
            stop_ray(py, env)
    record()
    print("[device_run] " + "; ".join(f"{s.name}: " + (f"skipped ({s.skipped})" if s.skipped else f"rc {s.rc}, {s.seconds:.0f} s"
                                                    + (", stopped at its time" if s.stopped else "")) for s in steps)
          + f"; {time.monotonic() - t0:.0f} s in all", flush=True)
    return steps


if __name__ == "__main__":
    main()
