"""The run's compile cache (`engine.compile_cache`): a fold job that compiled saves torch's cache artifacts under the
run, and a job in a fresh process with an empty local cache loads them and compiles nothing of it again.

Real torch.compile (Inductor's CPU backend) in two child processes, each with its own empty TORCHINDUCTOR_CACHE_DIR,
as two nodes of a cluster would be; the fold driver applies its GPU speed-ups on CPU here (`SPEED_UP_DEVICES`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from spine_ray.engine import compile_cache
from spine_ray.models.backbone import BACKBONE_MARK
from tests.test_training_machinery import DIM, LinearStage, make_run

ROOT = Path(__file__).resolve().parents[1]


class CompiledLinearStage(LinearStage):
    """The toy stage with its network marked as a 2-D encoder and `train.compile` on: what speed_up compiles."""

    def train_config(self, job):
        return dataclasses.replace(super().train_config(job), epochs=2, batch_size=10, compile=True)  # 20 training rows: no short batch

    def build_model(self, member, config):
        net = nn.Sequential(nn.Linear(DIM, 8), nn.GELU(), nn.Linear(8, 1))
        setattr(net, BACKBONE_MARK, True)
        return net


def child(tmp: str, fold: int) -> None:
    """One fold job in this process, compiled; prints what torch's cache counted and what the run's cache held."""
    from torch._dynamo.utils import counters

    import spine_ray.engine.fold as fold_driver

    fold_driver.SPEED_UP_DEVICES = ("cuda", "cpu")
    torch.set_num_threads(1)
    job = make_run(Path(tmp))[fold]
    fold_driver.run_fold(CompiledLinearStage(), job, device=torch.device("cpu"))
    folder = Path(job.run_dir) / compile_cache.FOLDER
    print(json.dumps({"hits": counters["inductor"]["fxgraph_cache_hit"], "misses": counters["inductor"]["fxgraph_cache_miss"],
                      "files": sorted(p.name for p in folder.iterdir())}))


def _run(tmp: Path, fold: int) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp / f"local-cache-{fold}"), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", f"from tests.test_compile_cache import child; child({str(tmp)!r}, {fold})"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not compile_cache.supported(), reason="torch without save_cache_artifacts")
def test_a_job_on_another_node_loads_what_the_first_compiled(tmp_path: Path) -> None:
    first = _run(tmp_path, 0)
    assert first["misses"] > 0 and first["hits"] == 0  # cold: everything compiled
    assert first["files"] == ["Sequential--linear-fold0.0.bin", "Sequential--linear-fold0.1.bin"]  # after epoch 0, after predicting
    (tmp_path / "run" / compile_cache.FOLDER / "Sequential--torn-upload.bin").write_bytes(b"not torch's")  # skipped, not fatal
    (tmp_path / "run" / compile_cache.FOLDER / "ResNet--other-network.bin").write_bytes(b"never read")  # another network's
    second = _run(tmp_path, 1)  # another process, an empty local cache: a second node
    assert second["hits"] == first["misses"] and second["misses"] == 0  # the same shapes: nothing compiled again
    assert not any("fold1" in f for f in second["files"])  # nothing new to save


def test_nothing_is_saved_or_loaded_where_the_job_does_not_compile(tmp_path: Path) -> None:
    net = CompiledLinearStage().build_model("linear", {})
    assert compile_cache.network_key(net) == "Sequential"
    assert compile_cache.begin(str(tmp_path), net, "linear-fold0", enabled=False) is None
    assert compile_cache.save_active() is False and not (tmp_path / compile_cache.FOLDER).exists()
    cache = compile_cache.CompileCache(str(tmp_path), "Sequential", "linear-fold0")
    assert cache.save() is False  # nothing compiled since it began


def test_a_cache_that_cannot_be_written_costs_the_job_nothing(tmp_path: Path, monkeypatch, caplog) -> None:
    """A failed save (a read-only bucket, a full disk) is a warning: the fold job goes on."""
    from torch._dynamo.utils import counters

    cache = compile_cache.CompileCache(str(tmp_path), "Sequential", "linear-fold0")
    monkeypatch.setitem(counters["inductor"], "fxgraph_cache_miss", cache.saved_misses + 2)  # as if it had compiled two graphs
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artifacts", None))

    def refused(url: str, data: bytes) -> None:
        raise PermissionError("AccessDenied: s3://run/compile_cache")

    monkeypatch.setattr(compile_cache, "atomic_write_bytes", refused)
    assert cache.save() is False
    assert "not saved (PermissionError" in caplog.text


def test_a_cache_that_cannot_be_listed_costs_the_job_nothing(tmp_path: Path, monkeypatch, caplog) -> None:
    def unreachable(url: str) -> list[str]:
        raise OSError("the bucket does not answer")

    monkeypatch.setattr(compile_cache, "listdir", unreachable)
    assert compile_cache.CompileCache(str(tmp_path), "Sequential", "linear-fold0").load() == 0
    assert "not read (OSError" in caplog.text
