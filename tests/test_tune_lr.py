"""`spine-ray tune-lr`: the searched keys, and a real Optuna + ASHA search on one fold."""

from __future__ import annotations

import json

import pytest

from spine_ray.core.config import ConfigError, load
from spine_ray.engine.train_loop import TrainConfig
from spine_ray.models.localizer import LocalizerConfig
from spine_ray.pipeline import setup_run
from spine_ray.run_config import PipelineConfig
from spine_ray.stages.localize import LocalizeConfig, ViewConfig
from spine_ray.tune_lr import SearchParam, TuneLRConfig, member_config, tune_lr, with_values

TINY = ViewConfig(model=LocalizerConfig(backbone="resnet10t", hidden=16, out_stride=2), train=TrainConfig(epochs=2, batch_size=2), slices=8, size=32)


def test_with_values_replaces_dotted_keys_and_validates():
    cfg = with_values(TINY, {"train.lr": 0.01, "train.weight_decay": 0.2})
    assert cfg.train.lr == 0.01 and cfg.train.weight_decay == 0.2 and cfg.model == TINY.model
    with pytest.raises(ConfigError, match="not in the ViewConfig"):
        with_values(TINY, {"train.momentum": 0.9})
    with pytest.raises(ConfigError, match="no member localize.coronal"):
        member_config(PipelineConfig(), "localize.coronal")


@pytest.mark.slow
def test_search_writes_a_trainable_best_config(prepared, tmp_path):
    cfg = PipelineConfig(prepared=str(prepared), run_dir=str(tmp_path / "run"), folds=2, localize=LocalizeConfig(sag_t2=TINY))
    setup_run(cfg)
    space = (SearchParam("train.lr", 1e-4, 1e-2), SearchParam("train.weight_decay", 1e-4, 1e-1))
    result = tune_lr(cfg, "localize.sag_t2", TuneLRConfig(trials=3, space=space))
    assert len(result["trials"]) == 3
    assert result["trials"][0]["train.lr"] == TINY.train.lr  # the current values are tried first
    assert result["best_val_loss"] == min(t["val_loss"] for t in result["trials"])
    best = load(PipelineConfig, result["config"])
    assert best.localize.sag_t2.train.lr == pytest.approx(result["best"]["train.lr"])
    assert json.loads((tmp_path / "run" / "tune_lr" / "localize.sag_t2" / "results.json").read_text())["target"] == "localize.sag_t2"
