"""Stage 1: samples, the geometric axial step, mapping points back (training it end to end: test_pipeline_e2e)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from spine_ray.data.crops import to_native
from spine_ray.data.volumes import read_table
from spine_ray.engine.sample_cache import samples
from spine_ray.engine.stage import FoldJob
from spine_ray.engine.train_loop import TrainConfig
from spine_ray.models.heatmap import gaussian_heatmap, scale_coords
from spine_ray.models.localizer import LocalizerConfig
from spine_ray.pipeline import setup_run
from spine_ray.run_config import PipelineConfig
from spine_ray.stages.localize import (
    SPINAL,
    LocalizeStage,
    ViewConfig,
    error_summary,
    predict_points,
)

TINY = ViewConfig(model=LocalizerConfig(backbone="resnet10t", hidden=16, out_stride=2), train=TrainConfig(epochs=1, batch_size=2), slices=8, size=32)


def _job(prepared, run_dir, view: str, cfg: ViewConfig = TINY, inputs=None) -> FoldJob:
    return FoldJob("localize", view, 0, 2, cfg, str(prepared), str(run_dir), inputs or {})


@pytest.fixture()
def run_dir(prepared, tmp_path):
    setup_run(PipelineConfig(prepared=str(prepared), run_dir=str(tmp_path / "run"), folds=2))
    return tmp_path / "run"


def test_sagittal_samples_carry_label_points_in_resampled_voxels(prepared, run_dir):
    job = _job(prepared, run_dir, "sag_t2")
    train = samples(LocalizeStage(), job, "train")
    assert len(train) >= 2 and all(list(s) == [8, 32, 32] for s in train["shape"])
    labels = read_table(str(prepared), "labels.parquet")
    row = train.iloc[0]
    coords = np.frombuffer(row["coords"], np.float32).reshape(5, 3)
    native = to_native(coords, np.asarray(row["scale"]))
    lab = labels[(labels.study_id == row["study_id"]) & (labels.condition == "spinal_canal_stenosis")].sort_values("level")
    assert np.allclose(native, lab[["slice", "row", "col"]].to_numpy(float), atol=1e-3)


def test_axial_slabs_are_placed_by_projecting_the_spinal_point(prepared, run_dir):
    job = _job(prepared, run_dir, "axial", ViewConfig(model=TINY.model, train=TINY.train, slices=5, size=32))
    train = samples(LocalizeStage(), job, "train")
    has = np.concatenate([np.frombuffer(b, bool) for b in train["has_gt"]])
    vis = np.concatenate([np.frombuffer(b, bool) for b in train["visible"]])
    assert has.sum() >= 10
    # The projected spinal point puts the labelled subarticular slice inside the 5-slice slab.
    assert vis[has].mean() >= 0.9


class _PerfectLocalizer(nn.Module):
    """Heatmap logits peaked on the label coordinates of the samples it is given, in order."""

    def __init__(self, coords: list[np.ndarray], shape: tuple[int, int, int], stride: int) -> None:
        super().__init__()
        self.coords, self.shape, self.stride, self.i = coords, shape, stride, 0
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        b = x.shape[0]
        c = torch.tensor(np.stack(self.coords[self.i : self.i + b]))
        self.i += b
        heat = gaussian_heatmap(self.shape, scale_coords(c, [1.0, 1 / self.stride, 1 / self.stride]), 0.6)
        return torch.log(heat + 1e-12)


def test_predicted_points_map_back_to_native_pixels_and_millimetres(prepared, run_dir):
    job = _job(prepared, run_dir, "sag_t2")
    val = samples(LocalizeStage(), job, "val")
    coords = [np.frombuffer(c, np.float32).reshape(5, 3) for c in val["coords"]]
    model = _PerfectLocalizer(coords, (8, 16, 16), 2)
    points = predict_points("sag_t2", TINY, model, val, fold=0)
    assert set(points["target"]) == set(SPINAL)
    assert points["err_mm"].max() < 1.5  # DSNT on a coarse grid: sub-voxel, not exact
    assert (points["slice_err"] == 0).all()
    summary = error_summary(points)
    assert summary.loc["sag_t2", "slice_exact"] == 1.0


def test_each_fold_job_needs_exactly_the_jobs_whose_outputs_it_reads(tmp_path):
    """One schedule for the run: axial fold k needs sagittal T2 fold k and reads its points; grade
    fold k validates on the main localisers' fold-k points; a cross prediction needs its grader
    fold and the variant's fold-k localisers; one-stage folds need nothing."""
    import spine_ray.pipeline as pl
    from spine_ray.engine.stage import fold_dir, job_key
    from spine_ray.stages.grade.config import GradeConfig
    from spine_ray.stages.localize import LocalizeVariant
    from spine_ray.stages.onestage import OneStageConfig

    cfg = pl.resolved(PipelineConfig(prepared=str(tmp_path / "prep"), run_dir=str(tmp_path / "run"), folds=2,
                                     localize_variants=(LocalizeVariant("v2"),), grade=(GradeConfig(name="g"),),
                                     onestage=(OneStageConfig(name="one"),)))
    first, second = pl.stage1_jobs(cfg), pl.stage2_jobs(cfg)
    by_key = {job_key(j): j for j in first + second}
    assert len(by_key) == len(first) + len(second) == 2 * (6 + 1 + 1 + 1)
    for k in (0, 1):
        for v in ("", "@v2"):
            axial, t2 = by_key[f"axial{v}-fold{k}"], by_key[f"sag_t2{v}-fold{k}"]
            assert axial.needs == (job_key(t2),) and axial.inputs == {"spinal_points": f"{fold_dir(t2)}/oof.parquet"}
            assert not by_key[f"sag_t1{v}-fold{k}"].needs and not t2.needs
        grade = by_key[f"g-fold{k}"]
        assert grade.needs == (f"sag_t2-fold{k}", f"sag_t1-fold{k}", f"axial-fold{k}")
        assert grade.inputs == {f"points/{view}": f"{fold_dir(by_key[f'{view}-fold{k}'])}/oof.parquet" for view in ("sag_t2", "sag_t1", "axial")}
        cross = by_key[f"g@v2-fold{k}"]
        assert cross.stage == "cross" and cross.needs == (f"g-fold{k}", f"sag_t2@v2-fold{k}", f"sag_t1@v2-fold{k}", f"axial@v2-fold{k}")
        assert cross.inputs["points/axial"] == f"{fold_dir(by_key[f'axial@v2-fold{k}'])}/oof.parquet"
        assert not by_key[f"one-fold{k}"].needs
    assert all(n in by_key for j in by_key.values() for n in j.needs)
    # slice_errors: run — every grade fold draws jitter from all stage-1 folds, so it needs them all,
    # its tables listed view by view, fold by fold (the order of the run's points table).
    every = pl.stage2_jobs(dataclasses.replace(cfg, grade=(GradeConfig(name="g", slice_errors="run"),)))[0]
    assert every.needs == ("sag_t2-fold0", "sag_t2-fold1", "sag_t1-fold0", "sag_t1-fold1", "axial-fold0", "axial-fold1")
    assert list(every.inputs) == [f"points/{v}/fold{k}" for v in ("sag_t2", "sag_t1", "axial") for k in (0, 1)]
