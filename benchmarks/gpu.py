"""GPU throughput of the rsna2024 recipe's training units: the real training path against the bare step.

One prepared script for a bare GPU machine without network (issue 28, part 5). It synthesises a
few studies at real image sizes straight into a prepared volumes table (the project's phantom and
acquisition planner, rendered as numpy: no DICOM, so no pydicom), builds each unit's samples with
its stage's own `to_samples` (the sample cache), and for each unit of `jobs/rsna2024.yaml` (its
networks built with pretrained=False: the same shapes, nothing to download) measures

  fit        samples/s and data_wait_frac of the real training path, as the train loop reports them
             for its second epoch: a one-worker Ray Train `TorchTrainer` running the fold driver
             (`engine.worker.train_worker`, Ray Data input) when Ray is importable, else the same
             driver in-process (`engine.fold.fit_fold` on `StreamedBatches`' thread pipeline);
             pinned memory on CUDA either way;
  ready      the same `fit_fold` fed pre-collated pinned batches: the loop without its input pipeline;
  bare, 4x   the model, its loss and AdamW (the loop's: fused on CUDA, its autocast) on batches
             already on the device, at the recipe's batch and at 4x it, timed between synchronisations;
  cuDNN      (on a GPU) the bare step at the recipe's batch again with cuDNN's autotuner the other way from the
             member's `train.cudnn_benchmark` (off in the recipe): whether turning it on pays;
  shared     --shared N processes (default 4) on the one device, each the bare step at the recipe's
             batch over a common window, their samples/s summed: N fold jobs sharing a GPU
             (`resources.gpus_per_worker: 1/N`), against one job at 4x the batch (`train.lr_batch`);
             for the --shared-units (default the ConvNeXt grader), 15 % of the budget;
  peak GiB   torch.cuda.max_memory_allocated during fit (under Ray: NVML's device figure, less the start);
  util %     GPU utilisation during fit's second epoch, sampled through NVML (torch.cuda.utilization,
             else nvidia-smi, else n/a);
  CPU cores  CPU time / wall during that epoch: this process's (in brackets its augmentation
             thread's), or the whole machine's under Ray, whose trainer and tasks are other processes;
  augment    augment + collate samples/s per CPU core (one thread, process CPU time);
  on device  (grade units) the same two figures with `augment_on: device`: the CPU share per core, and
             the bare step that makes the crops on the device (`on_device`, as the loop calls it);
then `StudyPredictor.predict`, the per-study work of `spine-ray infer` (every member and fold on the
device, decoding excluded), in studies/s on the synthetic studies. `spine-ray infer` itself is not
run: it decodes DICOM files (pydicom) in Ray Data tasks, and these studies are never written as DICOM.
The table prints the issue's H200 figures (2026-12) in brackets beside today's.

On the GPU machine (Python 3.12, torch, timm, pandas, pyarrow; no Ray, no pydicom), from the
repository root: `benchmarks/device_run.py` runs this script and then `benchmarks/gpu_learn.py` in one
call inside the session's device time (its docstring has the command). With Ray (the real path
through a Ray Train worker), `.whl/ray-site.tar.xz` travels (`bash benchmarks/device_pack.sh`: Ray 2.60
stripped and its missing dependencies, 26 MiB; carry [".whl"]); without it the real path is the
in-process one. Alone:

    mkdir -p /tmp/site && tar xJf .whl/ray-site.tar.xz -C /tmp/site && { python3 -m compileall -q -j0 /tmp/site >/dev/null || true; } && PYTHONPATH=/tmp/site:. RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1 python3 benchmarks/gpu.py --size real --json $OUT/gpu.json 2>&1 | tee $OUT/gpu.log

Then, here, `benchmarks/schedule.py --rates gpu.json` prices the recipe with the measured rates
(docs/scale-out.md's tables), and `gpu.py --table gpu.json` prints the tables of a saved JSON (one
saved after every unit: a run stopped at its time limit keeps what it measured).

Time. It keeps inside --budget-s (450 s): a fifth is kept for inference and 15 % for the shared
measurement; each unit's timed windows get an equal part of what is left after the overhead
expected for every unit still to come (its time outside the windows: compilation of each batch
shape, Ray Train's worker start, the samples; --overhead-s, 90 s on a GPU, until the first unit has
measured its own), at least 5 s. The units run in the order a run cut short should keep them: the
ConvNeXt grader (the issue's headline figure), then by their share of the recipe's GPU-hours. With
`train.compile` on, every fold job compiles each batch shape once: on this 2-core CPU convnext_small's
training step took 75 s to compile cold, 74 s more at another batch, 23 s for evaluation, and 3-4 s
each from torch's on-disk cache in a new process (`benchmarks/compile_time.py`); how long on the GPU machine is one of the
figures this run reports (the bare loop's first steps at each batch, and each unit's time
beyond its windows).

On CPU, tiny (timm's test_* networks, 64 px; what tests/test_gpu_bench.py runs):

    PYTHONPATH=. python benchmarks/gpu.py --size tiny --device cpu --studies 3 --steps 2 --no-ray
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from spine_ray.core.config import load, save, to_dict
from spine_ray.core.schema import (
    CONDITION_SERIES,
    CONDITIONS,
    LEVELS,
    label_matrix,
    labels_from_matrix,
    labels_long,
    with_target,
)
from spine_ray.data import geometry
from spine_ray.data.geometry import Stack
from spine_ray.data.volumes import (
    LABELS_FILE,
    MANIFEST,
    SCHEMA_VERSION,
    VOLUMES_DIR,
    read_volumes,
    rows_to_table,
    stack_row,
)
from spine_ray.engine import train_loop
from spine_ray.engine.fold import fit_fold
from spine_ray.engine.resources import ResourcesConfig
from spine_ray.engine.sample_cache import (
    cache_input,
    chunks,
    count_samples,
    ensure_cache,
    read_cache,
    split_studies,
    write_manifest,
    write_part,
)
from spine_ray.engine.stage import FoldJob, Stage, collate, columns, new_model, steps_per_epoch
from spine_ray.engine.stream import StreamedBatches
from spine_ray.engine.train_loop import _Optim  # the loop's own optimiser, scaler and autocast
from spine_ray.ensemble.baseline import write_prior
from spine_ray.ensemble.prior import fit_prior
from spine_ray.models.backbone import checkpointing_of, resolve_checkpointing, speed_up
from spine_ray.run_config import PipelineConfig
from spine_ray.stages.grade.config import GradeConfig
from spine_ray.stages.grade.samples import fake_points
from spine_ray.stages.localize import ViewConfig
from spine_ray.stages.onestage import OneStageConfig
from spine_ray.stages.registry import STAGES, model_url
from spine_ray.synth.acquisition import AcquisitionConfig, plan_study
from spine_ray.synth.anatomy import sample_spine
from spine_ray.synth.labels import sample_labels
from spine_ray.synth.phantom import N_LEVELS, sample_phantom
from spine_ray.synth.presets import preset_acquisition
from spine_ray.synth.render import render_realistic, render_series, sample_scanner


@dataclasses.dataclass(frozen=True)
class Unit:
    """One row of the issue's table: a member of the recipe and the issue's H200 figures for it."""

    key: str
    stage: str
    member: str
    label: str
    # fit samples/s, bare samples/s, bare at 4x batch, peak GiB in fit, augment+collate per core
    issue: tuple[float, float, float, float, float]


# In the order a run cut short should keep them: the issue's headline unit, then by their share of the recipe's
# GPU-hours (`benchmarks/schedule.py`: the sagittal and axial units also price the EfficientNet localisers).
UNITS = (
    Unit("grade_convnext", "grade", "convnext_small", "grade, convnext_small", (90.6, 90.9, 172.3, 8.3, 18.8)),
    Unit("sag_t2", "localize", "sag_t2", "sagittal T2 localiser, convnext_small", (38.8, 43.6, 55.9, 14.1, 12.2)),
    Unit("axial", "localize", "axial", "axial localiser, convnext_small", (86.3, 88.9, 123.1, 13.1, 33.9)),
    Unit("onestage", "onestage", "onestage_convnext_small", "one-stage, convnext_small x 2 views", (13.7, 14.7, 21.5, 10.6, 5.9)),
    Unit("grade_effnet", "grade", "efficientnet_b3", "grade, tf_efficientnet_b3", (69.2, 77.2, 99.8, 6.8, 17.0)),
)
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # before the Ray path starts Ray

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = {"real": 512, "tiny": 64}  # native pixels of the synthetic series (the RSNA images are mostly 512)


# ---- synthetic studies, written as a finished `prepare` output without DICOM ----


def synth_study(index: int, study_id: int, labels: np.ndarray, latent: np.ndarray, image_size: int, seed: int, preset: str = "simple") -> tuple[list[dict], list[dict]]:
    """One study's volume rows and label points, one stack a series: the project's phantom rendered per series.

    `preset` "simple": the flat phantom at `image_size`; "realistic": the `realistic` preset's anatomy,
    scanner contrast and acquisition (its 384-640 px image sizes; `image_size` is not used). Label
    points are the structures' true points (no reader's placement error).
    """
    rng = np.random.default_rng([seed, 1, index])
    realistic = preset == "realistic"
    phantom = sample_spine(latent, rng) if realistic else sample_phantom(latent, rng)
    scanner = sample_scanner(rng) if realistic else None
    acq = preset_acquisition("realistic") if realistic else AcquisitionConfig(image_sizes=(image_size,))
    # One continuous axial stack and every series present: a sample's shape does not depend on them.
    acq = dataclasses.replace(acq, axial_block_fraction=0.0, extra_axial=(0.0, 0.0), missing_series=0.0)
    rows, stacks = [], {}
    for plan in plan_study(phantom, labels, rng, acq):
        first = plan.geometry.slices[0]
        orientation = (*first.row_dir, *first.col_dir)
        positions = np.array([s.position for s in plan.geometry.slices], np.float64)
        order = np.argsort(geometry.slice_distances(positions, orientation), kind="stable")  # as the decoder orders slices
        if scanner is not None:
            rendered = render_realistic(phantom, plan.geometry, plan.description, scanner, rng)
        else:
            rendered = render_series(phantom, plan.geometry, plan.description, rng)
        images = np.stack(rendered)[order]
        stack = Stack(
            images, [plan.instance_numbers[i] for i in order], positions[order], orientation, first.spacing,
            plan.geometry.spacing_between, geometry.affine(positions[order], orientation, first.spacing, plan.geometry.thickness),
        )
        rows.append(stack_row(study_id, plan.series_id, plan.description, 0, stack))
        stacks[plan.description] = (plan.series_id, stack)
    points = []
    for (c, lv), point in phantom.target_points().items():
        series = stacks.get(CONDITION_SERIES[CONDITIONS[c]])
        if labels[c * N_LEVELS + lv] < 0 or series is None:
            continue
        series_id, st = series
        hit = geometry.nearest_slice(point, st.positions, st.orientation, st.pixel_spacing, st.volume.shape[1:])
        if hit.distance_mm > 0.75 * st.slice_spacing or not hit.inside:  # the reader found no slice through it
            continue
        xyz = geometry.pixel_to_patient(st.positions[hit.slice], st.orientation, st.pixel_spacing, hit.row, hit.col)
        points.append({
            "study_id": study_id, "target": f"{CONDITIONS[c]}_{LEVELS[lv]}", "series_id": series_id,
            "instance_number": st.instance_numbers[hit.slice], "stack": 0, "slice": hit.slice, "row": hit.row, "col": hit.col,
            "x_mm": xyz[0], "y_mm": xyz[1], "z_mm": xyz[2],
        })
    return rows, points


POINT_COLUMNS = ["series_id", "instance_number", "stack", "slice", "row", "col", "x_mm", "y_mm", "z_mm"]


def synth_labels(studies: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The labels [n, 25], latents and oracle probabilities [n, 25, 3] of `synth_prepared`'s studies."""
    return sample_labels(studies, np.random.default_rng([seed, 0]))


