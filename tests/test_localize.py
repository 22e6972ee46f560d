"""Stage 1: samples, the geometric axial step, mapping points back (training it end to end: test_pipeline_e2e)."""

from __future__ import annotations

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


@pytest.mark.parametrize("pack", ["on", "off"])
def test_axial_folds_follow_their_sagittal_t2_fold_in_one_run_or_all_sagittal_folds_in_the_next(prepared, tmp_path, monkeypatch, pack):
    """Packed (CPU lanes): one run, axial fold k needs sagittal T2 fold k and reads its points.
    One trial per fold (GPU): the axial folds run after every sagittal fold, on their points table."""
    import pandas as pd

    import spine_ray.pipeline as pl
    from spine_ray.engine.resources import ResourcesConfig
    from spine_ray.engine.stage import fold_dir
    from spine_ray.stages.localize import POINT_COLUMNS

    calls = []

    def fake_run_folds(stage, jobs, resources, samples_dir=None):
        calls.append(jobs)
        return [pd.DataFrame(columns=POINT_COLUMNS).assign(view=pd.Series(dtype=str)) for _ in jobs]

    monkeypatch.setattr(pl, "run_folds", fake_run_folds)
    cfg = pl.resolved(PipelineConfig(prepared=str(prepared), run_dir=str(tmp_path / "run"), folds=2, resources=ResourcesConfig(pack_folds=pack)))
    pl.train_localize(cfg)
    axial = [j for j in calls[-1] if j.member == "axial"]
    assert [j.fold for j in axial] == [0, 1]
    if pack == "on":
        assert len(calls) == 1 and [j.member for j in calls[0][:4]] == ["sag_t2", "sag_t2", "sag_t1", "sag_t1"]
        t2 = {j.fold: j for j in calls[0] if j.member == "sag_t2"}
        assert [j.needs for j in axial] == [("sag_t2-fold0",), ("sag_t2-fold1",)]
        assert [j.inputs["spinal_points"] for j in axial] == [f"{fold_dir(t2[k])}/oof.parquet" for k in (0, 1)]
    else:
        assert len(calls) == 2 and all(j.member != "axial" for j in calls[0]) and len(calls[1]) == 2
        assert all(not j.needs and j.inputs["spinal_points"].endswith("localize/spinal_points.parquet") for j in axial)
