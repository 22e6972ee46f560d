"""`grad_checkpointing`: true, false or "auto" (settled for the training device and the job's share of it)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from benchmarks import checkpointing as bench
from spine_ray.core.config import ConfigError, from_dict
from spine_ray.engine.fold import fit_fold
from spine_ray.engine.stage import FoldJob, collate, epoch_rng
from spine_ray.engine.train_loop import TrainConfig
from spine_ray.models import backbone
from spine_ray.models.backbone import checkpointing_of, checkpointing_wanted, resolve_checkpointing
from spine_ray.models.grader import Grader, GraderConfig
from spine_ray.models.localizer import Localizer, LocalizerConfig
from spine_ray.stages.grade.config import GradeConfig
from spine_ray.stages.grade.stage import GradeStage
from tests.test_grade_augment import TINY, _rows


@pytest.mark.parametrize(("setting", "device", "gib", "share", "want"), [
    (True, "cpu", 0.0, 1.0, True), (False, "cuda", 16.0, 1.0, False),  # an explicit setting is kept
    ("auto", "cpu", 0.0, 1.0, False),  # host memory: checkpointing would only cost time
    ("auto", "cuda", 139.8, 1.0, False), ("auto", "cuda", 79.2, 1.0, False),  # a whole H200, H100
    ("auto", "cuda", 139.8, 0.25, True), ("auto", "cuda", 79.2, 0.5, True),  # a share of one under 40 GiB
    ("auto", "cuda", 22.0, 1.0, True), ("auto", "cuda", 39.4, 1.0, True),  # A10G, A100-40GB
])
def test_auto_checkpoints_where_the_jobs_gpu_memory_is_under_the_threshold(setting, device, gib, share, want):
    assert checkpointing_wanted(setting, device, gib, share) is want


def test_auto_is_built_off_and_settled_for_the_device():
    assert checkpointing_of(Localizer(LocalizerConfig(backbone="test_resnet", hidden=8, grad_checkpointing=True))) == [True]
    for model in (Localizer(LocalizerConfig(backbone="test_resnet", hidden=8, grad_checkpointing="auto")),
                  Grader(GraderConfig(backbone="test_resnet", dim=16, lstm_hidden=8, grad_checkpointing="auto"))):
        assert checkpointing_of(model) == [False]
        assert resolve_checkpointing(model, torch.device("cpu")) is False and checkpointing_of(model) == [False]
    fixed = Localizer(LocalizerConfig(backbone="test_resnet", hidden=8, grad_checkpointing=True))
    assert resolve_checkpointing(fixed, torch.device("cpu")) is None and checkpointing_of(fixed) == [True]  # not asked: left alone
    assert from_dict(LocalizerConfig, {"grad_checkpointing": "auto"}).grad_checkpointing == "auto"
    with pytest.raises(ConfigError):
        from_dict(LocalizerConfig, {"grad_checkpointing": "sometimes"})
    with pytest.raises(ValueError):
        LocalizerConfig(grad_checkpointing="sometimes")


def test_the_fold_driver_settles_auto_with_the_jobs_gpu_share(monkeypatch):
    asked = []

    def wanted(setting, device_type, gib, share):
        asked.append((setting, device_type, share))
        return True  # as on a small GPU

    monkeypatch.setattr(backbone, "checkpointing_wanted", wanted)
    model_cfg = dataclasses.replace(TINY, grad_checkpointing="auto")
    cfg = GradeConfig(model=model_cfg, train=TrainConfig(epochs=1, batch_size=4, lr=3e-3), out_px=32)
    stage, rows, job = GradeStage(), _rows(cfg, 4, 0), FoldJob("grade", cfg.name, 0, 2, cfg, "", "", {})

    def batches(epoch: int):
        return [collate(stage, job, rows, epoch_rng(0, 0, epoch))]

    model, metrics = fit_fold(stage, job, batches, 4, device=torch.device("cpu"), gpu_share=0.25)
    assert asked == [("auto", "cpu", 0.25)] and checkpointing_of(model) == [True] and metrics["train_loss"] > 0


def test_the_checkpointing_benchmark_measures_memory_not_gradients():
    """benchmarks/checkpointing.py on a tiny backbone: the same gradients, fewer bytes kept, the forward run again."""
    pair = bench.models(bench.RECIPE, 2, 32, backbone="test_convnext")
    assert [cfg.model.net.grad_checkpointing for cfg, _ in pair.values()] == [True, False]
    b = bench.batch(pair["checkpointing on"][0], 2)
    assert bench.same_gradients(pair, b) == 0.0
    kept = {name: bench.saved_bytes(cfg, model, b) for name, (cfg, model) in pair.items()}
    assert 0 < kept["checkpointing on"] < kept["checkpointing off"]
    again = {name: bench.forward_flops(cfg, model, b, train=True) for name, (cfg, model) in pair.items()}
    fwd = bench.forward_flops(*pair["checkpointing off"], b, train=False)
    assert again["checkpointing off"] == pytest.approx(fwd, rel=1e-3)
    enc = sum(bench.forward_encoder(*pair["checkpointing off"], b).values())
    assert 0 < enc < fwd
    # What checkpointing adds is the encoders' forward run again: more than nothing, at most all of it.
    assert 0 < again["checkpointing on"] - again["checkpointing off"] <= 1.001 * enc


def test_the_recipes_one_stage_member_settles_checkpointing_per_gpu():
    from spine_ray.core.config import load
    from spine_ray.run_config import PipelineConfig

    cfg = load(PipelineConfig, str(bench.RECIPE))
    assert cfg.onestage[0].model.net.grad_checkpointing == "auto"
    assert dataclasses.replace(cfg.onestage[0].model.net, grad_checkpointing=True).grad_checkpointing is True
