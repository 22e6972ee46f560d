"""benchmarks/device_run.py: the GPU session's one command, its deadline and its children, on CPU."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from benchmarks import device_run


def test_the_speed_figures_get_their_share_and_learning_what_is_left() -> None:
    assert device_run.plan(550.0, 0.65, 150.0) == (0.65 * 550.0, 550.0 - 0.65 * 550.0)
    assert device_run.plan(300.0, 0.65, 150.0) == (300.0, 0.0)  # 105 s would be too little to learn anything: all to gpu.py


def test_children_import_the_archive_and_the_repository_first_and_keep_what_was_set() -> None:
    env = device_run.child_env("/tmp/site", {"PYTHONPATH": "/opt/extra", "HOME": "/root"})
    assert env["PYTHONPATH"].split(os.pathsep) == ["/tmp/site", str(device_run.ROOT), "/opt/extra"] and env["HOME"] == "/root"
    assert device_run.child_env("", {})["PYTHONPATH"] == str(device_run.ROOT)  # no archive travelled


def test_with_little_time_left_only_the_one_stage_member_learns() -> None:
    assert device_run.learn_members(400.0, 330.0, []) == []  # gpu_learn.py's default: both members
    assert device_run.learn_members(200.0, 330.0, []) == ["--members", "onestage:onestage_convnext_small"]
    assert device_run.learn_members(200.0, 330.0, ["--members", "grade:convnext_small"]) == []  # what the caller named
    from benchmarks import gpu_learn

    assert gpu_learn.MEMBERS[0] == device_run.ONESTAGE  # the same member gpu_learn.py trains first


CHILD = """
import json, sys, time
from pathlib import Path
out = Path(sys.argv[1])
print("measured the first unit", flush=True)
out.joinpath("partial.json").write_text(json.dumps({"units": 1}))
try:
    time.sleep(60)
finally:
    out.joinpath("cleaned").write_text("the child's finally ran")
"""


def test_a_step_past_its_time_is_interrupted_and_keeps_what_it_wrote(tmp_path: Path) -> None:
    step = device_run.Step("child", [sys.executable, "-c", CHILD, str(tmp_path)])
    t0 = time.monotonic()
    device_run.run_step(step, 3.0, tmp_path / "child.log", dict(os.environ))
    assert time.monotonic() - t0 < 30
    assert step.stopped and step.rc != 0
    assert (tmp_path / "partial.json").exists() and (tmp_path / "cleaned").exists()  # SIGINT first: its finally ran
    assert "measured the first unit" in (tmp_path / "child.log").read_text()


def test_a_step_that_ignores_the_interrupt_is_killed(tmp_path: Path) -> None:
    stubborn = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); print('started', flush=True); time.sleep(60)"
    step = device_run.Step("stubborn", [sys.executable, "-c", stubborn])
    t0 = time.monotonic()
    device_run.run_step(step, 2.0, tmp_path / "s.log", dict(os.environ), grace_s=1.0)
    assert time.monotonic() - t0 < 20 and step.stopped and step.rc == -9
    assert "started" in (tmp_path / "s.log").read_text()


def test_tiny_cpu_run_measures_then_learns_at_the_measured_rate(tmp_path: Path) -> None:
    out = tmp_path / "out"
    steps = device_run.main([
        "--out", str(out), "--total-s", "600", "--learn-min-s", "30", "--archive", str(tmp_path / "absent.tar.xz"),
        "--gpu-args", f"--size tiny --device cpu --studies 3 --steps 2 --no-ray --units grade_convnext --no-infer --shared 0 --work {tmp_path / 'g'}",
        "--learn-args", "--size tiny --preset simple --studies 6 --folds 2 --epochs 1 --device cpu --no-ray --members grade:convnext_small --bootstrap 50",
    ])
    assert [(s.name, s.rc, s.stopped, s.skipped) for s in steps] == [("gpu", 0, False, ""), ("learn", 0, False, "")]
    gpu = json.loads((out / "gpu.json").read_text())
    assert list(gpu["units"]) == ["grade_convnext"] and gpu["meta"]["budget_s"] > 300
    assert "| grade, convnext_small (8) |" in (out / "gpu_tables.md").read_text()
    learn_cmd = steps[1].cmd
    assert learn_cmd[learn_cmd.index("--rates") + 1] == str(out / "gpu.json")
    assert "grade/convnext_small" in json.loads((out / "learn.json").read_text())["members"]
    record = json.loads((out / "device_run.json").read_text())
    assert [s["name"] for s in record["steps"]] == ["gpu", "learn"] and all(s["rc"] == 0 for s in record["steps"])
    assert (out / "gpu.log").read_text() and (out / "learn.log").read_text()
