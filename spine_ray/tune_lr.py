"""`spine-ray tune-lr`: Ray Tune with Optuna and ASHA over one model's optimisation settings.

Each trial is a real training run of the chosen member (`{stage}.{member}` of any stage in
`spine_ray.stages.registry.STAGES`: `localize.sag_t2`, `localize.axial@v1`, `grade.<name>`,
`onestage.<name>`) on one fold with the plain loop, reporting its validation loss after every epoch; ASHA stops poor
trials early, Optuna proposes the next ones. The samples are built once and shared through the
object store. The best values are written back into a full pipeline config the user can train
with: `{run_dir}/tune_lr/{target}/best.yaml`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from spine_ray.core.config import ConfigError, from_dict, save, to_dict
from spine_ray.core.storage import atomic_write_bytes, atomic_write_text, join, read_bytes
from spine_ray.engine.fold import fit_fold, local_batches
from spine_ray.engine.sample_cache import samples
from spine_ray.engine.stage import FoldJob, Stage, collate, fold_epochs, numpy_batches
from spine_ray.engine.tracking import tune_callbacks
from spine_ray.pipeline import resolved, stage_inputs
from spine_ray.run_config import PipelineConfig
from spine_ray.stages.registry import STAGES


@dataclass(frozen=True)
class SearchParam:
    """One searched value: a dotted key inside the model's config and its range."""

    key: str  # e.g. "train.lr"
    low: float
    high: float
    log: bool = True


@dataclass(frozen=True)
class TuneLRConfig:
    """How the learning-rate search runs."""

    trials: int = 8
    fold: int = 0
    max_concurrent: int = 2
    grace_period: int = 1  # epochs before ASHA may stop a trial
    seed: int = 0
    space: tuple[SearchParam, ...] = field(
        default_factory=lambda: (SearchParam("train.lr", 1e-4, 1e-2), SearchParam("train.weight_decay", 1e-4, 1e-1))
    )


def member_config(cfg: PipelineConfig, target: str) -> tuple[str, str, Any]:
    """`{stage}.{member}` (e.g. `localize.sag_t2`, `grade.a`, `onestage.one`) → (stage, member, the member's config dataclass)."""
    stage, dot, member = target.partition(".")
    if not dot or stage not in STAGES:
        raise ConfigError(f"--target {target!r}: expected {{stage}}.{{member}} with a stage of {list(STAGES)}")
    return stage, member, cfg.member(stage, member).config


def with_values(member_cfg: Any, values: dict[str, float]) -> Any:
    """A member config with dotted keys replaced (validated through the dataclass again)."""
    data = to_dict(member_cfg)
    for key, v in values.items():
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise ConfigError(f"search key {key!r} is not in the {type(member_cfg).__name__} config")
        node[leaf] = float(v)
    return from_dict(type(member_cfg), data)


def _trial(config: dict[str, float], stage: Stage, job: FoldJob, data: dict[str, pd.DataFrame]) -> None:
    """One trial: train the model with the proposed values (the fold driver), report validation loss per epoch."""
    from ray import tune

    torch.set_num_threads(1)
    job = dataclasses.replace(job, config=with_values(job.config, config))
    train, val = data["train"], data["val"]
    batch_size = stage.train_config(job).batch_size

    def validate(m: torch.nn.Module) -> dict[str, float]:
        losses = [float(stage.loss(job, m, collate(stage, job, rows, None))[0]) for rows in numpy_batches(val, batch_size, None)]
        return {"loss": float(np.mean(losses))}

    fit_fold(stage, job, local_batches(stage, job, train), len(train), device=torch.device("cpu"), validate=validate,
             on_epoch_end=lambda r: tune.report({"val_loss": r.metrics["val_loss"], "epoch": r.epoch}))


def tune_lr(pipeline: PipelineConfig, target: str, tcfg: TuneLRConfig) -> dict[str, Any]:
    """Search, write best.yaml and results.json under the run's tune_lr folder; returns the summary."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from spine_ray.core.raycluster import init_ray
    from spine_ray.engine.sample_cache import with_caches
    from spine_ray.engine.schedule import storage_root

    pipeline = resolved(pipeline)
    stage_name, member, member_cfg = member_config(pipeline, target)
    stage, inputs = STAGES[stage_name], stage_inputs(pipeline, stage_name)
    out = join(pipeline.run_dir, "tune_lr", target)
    # Trials train on the run's folds but write nothing into the run's stage folders.
    atomic_write_bytes(join(out, "folds.parquet"), read_bytes(join(pipeline.run_dir, "folds.parquet")))
    job = FoldJob(stage_name, member, tcfg.fold, pipeline.folds, member_cfg, pipeline.prepared, out, inputs)
    init_ray()
    # The run's sample caches (the same key as training's, so usually already built), shared by all trials.
    (job,) = with_caches(stage, [job], pipeline.samples_dir or join(pipeline.run_dir, "samples"))
    data = {split: samples(stage, job, split) for split in ("train", "val")}
    space = {p.key: (tune.loguniform if p.log else tune.uniform)(p.low, p.high) for p in tcfg.space}
    current = {p.key: float(_get(to_dict(member_cfg), p.key)) for p in tcfg.space}
    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial, stage=stage, job=job, data=data), {"cpu": 1}),
        param_space=space,
        tune_config=tune.TuneConfig(
            metric="val_loss", mode="min", num_samples=tcfg.trials, max_concurrent_trials=tcfg.max_concurrent,
            search_alg=OptunaSearch(seed=tcfg.seed, points_to_evaluate=[current]),
            scheduler=ASHAScheduler(time_attr="training_iteration", max_t=fold_epochs(stage, job), grace_period=tcfg.grace_period),
        ),
        run_config=tune.RunConfig(name=f"tune_lr-{target}", storage_path=storage_root(join(out, "ray")), verbose=1, callbacks=tune_callbacks(pipeline.run_dir, f"tune-lr-{target}")),
    )
    grid = tuner.fit()
    best = grid.get_best_result(metric="val_loss", mode="min", scope="all")
    values = {k: float(best.config[k]) for k in space}
    tuned = pipeline.with_member(stage_name, member, with_values(member_cfg, values))
    save(tuned, join(out, "best.yaml"))
    trials = [{**{k: r.config[k] for k in space}, "val_loss": float(r.metrics_dataframe["val_loss"].min()) if r.metrics_dataframe is not None and "val_loss" in r.metrics_dataframe else None, "epochs": int(r.metrics.get("epoch", -1)) + 1} for r in grid]
    summary = {"target": target, "fold": tcfg.fold, "start": current, "best": values, "best_val_loss": float(best.metrics_dataframe["val_loss"].min()), "trials": trials, "config": join(out, "best.yaml")}
    atomic_write_text(join(out, "results.json"), json.dumps(summary, indent=2))
    return summary


def _get(data: dict, key: str) -> Any:
    for k in key.split("."):
        data = data[k]
    return data