def synth_ids(studies: int) -> list[int]:
    """The study ids of `synth_prepared`'s studies."""
    return [100_000 + i for i in range(studies)]


def synth_prepared(out: Path, studies: int, image_size: int, seed: int, workers: int, preset: str = "simple") -> pd.DataFrame:
    """`studies` synthetic studies as a finished prepare output (volumes, labels.parquet, manifest); returns the wide labels."""
    labels, latent, _ = synth_labels(studies, seed)
    ids = synth_ids(studies)
    args = (range(studies), ids, labels, latent, [image_size] * studies, [seed] * studies, [preset] * studies)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            made = list(pool.map(synth_study, *args))
    else:
        made = [synth_study(*a) for a in zip(*args, strict=True)]
    (out / VOLUMES_DIR).mkdir(parents=True)
    names = [f"part-{i:05d}.parquet" for i in range(studies)]
    for name, (rows, _) in zip(names, made, strict=True):
        pq.write_table(rows_to_table(rows), out / VOLUMES_DIR / name, compression="none")
    # labels.parquet as `prepare` builds it: a row per study × target, the point where one was read.
    wide = labels_from_matrix(ids, labels)
    points = pd.DataFrame([p for _, pts in made for p in pts], columns=["study_id", "target", *POINT_COLUMNS])
    long = with_target(labels_long(wide)).merge(points, on=["study_id", "target"], how="left").drop(columns="target")
    long = long.astype({c: "Int64" if c in POINT_COLUMNS[:4] else "Float64" for c in POINT_COLUMNS})
    long.to_parquet(out / LABELS_FILE)
    manifest = {"schema_version": SCHEMA_VERSION, "kind": "benchmarks/gpu.py synthetic", "split": "train",
                "files": {"volumes": names, "labels": LABELS_FILE, "errors": None}, "config": {"image_size": image_size, "seed": seed, "preset": preset, "studies": studies}}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return wide


