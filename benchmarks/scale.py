"""Scale rehearsal of the rsna2024 recipe: real image sizes, the recipe's sample geometry and networks.

In one run, on synthetic studies written at real image sizes (DICOM → `prepare` → volumes):
  1. per unit (each stage-1 view, the first stage-2 member): sample-cache CPU-seconds and bytes per
     sample, and the input pipeline's augmentation rate per CPU core (samples/s, one thread);
  2. the recipe's real networks (pretrained=False) take `--model-steps` training steps on this CPU;
  3. a simulated accelerator (a trainer whose step takes a fixed time, `spine_ray.engine.train_loop.fit`
     all the same) fed by the streamed pipeline (`distributed.StreamedBatches`), at the speed the
     pipeline's cores should sustain with 25 % headroom: the trainer's `data_wait_frac`;
  4. object-store peak of a fold set trained on this node with 2 and with 4 folds, for the old path
     (each fold's training set materialised, as before the sample cache) and the streamed one.
Then the GPU table: samples/s per GPU from timm's published training throughput, the CPUs each GPU
needs, and the per-stage wall time of 1,975 studies × 5 folds (printed; see docs/scale-out.md).

    python benchmarks/scale.py --studies 4
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

# timm's published AMP training throughput on one RTX 3090 (results/benchmark-train-amp-nchw-
# pt112-cu113-rtx3090.csv, huggingface/pytorch-image-models): samples/s at the given image side.
TIMM_3090 = {"convnext_small": (489.81, 224), "tf_efficientnet_b3": (370.15, 300)}
# Other GPUs relative to the RTX 3090 by memory bandwidth (CNN AMP training is mostly bandwidth-
# bound): A10G 600 GB/s, A100-40GB 1,555 GB/s... we take the SXM/PCIe figures the cloud nodes have.
GPU_FACTOR = {"A10G (g5)": 600 / 936, "A100 40GB (p4d)": 1555 / 936, "H100 (p5)": 3350 / 936}
HEADROOM = 1.25  # the input pipeline is sized to run this much faster than the GPU
STUDIES_REAL, FOLDS_REAL = 1975, 5


def _backbone_rate(name: str) -> float:
    """Pixels per second one RTX 3090 trains for a backbone name (timm tag stripped)."""
    base = name.split(".")[0]
    rate, side = TIMM_3090[base]
    return rate * side * side


def _plasma_mib(address: str) -> float:
    from ray._private.internal_api import memory_summary

    m = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(address=address, stats_only=True))
    return float(m.group(1)) if m else 0.0


class PeakMonitor:
    """Polls the object store's use in a thread; `peak` in MiB."""

    def __init__(self, address: str) -> None:
        self.address, self.peak, self._stop = address, 0.0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _plasma_mib(self.address))
            self._stop.wait(0.2)

    def __enter__(self) -> PeakMonitor:
        # Objects of an earlier run are freed asynchronously: start from a drained store.
        deadline = time.time() + 120
        while _plasma_mib(self.address) > 32 and time.time() < deadline:
            time.sleep(1)
        self.start = _plasma_mib(self.address)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, _plasma_mib(self.address))


