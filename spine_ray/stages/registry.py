"""Every model stage by name, and the one place a stored fold model is loaded.

`STAGES` maps a stage name (the `stage` of a `FoldJob`, the folder of its folds in a run) to its
`Stage`: pipeline, tune-lr, cross predictions, inference and the report all dispatch through it.

A finished fold's `model.pt` (`spine_ray.engine.fold.finish_fold`) holds the weights and the member's
config as plain data, so a run directory is self-describing: `load_fold_model` reads the config
back as the stage's `config_type`, builds the network through the stage and loads the weights,
weights-only (a checkpoint that would run code is refused), without the run's config.yaml.
"""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn

from spine_ray.core.config import from_dict
from spine_ray.core.schema import SchemaError
from spine_ray.core.storage import join, read_bytes
from spine_ray.engine.stage import Stage, fold_path
from spine_ray.engine.train_loop import load_state
from spine_ray.stages.grade.stage import GradeStage
from spine_ray.stages.localize import LocalizeStage
from spine_ray.stages.onestage import OneStageStage

STAGES: dict[str, Stage] = {
    "localize": LocalizeStage(),  # stage 1: one keypoint model per view (member = the view, `view@variant`)
    "grade": GradeStage(),  # stage 2: crops at stage-1 points → 25 grades
    "onestage": OneStageStage(),  # whole sagittal stacks → spinal and foraminal grades, no stage-1 points
}


def stage_named(name: str) -> Stage:
    """The stage of a name, or one line saying which names exist."""
    if name not in STAGES:
        raise SchemaError("stage", f"unknown stage {name!r} (one of {list(STAGES)})")
    return STAGES[name]


def model_url(run_dir: str, stage: str, member: str, fold: int) -> str:
    """Where a finished fold's weights are."""
    return join(fold_path(run_dir, stage, member, fold), "model.pt")


def load_fold_model(run_dir: str, stage: str, member: str, fold: int, device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """A finished fold's model (eval mode, on `device`) and its member config, from its model.pt alone."""
    url = model_url(run_dir, stage, member, fold)
    state = load_state(io.BytesIO(read_bytes(url)), what=url)
    if not isinstance(state.get("config"), dict):
        raise SchemaError(url, "no member config stored beside the weights")
    st = stage_named(stage)
    config = from_dict(st.config_type, state["config"])
    model = st.build_model(member, config)
    model.load_state_dict(state["model"])
    return model.to(device).eval(), config


def load_member(run_dir: str, stage: str, member: str, folds: int, device: str | torch.device = "cpu") -> tuple[list[nn.Module], Any]:
    """Every fold's model of one member and the member config (the folds' configs must agree)."""
    loaded = [load_fold_model(run_dir, stage, member, k, device) for k in range(folds)]
    configs = {repr(c) for _, c in loaded}
    if len(configs) > 1:
        raise SchemaError(model_url(run_dir, stage, member, 0), f"the {folds} folds of {stage}/{member} store different configs")
    return [m for m, _ in loaded], loaded[0][1]