# ---- the recipe at a size ----


def _backbone_sized(cfg: Any, tiny: bool, **small: Any) -> Any:
    """A backbone config without pretrained weights (no network here); tiny: timm's test_* network and `small` widths."""
    if not tiny:
        return dataclasses.replace(cfg, pretrained=False, weights=None)
    name = "test_convnext" if "convnext" in cfg.backbone else "test_efficientnet" if "efficientnet" in cfg.backbone else "test_resnet"
    return dataclasses.replace(cfg, pretrained=False, weights=None, backbone=name, **small)


def member_sized(config: Any, tiny: bool) -> Any:
    """A member config at the benchmark's size: the recipe's (weights off), or tiny for a CPU run."""
    if isinstance(config, ViewConfig):
        sized = dataclasses.replace(config, model=_backbone_sized(config.model, tiny, hidden=16))
        return dataclasses.replace(sized, size=64, slices=3 if config.slices < 8 else 8) if tiny else sized
    if isinstance(config, GradeConfig):
        sized = dataclasses.replace(config, model=_backbone_sized(config.model, tiny, dim=32, lstm_hidden=16))
        return dataclasses.replace(sized, out_px=32, k=1) if tiny else sized
    if isinstance(config, OneStageConfig):
        net = _backbone_sized(config.model.net, tiny, hidden=16)
        sized = dataclasses.replace(config, model=dataclasses.replace(config.model, net=net))
        return dataclasses.replace(sized, size=64, slices=8) if tiny else sized
    raise TypeError(f"no size for a {type(config).__name__}")


def recipe(path: str, prepared: Path, run_dir: Path, tiny: bool) -> PipelineConfig:
    """The run config with every member sized (`member_sized`)."""
    cfg = load(PipelineConfig, path, [f"prepared={prepared}", f"run_dir={run_dir}"])
    for m in cfg.members():
        cfg = cfg.with_member(m.stage, m.name, member_sized(m.config, tiny))
    return cfg


def with_epochs(config: Any, epochs: int) -> Any:
    """A member config that trains `epochs` epochs (every stage's config has `train`)."""
    return dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=epochs))


def replicated(job: FoldJob, url: str, rows: pd.DataFrame, n: int, run: Path) -> FoldJob:
    """The job on a sample cache of about `n` training samples: copies of `rows` under new study ids.

    The few synthetic studies make an epoch of a few steps; copies (fold 1) give the streamed
    pipeline a real epoch to read and augment. The original studies stay as fold 0 (validation).
    """
    real = sorted(int(s) for s in rows["study_id"].unique())
    copies = max(1, round(n / max(len(rows), 1)))
    ids = [r * 10**6 + s for r in range(1, copies + 1) for s in real]  # the synthetic ids stay below 10**6
    run.mkdir(parents=True)
    pd.DataFrame({"study_id": real + ids, "fold": [0] * len(real) + [1] * len(ids)}).to_parquet(run / "folds.parquet")
    cache = run / "samples"
    cache.mkdir()
    names, counts = [], []
    for i, part in enumerate(chunks(ids, 8)):
        names.append(f"part-{i:05d}.parquet")
        df = pd.concat([rows[rows["study_id"] == s % 10**6].assign(study_id=s) for s in part], ignore_index=True)
        counts.append(write_part(df, part, str(cache / names[-1])))
    write_manifest(str(cache), "replicated", {"copies": copies, "of": url}, names, counts, len(names), 0.0)
    return dataclasses.replace(job, run_dir=str(run), inputs={**job.inputs, cache_input("train"): str(cache)})


# ---- measurement ----


def gpu_util_reader(device: torch.device) -> tuple[Callable[[], float] | None, str]:
    """How this machine's GPU utilisation is read: NVML through torch, else nvidia-smi, else not at all."""
    if device.type != "cuda":
        return None, "n/a (CPU)"
    try:
        torch.cuda.utilization(device)
        return (lambda: float(torch.cuda.utilization(device))), "NVML (torch.cuda.utilization)"
    except Exception:  # noqa: BLE001 - no pynvml / nvidia-ml-py: try the command line
        pass
    if shutil.which("nvidia-smi"):
        index = torch.cuda.current_device() if device.index is None else device.index
        cmd = ["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]

        def smi() -> float:
            return float(subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout.split()[0])

        with contextlib.suppress(Exception):
            smi()
            return smi, "nvidia-smi"
    return None, "n/a"


def _thread_cpu(prefix: str) -> dict[int, float]:
    """CPU seconds of this process's live threads whose name starts with `prefix`."""
    out = {}
    for t in threading.enumerate():
        if t.name.startswith(prefix) and t.ident is not None:
            with contextlib.suppress(OSError, ProcessLookupError):  # it ended meanwhile
                out[t.ident] = time.clock_gettime(time.pthread_getcpuclockid(t.ident))
    return out


def _machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all processes); only the Ray path asks."""
    # isort: off
    import ray  # noqa: F401 - first: puts Ray's own psutil (ray/thirdparty_files) on the path where none is installed
    import psutil
    # isort: on

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


class Sampler:
    """While a block runs: GPU utilisation and device memory (NVML), and CPU time per wall second.

    `restart()` starts the window afresh (at the measured epoch). CPU time is this process's, and
    its augmentation threads' (`thread_stream` names them augment-*), or the machine's (`machine`).
    """

    def __init__(self, util: Callable[[], float] | None, device: torch.device, machine: bool = False, interval: float = 0.1) -> None:
        self.util, self.device, self.machine, self.interval = util, device, machine, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def restart(self) -> None:
        self.t0, self.cpu0 = time.perf_counter(), _machine_busy() if self.machine else time.process_time()
        self.utils: list[float] = []
        self.base = _thread_cpu("augment-")
        self.last = dict(self.base)
        self.mem0 = self._memory() or 0.0
        self.mem_peak = self.mem0

    def _memory(self) -> float | None:
        if self.device.type != "cuda":
            return None
        try:
            return float(torch.cuda.device_memory_used(self.device))
        except Exception:  # noqa: BLE001 - NVML missing
            return None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.util is not None:
                with contextlib.suppress(Exception):
                    self.utils.append(self.util())
            self.last.update(_thread_cpu("augment-"))
            self.mem_peak = max(self.mem_peak, self._memory() or 0.0)

    def __enter__(self) -> Sampler:
        self.restart()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.last.update(_thread_cpu("augment-"))
        wall = max(time.perf_counter() - self.t0, 1e-9)
        self.cpu_cores = ((_machine_busy() if self.machine else time.process_time()) - self.cpu0) / wall
        self.pipeline_cores = sum(v - self.base.get(k, 0.0) for k, v in self.last.items()) / wall if self.last else None
        self.util_mean = float(np.mean(self.utils)) if self.utils else None
        self.device_peak = self.mem_peak - self.mem0


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread for the block (the augmentation rate is per core)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _bare_step(stage: Stage, job: FoldJob, model: torch.nn.Module, o: _Optim, batch: dict) -> None:
    """One optimiser step as the loop takes it (the stage's `on_device` first, outside autocast: a deferred grade batch
    is augmented there), less clipping, the schedule and the loss bookkeeping."""
    if hasattr(stage, "on_device"):
        batch = stage.on_device(job, batch)
    with o.autocast():
        loss, _ = stage.loss(job, model, batch)
    o.opt.zero_grad(set_to_none=True)
    o.scaler.scale(loss).backward()
    o.scaler.step(o.opt)
    o.scaler.update()


def _bare_model(stage: Stage, job: FoldJob, device: torch.device, steps: int, share: float = 1.0) -> tuple[torch.nn.Module, _Optim]:
    """The job's model as the fold driver sets it up (`grad_checkpointing: auto` for its `share` of the device, speed-ups on CUDA,
    its trainable part) in train mode, and the loop's optimiser."""
    cfg = stage.train_config(job)
    model = new_model(stage, job).to(device)
    resolve_checkpointing(model, device, share)
    if device.type == "cuda":
        speed_up(model, cfg.channels_last, cfg.compile, cfg.cudnn_benchmark)
    if hasattr(stage, "set_trainable"):
        stage.set_trainable(job, model)
    model.train()
    return model, _Optim.build(model, cfg, steps, device)