def main() -> None:
    """Run the rehearsal and print every figure with its ratio."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--studies", type=int, default=4)
    ap.add_argument("--sizes", type=int, nargs="+", default=[384, 512])
    ap.add_argument("--config", default="jobs/rsna2024.yaml")
    ap.add_argument("--model-steps", type=int, default=1)
    ap.add_argument("--cores", type=int, default=1, help="CPU cores the simulated accelerator's pipeline gets")
    ap.add_argument("--replicas", type=int, default=20, help="copies of the studies in the data_wait_frac run")
    ap.add_argument("--window-mb", type=int, default=128, help="object-store budget of each worker's stream")
    ap.add_argument("--only-peak", action="store_true", help="only the grade unit and the object-store peaks")
    ap.add_argument("--skip-models", action="store_true", help="skip the CPU training steps of the real networks")
    args = ap.parse_args()

    import ray

    from spine_ray.core.config import from_dict, load
    from spine_ray.core.raycluster import init_ray
    from spine_ray.core.schema import with_target
    from spine_ray.data.ingest import prepare
    from spine_ray.data.volumes import read_table
    from spine_ray.engine.resources import ResourcesConfig
    from spine_ray.engine.sample_cache import (
        cache_input,
        count_samples,
        ensure_cache,
        read_cache,
        split_studies,
    )
    from spine_ray.engine.stage import collate, columns, epoch_rng, steps_per_epoch
    from spine_ray.engine.stream import StreamedBatches
    from spine_ray.engine.train_loop import TrainConfig, fit
    from spine_ray.pipeline import fold_jobs, setup_run
    from spine_ray.run_config import PipelineConfig
    from spine_ray.stages.grade.samples import fake_points
    from spine_ray.stages.grade.stage import GradeStage
    from spine_ray.stages.localize import LocalizeStage
    from spine_ray.synth.generate import generate
    from spine_ray.synth.study import SynthConfig

    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    torch.set_num_threads(1)
    init_ray(num_cpus=os.cpu_count() or 2)
    address = ray.get_runtime_context().gcs_address

    t = time.perf_counter()
    generate(str(tmp / "data"), from_dict(SynthConfig, {"studies": args.studies, "seed": 11, "acquisition": {"image_sizes": args.sizes}}), workers=0)
    synth_s = time.perf_counter() - t
    t = time.perf_counter()
    prepare(str(tmp / "data"), str(tmp / "prepared"), "train")
    prep_s = time.perf_counter() - t
    vol_bytes = sum(p.stat().st_size for p in (tmp / "prepared" / "volumes").rglob("*.parquet"))
    dicom_bytes = sum(p.stat().st_size for p in (tmp / "data" / "train_images").rglob("*.dcm"))
    print(f"\n{args.studies} studies at {args.sizes} px: synthesise {synth_s:.0f} s, prepare {prep_s:.0f} s "
          f"({prep_s / args.studies:.1f} s/study wall); DICOM {dicom_bytes / args.studies / 2**20:.1f} MiB/study, "
          f"volumes {vol_bytes / args.studies / 2**20:.1f} MiB/study ({vol_bytes / dicom_bytes:.2f}x DICOM)")

    overrides = [f"prepared={tmp / 'prepared'}", f"run_dir={tmp / 'run'}", "folds=2"]
    cfg = load(PipelineConfig, args.config, overrides)
    no_weights = {"pretrained": False, "weights": None}
    loc = cfg.localize
    cfg = dataclasses.replace(
        cfg,
        localize=dataclasses.replace(loc, **{v: dataclasses.replace(getattr(loc, v), model=dataclasses.replace(getattr(loc, v).model, **no_weights)) for v in ("sag_t2", "sag_t1", "axial")}),
        grade=tuple(dataclasses.replace(m, model=dataclasses.replace(m.model, **no_weights)) for m in cfg.grade),
    )
    setup_run(cfg)
    labels = read_table(cfg.prepared, "labels.parquet")
    points = tmp / "points.parquet"
    fake_points(labels, np.random.default_rng(0)).to_parquet(points)
    spinal = tmp / "spinal.parquet"
    lab = with_target(labels[labels["slice"].notna()])
    lab[lab["condition"] == "spinal_canal_stenosis"][["study_id", "target", "x_mm", "y_mm", "z_mm"]].to_parquet(spinal)

    units = [
        ("localize", v, LocalizeStage(), getattr(cfg.localize, v), {"spinal_points": str(spinal)} if v == "axial" else {})
        for v in ("sag_t2", "sag_t1", "axial")
    ] + [("grade", cfg.grade[0].name, GradeStage(), cfg.grade[0], {"points": str(points)})]
    figures = {}
    if args.only_peak:
        units = units[-1:]
    for stage_name, member, stage, mcfg, inputs in units:
        job = fold_jobs(cfg, stage_name, member, mcfg, inputs)[0]
        c0 = time.process_time()
        url, manifest = ensure_cache(stage, job, "train", str(tmp / "samples"), parallel=False)
        build_cpu = time.process_time() - c0
        n = manifest["samples"]
        nbytes = sum(p.stat().st_size for p in Path(url).glob("part-*.parquet"))
        rows = read_cache(url, sorted(int(s) for p in manifest["parts"] for s in p["studies"]))
        rng = epoch_rng(0, 0, 0)
        c0, reps = time.process_time(), 0
        while time.process_time() - c0 < 3.0 or reps < 2:
            stage.augment(job, columns(rows.iloc[:8]), rng)
            reps += 1
        aug_rate = reps * min(8, n) / (time.process_time() - c0)
        step_s = float("nan")
        if args.model_steps and not args.skip_models:
            model = stage.build_model(job.member, job.config).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            batch = collate(stage, job, columns(rows.iloc[:2]), rng)
            t = time.perf_counter()
            for _ in range(args.model_steps):
                loss, _ = stage.loss(job, model, batch)
                opt.zero_grad()
                loss.backward()
                opt.step()
            step_s = (time.perf_counter() - t) / args.model_steps
            del model, opt, batch, loss  # ConvNeXt-S with its optimizer state and graph: GBs on the host
        px = _sample_pixels(stage_name, mcfg)
        backbone = mcfg.model.backbone
        figures[(stage_name, member)] = {
            "samples": n, "per_study": n / args.studies, "build_cpu_s": build_cpu / max(n, 1), "bytes": nbytes / max(n, 1),
            "aug_rate": aug_rate, "px": px, "gpu3090": _backbone_rate(backbone) / px, "backbone": backbone, "epochs": mcfg.train.epochs,
            "job": job, "stage": stage, "url": url,
        }
        print(f"  {stage_name}/{member:15s} {n:4d} samples ({n / args.studies:.1f}/study); cache build {build_cpu / max(n, 1):.3f} CPU-s/sample, "
              f"{nbytes / max(n, 1) / 2**20:.2f} MiB/sample; augment {aug_rate:.1f} samples/s/core; "
              f"CPU train step (batch 2, {backbone.split('.')[0]}): {step_s:.1f} s")

    # The GPU table (per fold; a fold holds one GPU), and the run at real scale.
    print(f"\nper GPU (timm RTX 3090 AMP rate scaled by memory bandwidth), {HEADROOM}x pipeline headroom:")
    for (stage_name, member), f in figures.items():
        per_study_real = f["per_study"]
        for gpu, factor in GPU_FACTOR.items():
            rate = f["gpu3090"] * factor
            cores = math.ceil(HEADROOM * rate / f["aug_rate"])
            train_samples = per_study_real * STUDIES_REAL * (FOLDS_REAL - 1) / FOLDS_REAL
            hours = f["epochs"] * train_samples / rate / 3600
            print(f"  {stage_name}/{member:15s} {gpu:16s} {rate:7.1f} samples/s, {cores:3d} CPU cores/GPU, "
                  f"{hours:5.2f} GPU-h per fold ({f['epochs']} epochs × {train_samples:.0f} samples), "
                  f"cache {per_study_real * STUDIES_REAL * f['bytes'] / 2**30 * 2:.1f} GiB (train + val)")

    # data_wait_frac: the streamed pipeline against an accelerator sized to what `cores` should sustain.
    # The few real-size studies are replicated under new ids into a cache of `--replicas` × as many
    # studies, so that epochs last long enough to reach a steady state.
    g = figures[("grade", cfg.grade[0].name)]
    stage, job = g["stage"], _replicated(g, args.replicas, tmp)
    res = ResourcesConfig(data_cpus=0, data_concurrency=args.cores, chunk_studies=2, prefetch_batches=4, shuffle_mb=0, input_pipeline="ray", stream_window_mb=args.window_mb)
    bs = job.config.train.batch_size
    n = count_samples(job.inputs[cache_input("train")], split_studies(job, "train"))
    steps = steps_per_epoch(n, bs)

    def run(step: float) -> list[dict]:
        """Train a do-nothing model whose step takes `step` s (the simulated accelerator); per-epoch metrics."""
        dummy, tcfg, out = torch.nn.Linear(1, 1), TrainConfig(epochs=3, batch_size=bs, lr=1e-3), []
        job3 = dataclasses.replace(job, config=dataclasses.replace(job.config, train=tcfg))

        def loss_fn(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
            time.sleep(step)
            return model.weight.sum() * 0.0 + model.bias.sum() * 0.0, {}

        fit(dummy, loss_fn, StreamedBatches(stage, job3, res, steps), steps, tcfg, device=torch.device("cpu"), on_epoch_end=lambda r: out.append(r.metrics))
        return out

    # What the pipeline delivers here, to a consumer that never waits (epochs after the first: no start-up).
    free = run(0.0) if not args.only_peak else []
    delivered = float(np.mean([m["samples_per_s"] for m in free[1:]])) if free else 0.0
    if free:
        print(f"streamed pipeline ({args.cores} augmentation task(s) in flight, this machine): {delivered:.1f} samples/s delivered, "
              f"{delivered / g['aug_rate']:.2f}x the one-thread augment rate; first epoch {free[0]['samples_per_s']:.1f} samples/s (start-up)")
    for speed, label in ((delivered / HEADROOM, f"the pipeline's rate / {HEADROOM}"), (delivered * 1.5, "1.5x the pipeline's rate")) if free else ():
        waits = [m["data_wait_frac"] for m in run(bs / speed)]
        print(f"simulated accelerator at {speed:.1f} samples/s ({label}), {n} samples × 3 epochs: "
              f"data_wait_frac by epoch {[round(w, 3) for w in waits]}")

    # Object-store peak: F folds on this node, old (materialised fold sets) vs streamed.
    print(f"\nobject-store peak, {len(split_studies(job, 'all'))} replicated studies' grade samples, folds on this node (as many at once as CPUs allow):")
    peaks = {}
    for mode in ("streamed", "materialised"):
        for folds in (2, 4):
            peaks[(mode, folds)] = _fold_set_peak(mode, folds, stage, job, res, tmp, address)
            print(f"  {mode:12s} {folds} folds: {peaks[(mode, folds)]:8.1f} MiB")
    for mode in ("materialised", "streamed"):
        print(f"  {mode}: 4 folds / 2 folds = {peaks[(mode, 4)] / max(peaks[(mode, 2)], 1e-9):.2f}x")
    print(f"  streamed / materialised at 4 folds: {peaks[('streamed', 4)] / max(peaks[('materialised', 4)], 1e-9):.3f}x")
    ray.shutdown()


def _replicated(g: dict, replicas: int, tmp: Path):
    """A fold job over `replicas` copies of the real-size studies' grade samples (new study ids, two folds)."""
    import dataclasses as dc

    import pandas as pd

    from spine_ray.engine.sample_cache import (
        cache_input,
        chunks,
        read_cache,
        read_manifest,
        write_manifest,
        write_part,
    )

    real = sorted(int(s) for p in read_manifest(g["url"])["parts"] for s in p["studies"])
    rows = read_cache(g["url"], real)
    run, url = tmp / "replicated", tmp / "replicated" / "samples"
    url.mkdir(parents=True)
    studies = [r * 10**10 + s for r in range(1, replicas + 1) for s in real]  # study ids stay below 10**10
    pd.DataFrame({"study_id": studies, "fold": [i % 2 for i in range(len(studies))]}).to_parquet(run / "folds.parquet")
    names, counts = [], []
    for i, part in enumerate(chunks(studies, 8)):
        df = pd.concat([rows[rows["study_id"] == s % 10**10].assign(study_id=s) for s in part], ignore_index=True)
        names.append(f"part-{i:05d}.parquet")
        counts.append(write_part(df, part, str(url / names[-1])))
    write_manifest(str(url), "replicated", {"replicas": replicas}, names, counts, len(names), 0.0)
    return dc.replace(g["job"], run_dir=str(run), inputs={**g["job"].inputs, cache_input("train"): str(url)})


