"""The stage registry and the one model loader: every stage named once, and a run directory whose
models load from their model.pt alone, including a run written before the loader existed."""

from __future__ import annotations

import dataclasses
import io
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch

from spine_ray.core.config import ConfigError, load
from spine_ray.core.schema import SchemaError
from spine_ray.engine.fold import finish_fold
from spine_ray.engine.stage import FoldJob
from spine_ray.models.grader import Grader
from spine_ray.models.localizer import Localizer
from spine_ray.models.onestage import OneStageNet
from spine_ray.run_config import PipelineConfig
from spine_ray.stages.grade.config import GradeConfig
from spine_ray.stages.grade.stage import GradeStage
from spine_ray.stages.localize import LocalizeStage, ViewConfig
from spine_ray.stages.onestage import OneStageConfig, OneStageStage
from spine_ray.stages.registry import STAGES, load_fold_model, load_member, stage_named
from spine_ray.tune_lr import member_config

# Written by the code of commit c91bb8d (before this registry), as its finish_fold wrote model.pt:
# {"model": state_dict, "config": member config as plain data}. How: made_by.py.txt beside it.
OLD_RUN = Path(__file__).parent / "fixtures" / "old_run"


def test_every_stage_is_named_once_with_its_config_type():
    assert {name: type(s) for name, s in STAGES.items()} == {"localize": LocalizeStage, "grade": GradeStage, "onestage": OneStageStage}
    assert [s.config_type for s in STAGES.values()] == [ViewConfig, GradeConfig, OneStageConfig]
    with pytest.raises(SchemaError, match="unknown stage 'coronal'"):
        stage_named("coronal")


@pytest.mark.parametrize(("stage", "member", "net"), [("localize", "sag_t2", Localizer), ("grade", "g", Grader), ("onestage", "one", OneStageNet)])
def test_a_run_written_before_the_loader_loads_from_its_model_files_alone(tmp_path, stage, member, net):
    run = tmp_path / "run"
    shutil.copytree(OLD_RUN, run)
    expected = load(PipelineConfig, run / "config.yaml").member(stage, member).config
    (run / "config.yaml").unlink()  # self-describing: the weights file holds the member config
    model, config = load_fold_model(str(run), stage, member, 0)
    assert isinstance(model, net) and not model.training
    assert config == expected
    stored = torch.load(run / stage / member / "fold0" / "model.pt", weights_only=True)["model"]
    assert stored.keys() == model.state_dict().keys()
    assert all(torch.equal(stored[k], v) for k, v in model.state_dict().items())


def test_the_old_localiser_predicts_what_it_predicted_when_it_was_written():
    model, _ = load_fold_model(str(OLD_RUN), "localize", "sag_t2", 0)
    x, y = torch.load(OLD_RUN / "reference.pt", weights_only=True)["sag_t2/0"]
    with torch.no_grad():
        assert torch.allclose(model(x), y, atol=1e-6)


def test_a_finished_fold_round_trips_through_the_loader_and_its_folds_must_agree(tmp_path, monkeypatch):
    cfg = load(PipelineConfig, OLD_RUN / "config.yaml")
    grade = cfg.member("grade", "g").config
    stage = STAGES["grade"]
    monkeypatch.setattr(GradeStage, "predict", lambda self, job, model, val: val)  # no samples needed here
    for k, config in enumerate([grade, dataclasses.replace(grade, out_px=32)]):
        job = FoldJob("grade", "g", k, 2, config, "", str(tmp_path), {})
        torch.manual_seed(k)
        finish_fold(stage, job, stage.build_model("g", config), pd.DataFrame())
    model, config = load_fold_model(str(tmp_path), "grade", "g", 0)
    assert config == grade and isinstance(model, Grader)
    state = torch.load(io.BytesIO((tmp_path / "grade" / "g" / "fold0" / "model.pt").read_bytes()), weights_only=True)
    assert (state["stage"], state["member"]) == ("grade", "g")
    with pytest.raises(SchemaError, match="store different configs"):
        load_member(str(tmp_path), "grade", "g", 2)


def test_a_weights_file_without_a_config_is_refused_in_one_line(tmp_path):
    d = tmp_path / "grade" / "g" / "fold0"
    d.mkdir(parents=True)
    torch.save({"model": {}}, d / "model.pt")
    with pytest.raises(SchemaError, match="no member config"):
        load_fold_model(str(tmp_path), "grade", "g", 0)


def test_every_member_kind_is_a_tune_lr_target():
    cfg = load(PipelineConfig, Path(__file__).parents[1] / "jobs" / "smoke.yaml")
    assert member_config(cfg, "onestage.one")[:2] == ("onestage", "one")
    assert member_config(cfg, "localize.axial@s1")[2] == cfg.localize_variants[0].localize.axial
    assert member_config(cfg, "grade.b")[2].two_step is not None
    faster = dataclasses.replace(cfg.onestage[0], train=dataclasses.replace(cfg.onestage[0].train, lr=0.5))
    assert cfg.with_member("onestage", "one", faster).onestage[0].train.lr == 0.5
    variant = cfg.with_member("localize", "sag_t1@s1", faster_view := dataclasses.replace(cfg.localize.sag_t1, size=64))
    assert variant.localize_variants[0].localize.sag_t1 == faster_view and variant.localize == cfg.localize
    with pytest.raises(ConfigError, match="no member grade.zz"):
        member_config(cfg, "grade.zz")
    with pytest.raises(ConfigError, match="expected {stage}.{member}"):
        member_config(cfg, "coronal.x")