def bare_rates(stage: Stage, job: FoldJob, batches: list[dict], device: torch.device, steps: int, limits: list[float],
               flip_cudnn: float = 0.0) -> tuple[list[float], bool, list[float]]:
    """Samples/s of model + loss + AdamW on each batch (already on the device), after warm-up, timed between synchronisations;
    whether the model trained checkpointed (`grad_checkpointing`, `auto` settled for the whole device); and each batch's
    warm-up seconds (its first steps: with `train.compile` on a GPU, the compilation for that batch shape).

    `flip_cudnn` > 0: one more rate at the end, the first batch again for about that many seconds with cuDNN's
    autotuner the other way from the member's `train.cudnn_benchmark` (the same model; restored after).
    """
    model, o = _bare_model(stage, job, device, steps)
    checkpointed = any(checkpointing_of(model))
    rates, warm = [], []
    recipe_cudnn = torch.backends.cudnn.benchmark
    runs = list(zip(batches, limits, strict=True)) + ([(batches[0], flip_cudnn)] if flip_cudnn > 0 else [])
    for i, (batch, limit) in enumerate(runs):
        torch.backends.cudnn.benchmark = recipe_cudnn if i < len(batches) else not recipe_cudnn
        n = next(int(v.shape[0]) for v in batch.values() if v.ndim)
        try:
            on_device = {k: v.to(device) for k, v in batch.items()}
            t0 = time.perf_counter()
            for _ in range(3 if device.type == "cuda" else 1):
                _bare_step(stage, job, model, o, on_device)
            _sync(device)
            warm.append(time.perf_counter() - t0)
            t0, done = time.perf_counter(), 0
            while done < max(2, steps) and (done < 2 or time.perf_counter() - t0 < limit):
                _bare_step(stage, job, model, o, on_device)
                done += 1
            _sync(device)
            rates.append(done * n / (time.perf_counter() - t0))
        except torch.cuda.OutOfMemoryError:  # a batch the device cannot hold (e.g. 4x without checkpointing): n/a, the run goes on
            print(f"  {job.stage}/{job.member}: batch of {n} does not fit on {device}: n/a", flush=True)
            rates.append(float("nan"))
            warm.append(float("nan"))
            on_device = None
            o.opt.zero_grad(set_to_none=True)
            _free(device)
    torch.backends.cudnn.benchmark = recipe_cudnn
    del model, o, on_device
    _free(device)
    return rates, checkpointed, warm


def _shared_job(stage: Stage, job: FoldJob, batch: dict, device_name: str, warmup: int, seconds: float, barrier: Any, out: Any, share: float) -> None:
    """One of the fold jobs that share a GPU (a spawned process): the bare step at the recipe's batch for `seconds` once all are ready."""
    device = torch.device(device_name)
    if device.type == "cpu":
        torch.set_num_threads(1)
    model, o = _bare_model(stage, job, device, 100, share)
    on_device = {k: v.to(device) for k, v in batch.items()}
    n = next(int(v.shape[0]) for v in batch.values() if v.ndim)
    for _ in range(warmup):  # first kernels, compilation (its cache is warm from the bare loop's)
        _bare_step(stage, job, model, o, on_device)
    _sync(device)
    try:
        barrier.wait()  # every job ready: the windows overlap
    except threading.BrokenBarrierError:  # the parent gave up waiting for the slowest job
        return
    t0, done = time.perf_counter(), 0
    while done < 2 or time.perf_counter() - t0 < seconds:
        _bare_step(stage, job, model, o, on_device)
        done += 1
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    out.put((done * n / (time.perf_counter() - t0), peak))


def shared_rate(stage: Stage, job: FoldJob, batch: dict, device: torch.device, jobs: int, seconds: float, timeout: float) -> dict[str, Any]:
    """`jobs` processes on one device, each the bare step at the recipe's batch (what `resources.gpus_per_worker: 1/jobs`
    gives: separate fold jobs, every optimisation step as it is); their summed samples/s over a common window.

    `timeout`: how long to wait for every job to be ready (start-up, model, compilation); past it, n/a.
    """
    import queue

    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(jobs + 1), ctx.Queue()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_shared_job, args=(stage, job, batch, str(device), 3 if device.type == "cuda" else 1, seconds, barrier, out, 1 / jobs), daemon=True)
             for _ in range(jobs)]
    for p in procs:
        p.start()
    results: list[tuple[float, float | None]] = []
    try:
        barrier.wait(timeout=timeout)
        ready_s = time.perf_counter() - t0
        for _ in procs:
            results.append(out.get(timeout=seconds + 60))
    except (threading.BrokenBarrierError, queue.Empty):
        ready_s = float("nan")
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if len(results) < jobs:
        return {"jobs": jobs, "samples_per_s": None, "per_job": None, "peak_gib_sum": None, "ready_s": ready_s}
    peaks = [p for _, p in results if p is not None]
    return {"jobs": jobs, "samples_per_s": sum(r for r, _ in results), "per_job": [r for r, _ in results],
            "peak_gib_sum": sum(peaks) if peaks else None, "ready_s": ready_s}


