"""The fold-parallel training machinery on a real local Ray: folds, resume, worker failure.

The stage here is a small regression model on a Parquet source table: the machinery under test
(job board → Tune trial per slot → TorchTrainer → plain loop → resume states → OOF tables) is the real one.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from spine_ray.engine.fold import run_fold
from spine_ray.engine.resources import ResourcesConfig
from spine_ray.engine.sample_cache import split_studies
from spine_ray.engine.schedule import run_folds
from spine_ray.engine.stage import FoldJob, collate, fold_dir, is_done
from spine_ray.engine.train_loop import TrainConfig, lr_factor

N_STUDIES, DIM = 40, 6


def read_done(job: FoldJob) -> dict:
    """A finished fold's done marker."""
    return json.loads((Path(fold_dir(job)) / "done.json").read_text())


class LinearStage:
    """y = x·w + noise, one row per study; the OOF table is study_id, pred, y."""

    def __init__(self, epochs: int = 3, sleep_s: float = 0.0, fail_epoch: int | None = None, flag: str | None = None, fail_fold: int | None = None) -> None:
        self.epochs, self.sleep_s, self.fail_epoch, self.flag, self.fail_fold = epochs, sleep_s, fail_epoch, flag, fail_fold

    def train_config(self, job):
        return TrainConfig(epochs=self.epochs, batch_size=8, lr=0.3, weight_decay=0.0, warmup_frac=0.0, seed=job.fold)

    def source(self, job):
        return job.inputs["table"]

    def sample_key(self, job, split):
        return {"inputs": ["table"]}

    def to_samples(self, job, split, rows):
        return rows[["study_id", "x", "y"]].reset_index(drop=True)

    def augment(self, job, rows, rng):
        x = np.stack(rows["x"]).astype(np.float32).reshape(-1, DIM)
        if rng is not None:
            x = x + rng.normal(0, 0.01, x.shape).astype(np.float32)
        return {"x": x, "y": np.asarray(rows["y"], dtype=np.float32)}

    def to_batch(self, job, arrays):
        return {"x": torch.from_numpy(np.asarray(arrays["x"], np.float32)), "y": torch.from_numpy(np.asarray(arrays["y"], np.float32))}

    def build_model(self, member, config):
        return nn.Linear(DIM, 1)

    def loss(self, job, model, batch):
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if self.fail_epoch is not None and self.flag and not os.path.exists(self.flag):
            # Fail once, mid-run, once the fold (fail_fold, or any) has reported fail_epoch epochs
            # (its resume state written): the flag says it already happened.
            epochs = Path(fold_dir(job), "metrics.jsonl")
            mine = self.fail_fold is None or job.fold == self.fail_fold
            reached = mine and epochs.exists() and len(epochs.read_text().splitlines()) >= self.fail_epoch
            if reached:
                Path(self.flag).write_text("failed once")
                raise RuntimeError("injected failure")
        pred = model(batch["x"]).squeeze(-1)
        loss = ((pred - batch["y"]) ** 2).mean()
        return loss, {"mse": float(loss.detach())}

    def predict(self, job, model, samples):
        batch = collate(self, job, {c: samples[c].to_numpy() for c in samples}, None)
        with torch.no_grad():
            pred = model(batch["x"]).squeeze(-1).numpy()
        return pd.DataFrame({"study_id": samples["study_id"], "fold": job.fold, "pred": pred, "y": samples["y"]})


def make_run(tmp_path: Path, n_folds: int = 2) -> list[FoldJob]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N_STUDIES, DIM))
    y = x @ np.arange(1, DIM + 1) / DIM
    studies = np.arange(1000, 1000 + N_STUDIES)
    src = tmp_path / "source.parquet"
    (tmp_path / "manifest.json").write_text('{"what": "a toy prepared output"}')  # sample caches key on it
    pd.DataFrame({"study_id": studies, "x": list(x), "y": y}).to_parquet(src)
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    pd.DataFrame({"study_id": studies, "fold": np.arange(N_STUDIES) % n_folds}).to_parquet(run / "folds.parquet")
    return [
        FoldJob("toy", "linear", k, n_folds, {}, str(tmp_path), str(run), {"table": str(src)})
        for k in range(n_folds)
    ]


def test_lr_schedule_warms_up_then_decays():
    f = [lr_factor(s, 100, 10) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:], strict=False)) and f[-1] < 0.01


