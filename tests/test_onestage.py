"""The one-stage point-masking member: network shapes, heatmap pooling, the left–right flip, the
ground-truth-heatmap switch, one fold through the fold driver, inference, and a pipeline run."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from spine_ray.core.schema import LABEL_COLUMNS, OOF_COLUMNS, target_index
from spine_ray.data.volumes import read_volumes
from spine_ray.engine.fold import run_fold
from spine_ray.engine.sample_cache import samples
from spine_ray.engine.stage import FoldJob, collate, columns
from spine_ray.engine.train_loop import TrainConfig
from spine_ray.models.heatmap import gaussian_heatmap
from spine_ray.models.localizer import LocalizerConfig
from spine_ray.models.onestage import OneStageNet, OneStageNetConfig, PointGrader, pool_grades
from spine_ray.pipeline import setup_run
from spine_ray.run_config import PipelineConfig
from spine_ray.stages.localize import FORAMINAL, SPINAL
from spine_ray.stages.onestage import (
    MIRROR,
    TARGETS,
    OneStageConfig,
    OneStageStage,
    augment_samples,
    batch_tensors,
    flip_arrays,
    forward,
    onestage_loss,
    predict_study,
)

NET = OneStageNetConfig(net=LocalizerConfig(backbone="resnet10t", hidden=16, out_stride=2))
TINY = OneStageConfig(model=NET, train=TrainConfig(epochs=1, batch_size=2, lr=3e-3), slices=8, size=32)


@pytest.fixture(scope="module")
def run_dir(prepared, tmp_path_factory):
    run = tmp_path_factory.mktemp("onestage") / "run"
    setup_run(PipelineConfig(prepared=str(prepared), run_dir=str(run), folds=2))
    return run


def _job(prepared, run_dir, cfg: OneStageConfig = TINY, fold: int = 0) -> FoldJob:
    return FoldJob("onestage", cfg.name, fold, 2, cfg, str(prepared), str(run_dir), {})


def test_forward_shapes_per_view():
    torch.manual_seed(0)
    model = OneStageNet(NET).eval()
    xs = {"sag_t2": torch.rand(2, 8, 1, 32, 32), "sag_t1": torch.rand(2, 8, 1, 32, 32)}
    out = model(xs)
    assert tuple(out["sag_t2"]["heat"].shape) == (2, 5, 8, 16, 16)
    assert tuple(out["sag_t1"]["heat"].shape) == (2, 10, 8, 16, 16)
    assert tuple(out["sag_t1"]["grade_map"].shape) == (2, 3, 8, 16, 16)
    assert tuple(out["sag_t2"]["logits"].shape) == (2, 5, 3) and tuple(out["sag_t1"]["logits"].shape) == (2, 10, 3)


def test_pooled_grade_equals_a_hand_computation():
    # Two points on a 1×2×2 volume; grade logits per voxel for 3 classes.
    grade_map = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 8.0]]], [[[-1.0, 1.0], [2.0, 0.0]]]])[None]  # [1, 3, 1, 2, 2]
    attention = torch.tensor([[[[0.5, 0.5], [0.0, 0.0]]], [[[0.0, 0.0], [0.25, 0.75]]]])[None]  # [1, 2, 1, 2, 2]
    got = pool_grades(attention, grade_map)[0]
    want = torch.tensor([
        [0.5 * 1 + 0.5 * 2, 0.0, 0.5 * -1 + 0.5 * 1],
        [0.25 * 3 + 0.75 * 4, 0.75 * 8, 0.25 * 2 + 0.75 * 0],
    ])
    assert torch.allclose(got, want)


def _arrays(rng: np.random.Generator, b: int = 3, s: int = 8) -> dict[str, np.ndarray]:
    a: dict[str, np.ndarray] = {"study_id": np.arange(b), "labels": rng.integers(-1, 3, (b, 15))}
    for v, p in (("sag_t2", 5), ("sag_t1", 10)):
        a[f"x_{v}"] = rng.random((b, s, 4, 4)).astype(np.float16)
        a[f"coords_{v}"] = rng.uniform(0, s - 1, (b, p, 3)).astype(np.float32)
        a[f"visible_{v}"] = rng.random((b, p)) < 0.7
        a[f"has_{v}"] = np.ones(b, bool)
    return a


def test_flip_swaps_left_and_right_foramina_with_their_labels_and_is_an_involution():
    rng = np.random.default_rng(0)
    a = _arrays(rng)
    which = np.array([True, False, True])
    f = flip_arrays(a, which, 8)
    twice = flip_arrays(f, which, 8)
    for k in a:
        assert np.allclose(twice[k], a[k], atol=1e-5) if k.startswith("coords") else np.array_equal(twice[k], a[k]), k
    # Sample 0 flipped: the left L3/L4 foramen channel now holds what the right one held, slice mirrored.
    left, right = FORAMINAL.index("left_neural_foraminal_narrowing_l3_l4"), FORAMINAL.index("right_neural_foraminal_narrowing_l3_l4")
    assert np.allclose(f["coords_sag_t1"][0, left, 1:], a["coords_sag_t1"][0, right, 1:])
    assert np.isclose(f["coords_sag_t1"][0, left, 0], 7 - a["coords_sag_t1"][0, right, 0])
    assert f["visible_sag_t1"][0, left] == a["visible_sag_t1"][0, right]
    assert np.array_equal(f["x_sag_t1"][0], a["x_sag_t1"][0, ::-1])
    # Labels follow their channels; spinal levels stay where they are; unflipped samples are untouched.
    lt, rt = TARGETS.index("left_neural_foraminal_narrowing_l3_l4"), TARGETS.index("right_neural_foraminal_narrowing_l3_l4")
    assert f["labels"][0, lt] == a["labels"][0, rt] and f["labels"][0, rt] == a["labels"][0, lt]
    assert np.array_equal(f["labels"][0, : len(SPINAL)], a["labels"][0, : len(SPINAL)])
    assert np.array_equal(f["coords_sag_t2"][0, :, 1:], a["coords_sag_t2"][0, :, 1:])
    for k in a:
        assert np.array_equal(f[k][1], a[k][1]), k
    assert sorted(MIRROR[len(SPINAL):]) == list(range(len(SPINAL), 15)) and (MIRROR[MIRROR] == np.arange(15)).all()


def test_gt_heatmap_switch_pools_with_the_labelled_gaussian():
    torch.manual_seed(0)
    m = PointGrader(NET.net, 2).eval()
    x = torch.rand(1, 8, 1, 32, 32)
    gt = gaussian_heatmap((8, 16, 16), torch.tensor([[[2.0, 3.0, 4.0], [5.0, 10.0, 12.0]]]), 1.0)
    vis = torch.tensor([[True, False]])
    with torch.no_grad():
        own = m(x)
        sw = m(x, gt, vis)
    assert torch.allclose(sw["logits"][0, 0], pool_grades(gt, sw["grade_map"])[0, 0], atol=1e-5)
    assert torch.allclose(sw["logits"][0, 1], own["logits"][0, 1], atol=1e-5)  # no label point: its own heatmap
    assert not torch.allclose(sw["logits"][0, 0], own["logits"][0, 0], atol=1e-3)


def test_samples_hold_both_views_and_labels(prepared, run_dir):
    train = samples(OneStageStage(), _job(prepared, run_dir), "train")
    assert len(train) >= 2 and train["has_sag_t2"].all() and train["has_sag_t1"].all()
    a = augment_samples(TINY, columns(train), np.random.default_rng(0))
    assert a["x_sag_t2"].shape == (len(train), 8, 32, 32) and a["coords_sag_t1"].shape == (len(train), 10, 3)
    assert (a["labels"] >= 0).any(axis=1).all()
    assert a["visible_sag_t2"].any() and a["visible_sag_t1"].any()


def test_loss_has_every_term_and_the_switch_changes_only_the_grades(prepared, run_dir):
    job = _job(prepared, run_dir)
    train = samples(OneStageStage(), job, "train")
    batch = collate(OneStageStage(), job, columns(train.iloc[:2]), None)
    torch.manual_seed(0)
    model = OneStageNet(NET).eval()
    parts = onestage_loss(TINY, forward(TINY, model, batch), batch)
    assert all(torch.isfinite(v) for v in parts.values()) and parts["heat"] > 0 and parts["severity"] > 0
    gt_cfg = dataclasses.replace(TINY, gt_heatmap=True)
    gt_parts = onestage_loss(gt_cfg, forward(gt_cfg, model, batch), batch)
    assert torch.isclose(gt_parts["heat"], parts["heat"]) and not torch.isclose(gt_parts["severity"], parts["severity"])
    assert batch_tensors(augment_samples(TINY, columns(train.iloc[:2]), None))["x_sag_t1"].shape == (2, 8, 1, 32, 32)


def test_one_fold_through_the_fold_driver_gives_spinal_and_foraminal_oof_rows(prepared, run_dir):
    job = _job(prepared, run_dir)
    model, metrics, oof = run_fold(OneStageStage(), job)
    assert np.isfinite(metrics["train_loss"])
    assert list(oof.columns) == OOF_COLUMNS
    val = samples(OneStageStage(), job, "val")
    assert set(oof["study_id"]) == set(val["study_id"]) and (oof["member"] == "onestage").all() and (oof["fold"] == 0).all()
    targets = set(oof["row_id"].str.split("_", n=1).str[1])
    assert targets == set(SPINAL) | set(FORAMINAL)
    assert len(oof) == 15 * len(val)
    assert np.allclose(oof[["normal_mild", "moderate", "severe"]].sum(axis=1), 1, atol=1e-5)

    # Inference on one study's volumes: the same 15 targets, the subarticular ones left to the prior.
    vols = read_volumes(str(prepared))
    study = int(val["study_id"].iloc[0])
    probs, mask = predict_study([model], TINY, vols[vols["study_id"] == study])
    assert mask.sum() == 15 and all(mask[target_index(t)] for t in TARGETS)
    assert np.isnan(probs[~mask]).all() and np.allclose(probs[mask].sum(1), 1, atol=1e-5)
    mine = oof[oof["study_id"] == study].set_index("row_id")
    # OOF and inference run the same sample through the same model (TTA included).
    for t in TARGETS:
        assert np.allclose(probs[target_index(t)], mine.loc[f"{study}_{t}", ["normal_mild", "moderate", "severe"]].to_numpy(float), atol=1e-4)
    no_t1 = vols[(vols["study_id"] == study) & (vols["series_description"] != "Sagittal T1")]
    _, mask = predict_study([model], TINY, no_t1)
    assert mask.sum() == 5 and all(mask[LABEL_COLUMNS.index(t)] for t in SPINAL)


def test_config_is_validated():
    with pytest.raises(ValueError, match="multiple of out_stride"):
        OneStageConfig(model=NET, size=33)
    with pytest.raises(ValueError, match="views"):
        OneStageConfig(model=OneStageNetConfig(net=NET.net, views=("sag_t2",), points=(5,)))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_step_on_cuda_under_autocast():
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = OneStageNet(NET).to(dev)
    rng = np.random.default_rng(0)
    a = _arrays(rng, b=2, s=8)
    a = {k: (np.repeat(np.repeat(v, 8, -1), 8, -2) if k.startswith("x_") else v) for k, v in a.items()}  # 4 → 32 px
    batch = {k: t.to(dev) for k, t in batch_tensors(a).items()}
    with torch.autocast("cuda", dtype=torch.bfloat16):
        parts = onestage_loss(TINY, forward(TINY, model, batch), batch)
    parts["loss"].backward()
    assert all(torch.isfinite(v) for v in parts.values())