def ray_fit(stage: Stage, job: FoldJob, resources: ResourcesConfig) -> dict[str, float]:
    """The fold through a one-worker Ray Train `TorchTrainer` (`train_worker`, as `spine-ray train` runs it, less Tune); its last epoch's metrics."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from spine_ray.core.raycluster import init_ray
    from spine_ray.engine.board import Board
    from spine_ray.engine.stage import fold_dir, job_key
    from spine_ray.engine.tracking import METRICS_FILE
    from spine_ray.engine.worker import train_worker

    init_ray(quiet=True)
    board = ray.remote(Board).options(num_cpus=0).remote([job_key(job)], {})  # a run's job board, of this one job
    TorchTrainer(
        train_worker,
        train_loop_config={"stages": {job.stage: stage}, "jobs": {job_key(job): job}, "board": board, "slot": "slot0", "per_run": 1,
                           "resources": resources},
        scaling_config=ray.train.ScalingConfig(num_workers=1, use_gpu=resources.use_gpu, resources_per_worker=resources.worker_resources()),
        run_config=ray.train.RunConfig(name=job_key(job), storage_path=str(Path(job.run_dir).resolve() / "ray")),
    ).fit()
    return json.loads((Path(fold_dir(job)) / METRICS_FILE).read_text().splitlines()[-1])


def fit_steps(seconds: float, rate: float, batch: int, cap: int) -> int:
    """Steps per epoch for a two-epoch fit to take about `seconds` at `rate` samples/s (2..cap)."""
    return int(min(cap, max(2, seconds * rate / (2 * batch))))


def fit_resources(cfg: PipelineConfig, cuda: bool, use_ray: bool) -> ResourcesConfig:
    """The recipe's resources for the real path here."""
    return dataclasses.replace(
        cfg.resources, use_gpu=cuda,
        # A shuffle buffer refills at every epoch: hundreds of samples would be most of a short epoch.
        shuffle_mb=0.0, **({} if use_ray else {"input_pipeline": "thread"}),
        # On CPU every core is a trainer's: augmentation shares them (ResourcesConfig's own defaults).
        **({} if cuda else {"cpus_per_worker": 1.0, "data_cpus": 0.0, "data_concurrency": 1}),
    )


def ray_unusable(no_ray: bool) -> str | None:
    """Why the real path cannot go through Ray here (None: it can): --no-ray, or Ray failing to import
    (absent, or an unpacked archive built for another Python: found, but its _raylet does not load)."""
    if no_ray:
        return "--no-ray"
    try:
        import ray  # noqa: F401
    except Exception as e:  # noqa: BLE001 - ImportError, or OSError from a binary of another Python
        return f"Ray not importable here: {type(e).__name__}: {e}"
    return None


def path_name(resources: ResourcesConfig, use_ray: bool, why: str) -> str:
    """What the real path is, in words."""
    feed = (f"Ray Data input ({resources.data_concurrency} tasks of {resources.data_cpus:g} CPU)" if resources.pipeline() == "ray"
            else "StreamedBatches' thread pipeline (one augmentation thread)")
    how = "a one-worker Ray Train TorchTrainer (engine.worker.train_worker)" if use_ray else f"in-process fit_fold ({why})"
    return f"{how}, {feed}" + ("; pinned memory" if resources.use_gpu else "")


