"""The configuration of a training run (`config.yaml` in every run directory) and its members.

`PipelineConfig` is what `spine-ray train` reads from `jobs/*.yaml` and writes beside its outputs;
`members()` lists every trained member as (stage, name, config), the one table pipeline, tune-lr
and inference walk instead of each knowing the stages' fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from spine_ray.core.config import ConfigError
from spine_ray.engine.resources import ResourcesConfig
from spine_ray.stages.grade.config import GradeConfig
from spine_ray.stages.localize import VIEWS, LocalizeConfig, LocalizeVariant, variant_member
from spine_ray.stages.onestage import OneStageConfig


class Member(NamedTuple):
    """One trained member: its stage (a name in `spine_ray.stages.registry.STAGES`), its name and config."""

    stage: str
    name: str
    config: Any


@dataclass(frozen=True)
class PipelineConfig:
    """A whole training run: data, folds, resources and every stage's models."""

    name: str = "demo"
    prepared: str = "runs/demo/prepared"  # output of `spine-ray prepare` (train split)
    run_dir: str = "runs/demo/run"
    folds: int = 5
    seed: int = 0
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    localize: LocalizeConfig = field(default_factory=LocalizeConfig)
    # More stage-1 members (cross-ensembling): every grade member also predicts on each one's points.
    localize_variants: tuple[LocalizeVariant, ...] = ()
    grade: tuple[GradeConfig, ...] = (GradeConfig(),)  # the ensemble members of stage 2
    onestage: tuple[OneStageConfig, ...] = ()  # one-stage members (no stage-1 points), trained with stage 2 in one Ray run
    oracle: str | None = None  # optional oracle probabilities of the training studies (synthetic data)
    samples_dir: str | None = None  # sample caches (default {run_dir}/samples); runs that share one reuse samples
    exclude_labels: str | None = None  # a `spine-ray clean-labels` flags table: its flagged labels are unlabelled in training

    def __post_init__(self) -> None:
        if self.folds < 2:
            raise ValueError("folds must be ≥ 2")
        names = [m.name for m in self.grade] + [m.name for m in self.onestage]
        if len(set(names)) != len(names):
            raise ValueError(f"grade and onestage member names must be unique, got {names}")
        variants = [v.name for v in self.localize_variants]
        if len(set(variants)) != len(variants):
            raise ValueError(f"localize variant names must be unique, got {variants}")

    def stage1_members(self) -> list[tuple[str, LocalizeConfig]]:
        """(variant, its localisers): the main ones ("") first, then every `localize_variants` entry."""
        return [("", self.localize)] + [(v.name, v.localize) for v in self.localize_variants]

    def grade_members(self) -> list[str]:
        """Every stage-2 member name in oof.parquet: each grader, then each grader × variant."""
        return [m.name for m in self.grade] + [variant_member(m.name, v.name) for v in self.localize_variants for m in self.grade]

    def members(self) -> list[Member]:
        """Every trained member of the run, one per fold folder: each stage-1 view (of every variant), grader and one-stage member."""
        views = [Member("localize", variant_member(view, v), getattr(loc, view)) for v, loc in self.stage1_members() for view in VIEWS]
        return views + [Member("grade", m.name, m) for m in self.grade] + [Member("onestage", m.name, m) for m in self.onestage]

    def member(self, stage: str, name: str) -> Member:
        """One trained member by stage and name, or one line saying which exist."""
        for m in self.members():
            if (m.stage, m.name) == (stage, name):
                return m
        known = ", ".join(f"{m.stage}.{m.name}" for m in self.members())
        raise ConfigError(f"no member {stage}.{name} in this run (members: {known})")

    def with_member(self, stage: str, name: str, config: Any) -> PipelineConfig:
        """The config with one member's config replaced (as `member` finds it)."""
        self.member(stage, name)
        if stage == "localize":
            view, _, variant = name.partition("@")
            if not variant:
                return dataclasses.replace(self, localize=dataclasses.replace(self.localize, **{view: config}))
            new = tuple(dataclasses.replace(v, localize=dataclasses.replace(v.localize, **{view: config})) if v.name == variant else v for v in self.localize_variants)
            return dataclasses.replace(self, localize_variants=new)
        field_name = "grade" if stage == "grade" else "onestage"
        return dataclasses.replace(self, **{field_name: tuple(config if m.name == name else m for m in getattr(self, field_name))})