def test_a_larger_batch_trains_at_the_batch_rules_learning_rate(tmp_path):
    """lr_batch: the optimiser runs at lr × √(batch·world / lr_batch) (or × the ratio, linear); 0 leaves lr alone."""
    cfg = TrainConfig(batch_size=32, lr=1e-3, lr_batch=8)
    assert cfg.scaled_lr() == pytest.approx(2e-3)
    assert cfg.scaled_lr(world=4) == pytest.approx(4e-3)  # 4 workers of 32: a step of 128
    assert dataclasses.replace(cfg, lr_rule="linear").scaled_lr() == pytest.approx(4e-3)
    assert dataclasses.replace(cfg, lr_batch=0).scaled_lr(world=4) == 1e-3
    with pytest.raises(ValueError, match="lr_rule"):
        TrainConfig(lr_rule="cubic")

    class Scaled(LinearStage):
        def train_config(self, job):
            return dataclasses.replace(super().train_config(job), epochs=1, batch_size=16, lr_batch=4, lr_rule="linear")

    seen = []
    run_fold(Scaled(), make_run(tmp_path)[0], device=torch.device("cpu"), on_epoch_end=seen.append)
    group = seen[-1].state["optimizer"]["param_groups"][0]
    assert group["initial_lr"] == pytest.approx(0.3 * 4)  # what the schedule warms up to and decays from


def test_plain_fold_learns_and_predicts_held_out_studies(tmp_path):
    jobs = make_run(tmp_path)
    model, metrics, oof = run_fold(LinearStage(epochs=15), jobs[0], device=torch.device("cpu"))
    assert sorted(oof["study_id"]) == split_studies(jobs[0], "val")
    assert metrics["train_mse"] < 0.2
    assert float(((oof["pred"] - oof["y"]) ** 2).mean()) < 0.2


def test_plain_loop_resumes_from_a_checkpoint_state(tmp_path):
    jobs = make_run(tmp_path)
    states = []
    run_fold(LinearStage(epochs=4), jobs[0], device=torch.device("cpu"), on_epoch_end=states.append)
    full = states[-1].state["model"]
    states2 = []
    run_fold(LinearStage(epochs=4), jobs[0], device=torch.device("cpu"), resume=states[1].state, on_epoch_end=states2.append)
    assert [s.epoch for s in states2] == [2, 3]
    for k in full:
        assert torch.allclose(full[k], states2[-1].state["model"][k], atol=1e-5)


@pytest.mark.slow
def test_folds_run_in_parallel_and_rerun_skips_finished(ray_local, tmp_path):
    jobs = make_run(tmp_path)
    oofs = run_folds(LinearStage(), jobs, ResourcesConfig(num_workers=1, cpus_per_worker=1))
    oof = pd.concat(oofs)
    assert sorted(oof["study_id"]) == list(range(1000, 1000 + N_STUDIES))  # every study exactly once
    assert all(is_done(j) for j in jobs)
    stamps = [read_done(j)["finished"] for j in jobs]
    # Each marker keeps the fold's timeline, in order: trial, worker, its turn, training, marker.
    for j in jobs:
        t = read_done(j)["timeline"]
        steps = [t[k] for k in ("trial_started", "worker_started", "job_started", "training_started", "training_finished", "finished")]
        assert steps == sorted(steps) and steps[-1] == read_done(j)["finished"]
    run_folds(LinearStage(), jobs, ResourcesConfig())
    assert [read_done(j)["finished"] for j in jobs] == stamps
    # The same seed in a fresh run directory gives the same out-of-fold table, bit for bit:
    # streamed, augmented batches come in the same order with the same augmentation.
    again = [dataclasses.replace(j, run_dir=str(tmp_path / "again")) for j in jobs]
    Path(again[0].run_dir).mkdir()
    shutil.copy(Path(jobs[0].run_dir, "folds.parquet"), Path(again[0].run_dir, "folds.parquet"))
    pd.testing.assert_frame_equal(pd.concat(run_folds(LinearStage(), again, ResourcesConfig())), oof)
    # Both folds ran at the same time on the 2 CPUs: their training overlapped.
    assert Path(fold_dir(jobs[0]), "model.pt").exists()
    # Every epoch reached Tune, named by its job, with the worker's own timing of its training and report.
    rows = [json.loads(line) for path in Path(jobs[0].run_dir, "ray", "tune").rglob("result.json") for line in path.read_text().splitlines()]
    for j in jobs:
        assert [r["epoch"] for r in rows if r["job"] == f"linear-fold{j.fold}"] == list(range(LinearStage().epochs))
    assert all(r["epoch_s"] > 0 and r["report_s"] >= 0 for r in rows)
    assert not list(Path(jobs[0].run_dir).rglob("resume.pt"))  # a done fold keeps no resume state