def measure_unit(unit: Unit, cfg: PipelineConfig, work: Path, device: torch.device, args: argparse.Namespace, seconds: float,
                 util: Callable[[], float] | None, use_ray: bool, resources: ResourcesConfig, shared_s: float = 0.0) -> dict[str, Any]:
    """Every figure of one unit, its measurements sized to take about `seconds` together (and `shared_s` more for
    `args.shared` jobs sharing the device, when given)."""
    t_unit = time.perf_counter()
    stage, member = STAGES[unit.stage], cfg.member(unit.stage, unit.member)
    inputs = {"points": str(work / "points.parquet")} if unit.stage == "grade" else {}
    job = FoldJob(unit.stage, unit.member, 0, 2, with_epochs(member.config, 2), cfg.prepared, str(work / "run"), inputs)
    url, _ = ensure_cache(stage, job, "train", str(work / "samples"), parallel=False)
    rows = read_cache(url, sorted(int(s) for s in pd.read_parquet(work / "run" / "folds.parquet")["study_id"]))
    bs = stage.train_config(job).batch_size
    cuda = device.type == "cuda"

    # Augment + collate, one thread: its samples/s per core, and the bare loop's two batches.
    rng = np.random.default_rng(0)
    picks = [rng.integers(0, len(rows), bs), rng.integers(0, len(rows), 4 * bs)]
    with one_thread():
        c0 = time.process_time()
        small, large = (collate(stage, job, columns(rows.iloc[i]), rng) for i in picks)
        augment = 5 * bs / max(time.process_time() - c0, 1e-9)
    batches, limits = [small, large], [0.1 * seconds, 0.15 * seconds]
    # The grade stage's other path (`augment_on: device`): the pipeline draws the parameters and ships the stored
    # patches, the step makes the crops on the device. Its CPU share per core, and the bare step with that work in it.
    device_aug = unit.stage == "grade"
    if device_aug:
        dev_job = dataclasses.replace(job, config=dataclasses.replace(job.config, augment_on="device"))
        with one_thread():
            c0 = time.process_time()
            deferred = [collate(stage, dev_job, columns(rows.iloc[i]), rng) for i in picks]
            augment_dev = 5 * bs / max(time.process_time() - c0, 1e-9)
        batches, limits = [*batches, deferred[0]], [*limits, 0.1 * seconds]
    cudnn = stage.train_config(job).cudnn_benchmark
    flip = 0.05 * seconds if cuda else 0.0  # cuDNN's autotuner the other way (a CPU has no cuDNN)
    (bare, bare4, *more), checkpointed, warm = bare_rates(stage, job, batches, device, args.steps, limits, flip)  # the issue's one-stage figures: checkpointed
    dev_rate, flipped = (more[0] if device_aug else None), (more[-1] if flip else None)
    # More work per GPU, the other way: several fold jobs on the device, each step unchanged.
    shared = shared_rate(stage, job, small, device, args.shared, 0.3 * shared_s, max(60.0, 0.65 * shared_s)) if shared_s > 0 else None

    # The real path, on enough copies of the samples for two epochs of `steps` batches.
    lanes = resources.data_concurrency if resources.pipeline() == "ray" else 1  # augmentation tasks in flight
    steps = fit_steps(0.4 * seconds, min(bare, augment * lanes), bs, args.steps)
    rep = replicated(job, url, rows, steps * bs, work / f"{unit.key}-fit")
    n_train = count_samples(rep.inputs[cache_input("train")], split_studies(rep, "train"))
    steps = steps_per_epoch(n_train, bs)
    if use_ray:  # the worker validates on rank 0 and predicts the held-out studies, as in a run
        val_url, _ = ensure_cache(stage, job, "val", str(work / "samples"), parallel=False)
        rep = dataclasses.replace(rep, inputs={**rep.inputs, cache_input("val"): val_url})
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with Sampler(util, device, machine=use_ray) as sampler:
        if use_ray:
            fit = ray_fit(stage, rep, resources)
        else:
            stream = StreamedBatches(stage, rep, resources, steps, pin=cuda)

            def batches(epoch: int) -> Iterator[dict]:
                if epoch == 1:  # the window of the figures: the epoch the loop's metrics are of
                    sampler.restart()
                return stream(epoch)

            model, fit = fit_fold(stage, rep, batches, n_train, device=device)
            del model
    if not cuda:
        peak = None
    elif use_ray:  # the trainer is another process: the device's own count, less what it held before
        peak = sampler.device_peak / 2**30 if sampler.device_peak > 0 else None
    else:
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    _free(device)
    shutil.rmtree(work / f"{unit.key}-fit", ignore_errors=True)

    # The same loop fed batches that are ready (pinned, collated once): the loop without its input pipeline.
    ready_steps = fit_steps(0.15 * seconds, bare, bs, args.steps)
    pinned = {k: v.pin_memory() for k, v in small.items()} if cuda else small
    model, ready = fit_fold(stage, job, lambda epoch: (pinned for _ in range(ready_steps)), ready_steps * bs, device=device)
    del model
    _free(device)
    return {
        "label": unit.label, "batch": bs, "samples_built": len(rows),
        "fit_samples_per_s": float(fit["samples_per_s"]), "data_wait_frac": float(fit["data_wait_frac"]), "fit_steps_per_epoch": steps,
        "ready_samples_per_s": float(ready["samples_per_s"]), "ready_steps_per_epoch": ready_steps,
        "bare_samples_per_s": bare, "bare4x_samples_per_s": bare4, "fit_over_bare": float(fit["samples_per_s"]) / bare,
        "peak_gib_fit": peak, "gpu_util_pct": sampler.util_mean, "cpu_cores": sampler.cpu_cores, "pipeline_cores": sampler.pipeline_cores,
        "window": "the whole TorchTrainer.fit (start-up included)" if use_ray else "fit's second epoch",
        "augment_per_core": augment, "seconds": time.perf_counter() - t_unit, "shared": shared,
        "grad_checkpointing": checkpointed, "bare_warmup_s": warm[0], "bare4x_warmup_s": warm[1],
        "overhead_s": max(0.0, time.perf_counter() - t_unit - seconds - shared_s),
        "cudnn_benchmark": cudnn, "bare_cudnn_flipped_samples_per_s": flipped,
        "bare_device_aug_samples_per_s": dev_rate, "augment_device_per_core": augment_dev if device_aug else None,
        "issue": dict(zip(("fit", "bare", "bare4x", "peak_gib", "augment_per_core"), unit.issue, strict=True)),
    }


def measure_infer(cfg: PipelineConfig, wide: pd.DataFrame, work: Path, device: torch.device, folds: int, studies: int, seconds: float) -> dict[str, Any]:
    """`StudyPredictor.predict` in studies/s: every submitted member, `folds` folds each, on up to `studies` synthetic studies' volumes."""
    from spine_ray.infer import StudyPredictor, submitted_members

    t0 = time.perf_counter()
    run = work / "infer-run"
    icfg = dataclasses.replace(cfg, folds=folds, run_dir=str(run))
    save(icfg, str(run / "config.yaml"))
    write_prior(fit_prior(label_matrix(wide)), str(run / "prior.csv"))
    members = submitted_members(icfg)
    for m in members:  # untrained weights: the same work per study as trained ones
        model = STAGES[m.stage].build_model(m.name, m.config)
        paths = [Path(model_url(str(run), m.stage, m.name, k)) for k in range(folds)]
        for p in paths:
            p.parent.mkdir(parents=True)
        torch.save({"model": model.state_dict(), "config": to_dict(m.config), "stage": m.stage, "member": m.name}, paths[0])
        for p in paths[1:]:  # one file for every fold
            os.link(paths[0], p)
    predictor = StudyPredictor(str(run), str(device))
    setup_s = time.perf_counter() - t0
    studies = [int(s) for s in wide["study_id"]][:studies]
    volumes = {s: read_volumes(cfg.prepared, filters=[("study_id", "=", s)]) for s in studies}  # what decoding would hand over

    def rate(predictor: StudyPredictor, limit: float) -> tuple[float, int]:
        predictor.predict(volumes[studies[0]])  # warm-up: first kernels, the allocator
        _sync(device)
        t, done = time.perf_counter(), 0
        for s in studies:
            predictor.predict(volumes[s])
            done += 1
            if time.perf_counter() - t > limit:
                break
        _sync(device)
        return done / (time.perf_counter() - t), done

    trained, done = rate(predictor, seconds / 2)  # each member in its training precision (bf16 autocast on CUDA), as `spine-ray infer`
    saved = train_loop.AMP_DEVICES
    train_loop.AMP_DEVICES = ()  # the same in float32: what inference cost before it took the members' precision
    try:
        fp32, _ = rate(predictor, seconds / 2)
    finally:
        train_loop.AMP_DEVICES = saved
    del predictor
    _free(device)
    return {"studies_per_s": trained, "studies_per_s_fp32": fp32, "studies_timed": done, "members": len(members), "folds": folds, "setup_s": setup_s}


# ---- the report ----


def _num(v: float | None, digits: int = 1) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"


def _markdown(head: list[str], rows: list[list[str]], align: str = "---") -> list[str]:
    """A markdown table's lines: the header, its rule (the first column left, the others `align`) and a line per row."""
    return ["| " + " | ".join(head) + " |", "|---|" + f"{align}|" * (len(head) - 1), *("| " + " | ".join(r) + " |" for r in rows)]