def _sample_pixels(stage_name: str, cfg: object) -> int:
    """Pixels one training sample puts through the backbone."""
    if stage_name == "grade":
        return len(cfg.slots) * (2 * cfg.k + 1) * cfg.out_px**2
    return cfg.slices * cfg.size**2


def _fold_set_peak(mode: str, folds: int, stage: object, job: object, res: object, tmp: Path, address: str) -> float:
    """Peak object-store MiB while `folds` simulated fold trainers (Ray tasks, one CPU each) run one epoch.

    Both modes read the same replicated grade samples: `materialised` holds each fold's training set
    in the object store, as training did before the sample cache (building or reading a sample puts
    the same bytes there); `streamed` is `StreamedBatches`.
    """
    import dataclasses as dc

    import pandas as pd
    import ray

    from spine_ray.engine.sample_cache import cache_input, count_samples, read_cache, split_studies
    from spine_ray.engine.stream import StreamedBatches

    run = tmp / f"peak-{mode}-{folds}"
    run.mkdir()
    studies = split_studies(job, "all")
    pd.DataFrame({"study_id": studies, "fold": [i % folds for i in range(len(studies))]}).to_parquet(run / "folds.parquet")
    # One epoch per fold: each simulated trainer consumes its whole stream, as a fold's last epoch does.
    one_epoch = dc.replace(job.config, train=dc.replace(job.config.train, epochs=1))
    jobs = [dc.replace(job, run_dir=str(run), fold=k, n_folds=folds, config=one_epoch) for k in range(folds)]
    url = job.inputs[cache_input("train")]

    @ray.remote(num_cpus=1)
    def fold_trainer(job: object) -> int:
        seen = 0
        if mode == "materialised":
            ids = split_studies(job, "train")
            ds = ray.data.from_items([{"study_id": s} for s in ids], override_num_blocks=len(ids))
            ds = ds.map_batches(lambda b: read_cache(url, b["study_id"].astype(int).tolist()), batch_format="pandas", batch_size=1,
                                num_cpus=0, concurrency=1).materialize()
            for b in ds.iter_batches(batch_size=8, batch_format="numpy"):
                seen += len(b["study_id"])
                time.sleep(0.01)
        else:
            n = count_samples(url, split_studies(job, "train"))
            for batch in StreamedBatches(stage, job, res, -(-n // 8))(0):
                seen += len(batch["labels"])
                time.sleep(0.01)
        return seen

    with PeakMonitor(address) as mon:
        ray.get([fold_trainer.remote(j) for j in jobs])
    return mon.peak - mon.start


if __name__ == "__main__":
    main()