@pytest.mark.parametrize("pack", ["on", "off"])
def test_folds_that_need_others_start_after_them_in_one_run(ray_local, tmp_path, pack):
    """A second member whose fold k needs the first member's fold k: one Tune run, each fold
    starting once its need is done; its held-out samples are built by its folds (not cached)
    from the source, so it predicts what the first member's folds predict on the same studies.
    Lanes on (CPU): a slot's one Ray Train run takes job after job; off (GPU): a run per job."""
    first = make_run(tmp_path)
    second = [dataclasses.replace(j, member="after", needs=(f"linear-fold{j.fold}",)) for j in first]
    oofs = run_folds(LinearStage(), first + second, ResourcesConfig(pack_folds=pack))
    for a, b in zip(first, second, strict=True):
        assert read_done(a)["finished"] <= read_done(b)["timeline"]["job_started"]
    starts = {read_done(j)["timeline"]["worker_started"] for j in first + second}
    assert len(starts) <= 2 if pack == "on" else len(starts) == 4
    assert len(list(Path(first[0].run_dir, "ray", "tune").iterdir())) == 1
    caches = sorted(p.name.split("-")[1] for p in Path(first[0].run_dir, "samples").iterdir())
    assert caches == ["train", "val"]  # the members share one train cache; only the first member's val is cached
    pd.testing.assert_frame_equal(pd.concat(oofs[2:]).reset_index(drop=True), pd.concat(oofs[:2]).reset_index(drop=True))


@pytest.mark.slow
def test_folds_beyond_the_free_slots_train_in_one_lane_and_a_failed_one_fails_alone(ray_local, tmp_path):
    """Three folds on one slot: one Ray Train run trains them in turn. A failure in the second
    fold fails it alone (the third still trains, in a new Ray Train run of the slot; the run
    then raises naming it); a re-run skips the others and resumes it from its own last epoch.
    The last fold gives the model it gives trained on its own."""
    jobs = make_run(tmp_path, n_folds=3)
    one_slot = ResourcesConfig(max_concurrent_folds=1, max_failures=0)
    flag = str(tmp_path / "failed.flag")
    with pytest.raises(RuntimeError, match=r"1 fold job\(s\) of toy failed \(linear-fold1; first error: .*injected failure"):
        run_folds(LinearStage(epochs=4, fail_epoch=2, flag=flag, fail_fold=1), jobs, one_slot)
    assert [is_done(j) for j in jobs] == [True, False, True]
    assert Path(fold_dir(jobs[1]), "resume.pt").exists()
    first, third = read_done(jobs[0]), read_done(jobs[2])
    # The two that finished ran one after the other on the one slot (longest first: fold 0 has the fewest training studies).
    a, b = sorted([first, third], key=lambda d: d["timeline"]["job_started"])
    assert a is third and a["finished"] <= b["timeline"]["job_started"] and a["timeline"]["slot"] == b["timeline"]["slot"] == "slot0"
    run_folds(LinearStage(epochs=4), jobs, one_slot)
    assert read_done(jobs[0]) == first and read_done(jobs[2]) == third
    assert read_done(jobs[1])["resumed_from_epoch"] >= 1 and third["resumed_from_epoch"] == -1
    oofs = [pd.read_parquet(Path(fold_dir(j), "oof.parquet")) for j in jobs]
    # The lane's last fold, trained after others on the same slot, is the model it is when
    # trained alone in its own trial (fresh run directory): nothing leaks from fold to fold.
    alone = dataclasses.replace(jobs[2], run_dir=str(tmp_path / "alone"))
    Path(alone.run_dir).mkdir()
    shutil.copy(Path(jobs[0].run_dir, "folds.parquet"), Path(alone.run_dir, "folds.parquet"))
    (ref,) = run_folds(LinearStage(epochs=4), [alone], ResourcesConfig(pack_folds="off"))
    pd.testing.assert_frame_equal(oofs[2], ref)


def test_resources_config_rejects_a_non_positive_poll_interval():
    with pytest.raises(ValueError, match="poll_interval_s"):
        ResourcesConfig(poll_interval_s=0)


def test_lanes_are_on_for_cpu_folds_and_off_for_gpu_folds_unless_told():
    assert ResourcesConfig().packs() and not ResourcesConfig(use_gpu=True).packs()
    assert ResourcesConfig(use_gpu=True, pack_folds="on").packs() and not ResourcesConfig(pack_folds="off").packs()
    with pytest.raises(ValueError, match="pack_folds"):
        ResourcesConfig(pack_folds="yes")