def table(results: dict[str, Any]) -> str:
    """The markdown tables: today's figures, the issue's in brackets where it has them."""
    head = ["unit (recipe batch)", "fit samples/s", "fit, data ready", "bare loop", "bare loop 4x batch", "fit / bare",
            "peak GPU GiB in fit", "data_wait_frac", "GPU util %", "CPU cores (pipeline)", "augment+collate per CPU core"]
    rows = []
    for r in results["units"].values():
        i = r["issue"]
        # Under Ray the augmentation runs in other processes: only the machine's total is read.
        cores = _num(r["cpu_cores"], 2) + ("" if results["meta"]["ray"] else f" ({_num(r['pipeline_cores'], 2)})")
        rows.append([
            f"{r['label']} ({r['batch']}{', checkpointed' if r.get('grad_checkpointing') else ''})", f"{_num(r['fit_samples_per_s'])} ({i['fit']})",
            _num(r["ready_samples_per_s"]),
            f"{_num(r['bare_samples_per_s'])} ({i['bare']})", f"{_num(r['bare4x_samples_per_s'])} ({i['bare4x']})",
            _num(r["fit_over_bare"], 2), f"{_num(r['peak_gib_fit'])} ({i['peak_gib']})", _num(r["data_wait_frac"], 3),
            _num(r["gpu_util_pct"], 0), cores, f"{_num(r['augment_per_core'])} ({i['augment_per_core']})",
        ])
    lines = _markdown(head, rows)
    m = results["meta"]
    shared = [r for r in results["units"].values() if r.get("shared")]
    if shared:
        rows = []
        for r in shared:
            sh, bare = r["shared"], r["bare_samples_per_s"]
            rate = sh["samples_per_s"]
            rows.append([
                f"{r['label']} ({r['batch']})", _num(bare), _num(r["bare4x_samples_per_s"]), f"{_num(rate)} ({sh['jobs']} jobs)",
                _num(rate / bare if rate else None, 2), _num(r["bare4x_samples_per_s"] / bare, 2), _num(sh["peak_gib_sum"]), f"{_num(sh['ready_s'], 0)} s",
            ])
        lines += ["", "More work per GPU: one job at the recipe's batch, one at 4x it (lr by `train.lr_batch`'s rule), "
                  "or N fold jobs sharing the device at the recipe's batch (`resources.gpus_per_worker: 1/N`; bare steps, summed samples/s):", "",
                  *_markdown(["unit (recipe batch)", "bare loop", "bare loop 4x batch", "N jobs sharing it", "shared / bare", "4x batch / bare",
                              "peak GiB, N jobs", "ready after"], rows, "---:")]
    dev = [r for r in results["units"].values() if r.get("bare_device_aug_samples_per_s")]
    if dev:
        rows = []
        for r in dev:
            bare, on_dev = r["bare_samples_per_s"], r["bare_device_aug_samples_per_s"]
            rows.append([
                f"{r['label']} ({r['batch']})", _num(bare), _num(on_dev), _num(on_dev / bare, 2), _num(r["augment_per_core"]),
                _num(r["augment_device_per_core"]), _num(bare / r["augment_per_core"], 2), _num(on_dev / r["augment_device_per_core"], 2),
            ])
        lines += ["", "Grade augmentation on the device (`augment_on: device`: the pipeline draws the parameters and ships the stored "
                  "patches, the step makes the crops): the bare step with that work in it, and the CPU each path needs at the bare rate:", "",
                  *_markdown(["unit (recipe batch)", "bare loop", "bare, crops made on the device", "device / bare", "augment+collate per core: CPU path",
                              "device path", "cores at the bare rate: CPU path", "device path"], rows, "---:")]
    flips = [r for r in results["units"].values() if r.get("bare_cudnn_flipped_samples_per_s")]
    if flips:
        rows = []
        for r in flips:
            on = r.get("cudnn_benchmark", False)
            rates = {on: r["bare_samples_per_s"], not on: r["bare_cudnn_flipped_samples_per_s"]}
            rows.append([f"{r['label']} ({r['batch']})", "on" if on else "off", _num(rates[False]), _num(rates[True]), _num(rates[True] / rates[False], 2)])
        lines += ["", "cuDNN's autotuner (`train.cudnn_benchmark`, torch.backends.cudnn.benchmark): the bare step at the recipe's batch both ways, the same model:", "",
                  *_markdown(["unit (recipe batch)", "recipe", "bare loop, autotuner off", "on", "on / off"], rows, "---:")]
    warm = [r for r in results["units"].values() if "bare_warmup_s" in r]
    if warm:
        rows = [[f"{r['label']} ({r['batch']})", _num(r["bare_warmup_s"]), _num(r["bare4x_warmup_s"]), _num(r["overhead_s"], 0), _num(r["seconds"], 0)]
                for r in warm]
        lines += ["", "Start-up: the bare loop's first steps at each batch (with `train.compile`, that shape's compilation: "
                  "a fold job pays it once per shape), and each unit's time beyond its timed windows (compilation, Ray's start, samples):", "",
                  *_markdown(["unit (recipe batch)", "first steps s, 1x batch", "4x batch", "unit s beyond its windows", "unit s in all"], rows, "---:")]
    out = [
        f"GPU throughput of {m['config']}'s units: size {m['size']}, {m['studies']} synthetic studies at {m['image_px']} px, "
        f"{m['device']}, torch {m['torch']}; at most {m['steps']} steps a measurement (fits: per epoch); {_num(m.get('seconds'), 0)} s in all.",
        f"fit: {m['path']}. GPU utilisation: {m['util']}. In brackets: the issue's H200 figures (2026-12; the one-stage unit's with gradient checkpointing).",
        "", *lines, "",
    ]
    inf = results.get("infer")
    if inf:
        out.append(f"infer: StudyPredictor.predict on {m['device']}, {inf['members']} members x {inf['folds']} folds: "
                   f"{inf['studies_per_s']:.2f} studies/s in the members' training precision, {inf['studies_per_s_fp32']:.2f} in float32 "
                   f"({inf['studies_per_s'] / inf['studies_per_s_fp32']:.2f}x; {inf['studies_timed']} studies after a warm-up; "
                   f"models built and loaded in {inf['setup_s']:.0f} s; decoding excluded).")
    out.append("spine-ray infer itself: not run (it decodes DICOM files with pydicom in Ray Data tasks; these studies are volumes, never written as DICOM).")
    return "\n".join(out)


@contextlib.contextmanager
def workspace(path: str | None, prefix: str) -> Iterator[Path]:
    """A run's working folder: `path`, or a temporary one removed at the end; torch's thread count is restored after."""
    work = Path(path or tempfile.mkdtemp(prefix=prefix))
    work.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    try:
        yield work
    finally:
        torch.set_num_threads(threads)
        if not path:
            shutil.rmtree(work, ignore_errors=True)


