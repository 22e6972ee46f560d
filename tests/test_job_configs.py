"""Every pipeline config in jobs/ loads, and builds every model it names (pretrained=False) that runs one batch."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from spine_ray.core.config import load
from spine_ray.engine.stage import FoldJob
from spine_ray.models.onestage import OneStageNet
from spine_ray.run_config import PipelineConfig
from spine_ray.stages.grade.stage import GradeStage
from spine_ray.stages.localize import VIEWS, LocalizeStage

JOBS = Path(__file__).resolve().parents[1] / "jobs"
CONFIGS = sorted(p.name for p in JOBS.glob("*.yaml") if "name:" in p.read_text() and "localize:" in p.read_text())


def offline(model_cfg):
    """The same architecture without downloading weights (tests are offline)."""
    return dataclasses.replace(model_cfg, pretrained=False, weights=None)


def test_every_pipeline_config_is_found():
    assert {"smoke.yaml", "demo.yaml", "rsna2024.yaml"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_its_models_and_runs_one_batch(name):
    cfg = load(PipelineConfig, JOBS / name)
    torch.manual_seed(0)
    for view in VIEWS:
        vc = getattr(cfg.localize, view)
        vc = dataclasses.replace(vc, model=offline(vc.model))
        job = FoldJob("localize", view, 0, cfg.folds, vc, "", "", {})
        model = LocalizeStage().build_model(job.member, job.config).eval()
        with torch.no_grad():
            heat = model(torch.rand(1, vc.slices, 1, vc.size, vc.size))
        assert heat.shape == (1, len(VIEWS[view][1]), vc.slices, vc.size // vc.model.out_stride, vc.size // vc.model.out_stride)
    for member in cfg.grade:
        member = dataclasses.replace(member, model=offline(member.model))
        model = GradeStage().build_model(member.name, member).eval()
        t, s = len(member.slots), 2 * member.k + 1
        with torch.no_grad():
            out = model(
                torch.rand(1, t, s, 1, member.out_px, member.out_px),
                level=torch.zeros(1, t, dtype=torch.long),
                condition=torch.arange(t).clamp(max=4)[None],
                view=torch.tensor([[v for _, v, _ in member.slots]]),
            )
        assert out["logits"].shape == (1, t, 3)
    for member in cfg.onestage:
        net = dataclasses.replace(member.model, net=offline(member.model.net))
        model = OneStageNet(net).eval()
        with torch.no_grad():
            out = model({v: torch.rand(1, member.slices, 1, member.size, member.size) for v in net.views})
        assert [out[v]["logits"].shape for v in net.views] == [(1, 5, 3), (1, 10, 3)]