@pytest.mark.slow
def test_interrupted_fold_resumes_from_its_last_epoch(ray_local, tmp_path):
    jobs = make_run(tmp_path)[:1]
    flag = str(tmp_path / "failed.flag")
    with pytest.raises(RuntimeError, match="failed"):
        run_folds(LinearStage(epochs=4, fail_epoch=2, flag=flag), jobs, ResourcesConfig(max_failures=0))
    assert os.path.exists(flag) and not is_done(jobs[0])
    run_folds(LinearStage(epochs=4), jobs, ResourcesConfig(max_failures=0))
    assert read_done(jobs[0])["resumed_from_epoch"] >= 1


@pytest.mark.slow
def test_killed_worker_is_restarted_from_the_last_epoch(ray_local, tmp_path):
    import psutil

    jobs = make_run(tmp_path)[:1]
    killed = []

    def killer():
        deadline = time.time() + 900  # a loaded 2-core machine can take minutes to the first checkpoint
        while time.time() < deadline and not killed:
            # Kill once the fold has a resume state (an epoch reported).
            if Path(fold_dir(jobs[0]), "resume.pt").exists():
                for p in psutil.process_iter(["cmdline"]):
                    title = " ".join(p.info["cmdline"] or [])
                    if "RayTrainWorker" in title:
                        os.kill(p.pid, signal.SIGKILL)
                        killed.append(p.pid)
                        return
            time.sleep(0.2)

    t = threading.Thread(target=killer)
    t.start()
    run_folds(LinearStage(epochs=6, sleep_s=0.15), jobs, ResourcesConfig(max_failures=2))
    t.join()
    assert killed, "no training worker was found to kill"
    done = read_done(jobs[0])
    assert done["resumed_from_epoch"] >= 0
    oof = pd.read_parquet(io.BytesIO(Path(fold_dir(jobs[0]), "oof.parquet").read_bytes()))
    assert len(oof) == N_STUDIES // 2
    assert json.loads(Path(fold_dir(jobs[0]), "done.json").read_text())["rows"] == N_STUDIES // 2


def test_a_fold_trained_twice_in_one_process_gives_the_same_model(tmp_path):
    """Initial weights come from the fold's seed, not from whatever the process's RNG did before."""
    jobs = make_run(tmp_path)
    first = run_fold(LinearStage(), jobs[0], device=torch.device("cpu"))[2]
    torch.rand(7)  # the process's generator moves on between the runs
    second = run_fold(LinearStage(), jobs[0], device=torch.device("cpu"))[2]
    np.testing.assert_array_equal(first["pred"].to_numpy(), second["pred"].to_numpy())


def test_fractional_gpus_put_several_fold_jobs_on_one_gpu(monkeypatch):
    import ray

    import spine_ray.engine.schedule as sched

    quarter = ResourcesConfig(use_gpu=True, gpus_per_worker=0.25)
    assert quarter.worker_resources() == {"CPU": 1.0, "GPU": 0.25}
    assert ResourcesConfig().worker_resources() == {"CPU": 1.0}  # no GPU share without use_gpu
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    assert sched.concurrent_folds(quarter, 20) == 8  # 2 GPUs × 4 jobs each
    assert sched.concurrent_folds(ResourcesConfig(use_gpu=True), 20) == 2
    assert sched.concurrent_folds(ResourcesConfig(use_gpu=True, num_workers=2, gpus_per_worker=0.5), 20) == 2
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(ValueError, match="gpus_per_worker"):
            ResourcesConfig(use_gpu=True, gpus_per_worker=bad)


def test_precision_is_the_members_autocast_where_amp_takes_effect(monkeypatch):
    from contextlib import nullcontext

    from spine_ray.engine import train_loop
    from spine_ray.engine.train_loop import TrainConfig, precision

    cpu = torch.device("cpu")
    assert isinstance(precision(TrainConfig(), cpu), nullcontext)  # amp acts on CUDA only
    monkeypatch.setattr(train_loop, "AMP_DEVICES", ("cuda", "cpu"))
    on = precision(TrainConfig(), cpu)
    assert isinstance(on, torch.autocast) and on.fast_dtype == torch.bfloat16
    assert precision(TrainConfig(amp_dtype="float16"), cpu).fast_dtype == torch.float16
    assert isinstance(precision(TrainConfig(amp=False), cpu), nullcontext)
    with precision(TrainConfig(), cpu):
        assert torch.is_autocast_enabled("cpu") and torch.nn.Linear(4, 4)(torch.ones(1, 4)).dtype == torch.bfloat16