def save_json(results: dict[str, Any], path: str | None) -> None:
    """Every figure so far, where --json asks."""
    if path:
        Path(path).write_text(json.dumps(results, indent=1))


def unit_seconds(left_s: float, reserve: float, mine: float, overheads: list[float], assumed: float, left: int) -> float:
    """The next unit's timed windows, in seconds: an equal part, among the `left` units still to measure, of the `left_s`
    seconds to the deadline less the `reserve` (inference, the later units' shared runs), this unit's own shared run
    (`mine`) and every remaining unit's overhead (the mean of those measured, else `assumed`); at least 5 s."""
    overhead = sum(overheads) / len(overheads) if overheads else assumed
    return max(5.0, (left_s - reserve - mine - overhead * left) / left)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Measure every unit and inference, print the table; returns what --json writes."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "jobs" / "rsna2024.yaml"))
    ap.add_argument("--units", nargs="+", choices=[u.key for u in UNITS], default=[u.key for u in UNITS])
    ap.add_argument("--studies", type=int, default=4, help="synthetic studies (their samples are copied to fill the fits' epochs)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps a measurement at most (fits: per epoch, two epochs)")
    ap.add_argument("--size", choices=("real", "tiny"), default="real", help="tiny: timm's test_* networks at 64 px, for CPU")
    ap.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument("--budget-s", type=float, default=450.0, help="wall-clock budget; step counts are cut to keep inside it")
    ap.add_argument("--overhead-s", type=float, default=None,
                    help="a unit's time outside its timed windows (compilation, Ray start, sample building) until one is measured "
                         "(default: 90 on a GPU, 0 on CPU); the windows are sized to leave it")
    ap.add_argument("--shared", type=int, default=4, help="fold jobs sharing the device in the shared measurement (0 or 1: none)")
    ap.add_argument("--shared-units", nargs="*", choices=[u.key for u in UNITS], default=["grade_convnext"],
                    help="units whose shared measurement is taken (each gets an equal part of 15%% of the budget)")
    ap.add_argument("--infer-folds", type=int, default=2, help="folds per member in the inference run (the recipe has 5)")
    ap.add_argument("--infer-studies", type=int, default=0, help="studies timed in inference (default: every one)")
    ap.add_argument("--no-infer", action="store_true")
    ap.add_argument("--no-ray", action="store_true", help="the in-process real path even where Ray is importable")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--work", help="working folder (default: a temporary one, removed at the end)")
    ap.add_argument("--table", metavar="JSON", help="only print the tables of a saved --json (a run cut short: what it measured)")
    args = ap.parse_args(argv)
    if args.table:
        results = json.loads(Path(args.table).read_text())
        print(table(results), flush=True)
        return results

    start = time.perf_counter()
    deadline = start + args.budget_s
    reserve = 0.0 if args.no_infer else 0.2 * args.budget_s
    shared_units = [k for k in args.shared_units if k in args.units] if args.shared > 1 else []
    shared_s = 0.15 * args.budget_s / max(1, len(shared_units))
    reserve += shared_s * len(shared_units)
    why_not_ray = ray_unusable(args.no_ray)
    use_ray = why_not_ray is None
    tiny = args.size == "tiny"
    with workspace(args.work, "bench-gpu-") as work:
        prepared = work / "prepared"
        workers = 1 if tiny else min(args.studies, os.cpu_count() or 1)
        wide = synth_prepared(prepared, args.studies, IMAGE_SIZE[args.size], seed=0, workers=workers)
        synth_s = time.perf_counter() - start
        # Only now: the synthesis workers are forked from a process that has not touched CUDA.
        device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
        if device.type == "cpu":  # a check of the code path: OpenMP's spinning threads crawl on a shared CI box
            torch.set_num_threads(1)
        cfg = recipe(args.config, prepared, work / "run", tiny)
        (work / "run").mkdir()
        pd.DataFrame({"study_id": wide["study_id"], "fold": np.arange(len(wide)) % 2}).to_parquet(work / "run" / "folds.parquet")
        fake_points(pd.read_parquet(prepared / LABELS_FILE), np.random.default_rng(0)).to_parquet(work / "points.parquet")
        util, util_how = gpu_util_reader(device)
        resources = fit_resources(cfg, device.type == "cuda", use_ray)
        path = path_name(resources, use_ray, why_not_ray or "")
        meta = {
            "config": Path(args.config).name, "size": args.size, "studies": args.studies, "image_px": IMAGE_SIZE[args.size], "steps": args.steps,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU", "torch": torch.__version__,
            "path": path, "ray": use_ray, "util": util_how, "budget_s": args.budget_s, "synth_s": synth_s,
        }
        print(f"{args.studies} studies synthesised in {synth_s:.0f} s; fit: {path}", flush=True)
        results: dict[str, Any] = {"meta": meta, "units": {}, "infer": None}
        units = [u for u in UNITS if u.key in args.units]
        overheads: list[float] = []  # measured: each unit's wall time beyond its windows
        assumed = args.overhead_s if args.overhead_s is not None else (90.0 if device.type == "cuda" else 0.0)
        for i, unit in enumerate(units):
            mine = shared_s if unit.key in shared_units else 0.0
            reserve -= mine
            seconds = unit_seconds(deadline - time.perf_counter(), reserve, mine, overheads, assumed, len(units) - i)
            r = measure_unit(unit, cfg, work, device, args, seconds, util, use_ray, resources, shared_s=mine)
            overheads.append(r["overhead_s"])
            results["units"][unit.key] = r
            shared = r["shared"] and r["shared"]["samples_per_s"]
            print(f"  {unit.label}: fit {_num(r['fit_samples_per_s'])}, bare {_num(r['bare_samples_per_s'])}, bare 4x {_num(r['bare4x_samples_per_s'])}"
                  + (f", {args.shared} jobs sharing {shared:.1f}" if shared else "")
                  + f" samples/s ({r['seconds']:.0f} s: {r['overhead_s']:.0f} s beyond its windows, first steps {_num(r['bare_warmup_s'])} s"
                  f" / {_num(r['bare4x_warmup_s'])} s at 1x / 4x)", flush=True)
            meta["seconds"] = time.perf_counter() - start
            save_json(results, args.json)  # what is measured so far survives a run stopped at its time limit
        if not args.no_infer:
            results["infer"] = measure_infer(cfg, wide, work, device, args.infer_folds, args.infer_studies or args.studies, max(5.0, deadline - time.perf_counter()))
        meta["seconds"] = time.perf_counter() - start
        print(table(results), flush=True)
        save_json(results, args.json)
        return results


if __name__ == "__main__":
    main()
