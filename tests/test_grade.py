"""Stage 2 (grade): mm-sized crops, samples from prepared synthetic studies, the flip swap, the
loss weighting, OOF assembly and one end-to-end fold."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from tinyruns import prepared_run

from spine_ray.core.schema import LABEL_COLUMNS, OOF_COLUMNS
from spine_ray.data.transforms import mirror_name
from spine_ray.data.volumes import read_volumes
from spine_ray.engine.fold import run_fold
from spine_ray.engine.sample_cache import samples
from spine_ray.engine.stage import FoldJob, collate
from spine_ray.engine.train_loop import TrainConfig
from spine_ray.models.grader import Grader, GraderConfig
from spine_ray.stages.grade.augment import collate_samples, flip_sample
from spine_ray.stages.grade.config import SAMPLE_COLUMNS, SLOTS, GradeConfig
from spine_ray.stages.grade.predict import flip_batch, forward, predict_study, sample_probs
from spine_ray.stages.grade.samples import study_samples
from spine_ray.stages.grade.stage import GradeStage
from spine_ray.stages.losses import grader_loss

TINY = GraderConfig(backbone="test_resnet", dim=16, lstm_hidden=8, level_embedding=True, condition_embedding=True, n_views=3)
CFG = GradeConfig(model=TINY, train=TrainConfig(epochs=1, batch_size=4, lr=1e-3), out_px=32)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_local):
    """Five synthetic studies at 64 px, prepared; folds and a fake stage-1 points table in a run dir."""
    return prepared_run(tmp_path_factory.mktemp("grade"), studies=5, seed=3)


def _job(p: dict, cfg: GradeConfig = CFG, fold: int = 0) -> FoldJob:
    return FoldJob("grade", cfg.name, fold, 2, cfg, p["prep"], p["run"], {"points": f"{p['run']}/points.parquet"})


def _volume(n: int = 9, size: int = 40) -> pd.DataFrame:
    """One stack whose voxel value is its column index (0…size−1), spacing 0.5 × 1.0 mm."""
    vol = np.broadcast_to(np.arange(size, dtype=np.uint16), (n, size, size)).copy()
    return pd.DataFrame([{
        "study_id": 1, "series_id": 10, "series_description": "Sagittal T2/STIR", "stack": 0, "n_slices": n,
        "rows": size, "cols": size, "volume": vol.tobytes(), "dtype": "uint16", "instance_numbers": list(range(n)),
        "positions": [[0.0, 0.0, float(i)] for i in range(n)], "orientation": [0, 1, 0, 0, 0, -1],
        "pixel_spacing": [0.5, 1.0], "slice_spacing": 1.0, "affine": np.eye(4).reshape(-1).tolist(),
        "intensity_p01": 0.0, "intensity_p99": float(size - 1),
    }])


def test_crops_are_millimetre_sized_and_work_at_the_edge():
    vol = _volume()
    cfg = GradeConfig(model=TINY, out_px=16, sagittal_mm=(8.0, 8.0), context=1.0, max_shift=0, k=1)
    pts = pd.DataFrame([{"study_id": 1, "target": "spinal_canal_stenosis_l1_l2", "series_id": 10, "stack": 0,
                         "slice": 0.0, "row": 20.0, "col": 1.0}])
    (s,) = study_samples(cfg, vol, pts, {"spinal_canal_stenosis_l1_l2": 2})
    x = np.frombuffer(s["x"], np.float16).reshape(s["shape"])[0].astype(np.float32)
    # 8 mm wide at 1 mm per column, 16 px: half a column per crop pixel, centred on col 1; a voxel's
    # value is its column, so the crop row reads its own sampling positions, 0 left of the image.
    row = x[1, 8] * 39
    assert np.allclose(row, np.clip(1.0 - 3.75 + 0.5 * np.arange(16), 0, None), atol=0.05)
    # 8 mm tall at 0.5 mm per row: two rows per crop pixel.
    assert np.allclose(x[1, :, 12], x[1, 0, 12], atol=1e-3)
    inside = np.frombuffer(s["inside"], bool).reshape(s["shape"][:2])[0]
    assert inside.tolist() == [False, True, True]  # slice −1 lies beyond the volume
    assert (x[0] == 0).all()
    assert np.frombuffer(s["target_mask"], bool).tolist() == [True, False, False, False, False]
    assert np.frombuffer(s["labels"], np.int8)[0] == 2


def test_flip_swaps_left_and_right_slots_with_labels():
    conditions = [c for c, _, _ in SLOTS] + ["spinal_canal_stenosis"]
    views = np.array([v for _, v, _ in SLOTS] + [2])
    rng = np.random.default_rng(0)
    x = rng.random((6, 5, 4, 4)).astype(np.float32)
    labels = np.array([0, 1, 2, 0, 1, 2])
    mask = np.array([True, True, False, True, True, True])
    slice_mask = np.ones((6, 5), bool)
    slice_mask[:, 0] = False
    st = np.array([1, 2, 3, 0, 4, -1])
    fx, fsm, fmask, flab, fst = flip_sample(x, views, conditions, slice_mask, mask, labels, slice_index=st)
    assert flab.tolist() == [0, 2, 1, 1, 0, 2]  # left ↔ right labels, spinal stays
    assert fmask.tolist() == [True, False, True, True, True, True]
    # The new left-foraminal slot holds the right-foraminal crop with its slices reversed.
    assert np.array_equal(fx[1], x[2, ::-1])
    assert np.array_equal(fx[0], x[0, ::-1])
    # Axial crops flip their columns instead.
    assert np.array_equal(fx[3], x[4, ..., ::-1])
    assert np.array_equal(fx[5], x[5, ..., ::-1])
    assert fsm[0].tolist() == [True, True, True, True, False] and fsm[3].tolist() == slice_mask[4].tolist()
    assert fst.tolist() == [3, 1, 2, 4, 0, -1]
    # Flipping twice restores everything.
    back = flip_sample(fx, views, conditions, fsm, fmask, flab, slice_index=fst)
    assert np.array_equal(back[0], x) and back[3].tolist() == labels.tolist() and back[4].tolist() == st.tolist()


def test_collate_flip_keeps_image_and_label_together():
    """Through collate: with flip_prob 1 every left slot carries what was the right slot's crop and label."""
    vol = _volume()
    rows = []
    for i, (cond, _, _) in enumerate(SLOTS[:3]):
        rows.append({"study_id": 1, "target": f"{cond}_l1_l2", "series_id": 10, "stack": 0, "slice": 4.0, "row": 20.0, "col": 10.0 + 8 * i})
    sev = {"left_neural_foraminal_narrowing_l1_l2": 2, "right_neural_foraminal_narrowing_l1_l2": 0, "spinal_canal_stenosis_l1_l2": 1}
    base = dict(model=TINY, out_px=16, sagittal_mm=(8.0, 8.0), xy_jitter_mm=0.0, rotate_deg=0.0, slice_jitter=False, intensity_aug=False)
    s = pd.DataFrame(study_samples(GradeConfig(**base), vol, pd.DataFrame(rows), sev), columns=SAMPLE_COLUMNS)
    cols = {c: s[c].to_numpy() for c in s.columns}
    plain = collate_samples(GradeConfig(**base, flip_prob=0.0), cols, np.random.default_rng(0))
    flipped = collate_samples(GradeConfig(**base, flip_prob=1.0), cols, np.random.default_rng(0))
    assert plain["labels"][0].tolist() == [1, 2, 0, -1, -1]
    assert flipped["labels"][0].tolist() == [1, 0, 2, -1, -1]
    # Columns encode position: the left slot's crop is now the (brighter) right one's.
    assert float(flipped["x"][0, 1].mean()) == pytest.approx(float(plain["x"][0, 2].mean()), abs=1e-4)
    assert flipped["x"][0, 1].mean() > plain["x"][0, 1].mean() + 0.1


def test_loss_weights_severe_like_the_metric():
    """The severity term is the metric's 1/2/4-weighted mean: a confident miss on a severe target costs 4× more."""
    logits = torch.tensor([[[4.0, 0.0, 0.0], [4.0, 0.0, 0.0]]])
    out = {"logits": logits, "slice_logits": torch.zeros(1, 2, 5)}
    nll = -torch.log_softmax(logits[0, 0], -1)
    both = grader_loss(out, torch.tensor([[0, 2]]), w_any=0.0, w_slice=0.0)["severity"]
    assert float(both) == pytest.approx(float((nll[0] + 4 * nll[2]) / 5), rel=1e-5)
    masked = grader_loss(out, torch.tensor([[0, -1]]), w_any=0.0, w_slice=0.0)["severity"]
    assert float(masked) == pytest.approx(float(nll[0]), rel=1e-5)


def test_config_is_validated():
    with pytest.raises(ValueError):
        GradeConfig(model=TINY, context=0.5)
    with pytest.raises(ValueError):
        GradeConfig(model=GraderConfig(backbone="test_resnet", n_views=1))


def test_samples_from_prepared_studies(prepared):
    job = _job(prepared)
    stage = GradeStage()
    train = samples(stage, job, "train")
    val = samples(stage, job, "val")
    folds = pd.read_parquet(f"{prepared['run']}/folds.parquet")
    assert set(train["study_id"]) <= set(folds.loc[folds["fold"] != 0, "study_id"])
    assert set(val["study_id"]) == set(folds.loc[folds["fold"] == 0, "study_id"])
    assert list(train.columns) == SAMPLE_COLUMNS and len(train) > 0
    batch = collate(stage, job, {c: train[c].to_numpy()[:3] for c in train.columns}, np.random.default_rng(0))
    assert batch["x"].shape == (3, 5, 5, 1, 32, 32)
    assert batch["x"].dtype == torch.float32 and 0 <= float(batch["x"].min()) and float(batch["x"].max()) <= 1
    # Labels match labels.parquet for the unflipped, unaugmented view of the samples.
    plain = collate(stage, job, {c: train[c].to_numpy() for c in train.columns}, None)
    lab = prepared["lab"].drop_duplicates(["study_id", "condition", "level"]).set_index(["study_id", "condition", "level"])["severity"]
    for j, (study, lv) in enumerate(zip(train["study_id"], train["level"], strict=True)):
        for i, (cond, _, _) in enumerate(SLOTS):
            if plain["target_mask"][j, i]:
                assert int(plain["labels"][j, i]) == int(lab[(study, cond, lv)])
    # Training crops sit on the labelled slice: the aux target is the middle slice whenever it is known.
    known = plain["slice_target"][plain["slice_target"] >= 0]
    assert len(known) > 0 and (known == CFG.k).all()


def test_missing_points_are_masked_not_predicted(prepared):
    vols = read_volumes(prepared["prep"])
    study = int(prepared["points"]["study_id"].iloc[0])
    pts = prepared["points"][prepared["points"]["study_id"] == study]
    pts = pts[~pts["target"].str.startswith("left_subarticular")]
    model = Grader(TINY).eval()
    probs, mask = predict_study([model, model], CFG, vols[vols["study_id"] == study], pts)
    assert probs.shape == (25, 3) and mask.shape == (25,)
    left_sub = np.array([t.startswith("left_subarticular") for t in LABEL_COLUMNS])
    assert not mask[left_sub].any() and np.isnan(probs[left_sub]).all()
    assert mask[~left_sub].sum() == len(set(pts["target"]))
    assert np.allclose(probs[mask].sum(1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_run_fold_end_to_end_and_oof(prepared):
    oofs = []
    for fold in (0, 1):
        job = _job(prepared, fold=fold)
        model, metrics, oof = run_fold(GradeStage(), job, device=torch.device("cpu"))
        assert np.isfinite(metrics["train_loss"])
        assert list(oof.columns) == OOF_COLUMNS
        folds = pd.read_parquet(f"{prepared['run']}/folds.parquet")
        val = set(folds.loc[folds["fold"] == fold, "study_id"])
        pts = prepared["points"]
        expected = {f"{s}_{t}" for s, t in zip(pts["study_id"], pts["target"], strict=True) if s in val}
        assert oof["row_id"].is_unique and set(oof["row_id"]) == expected
        assert set(oof["study_id"]) == val and (oof["fold"] == fold).all() and (oof["member"] == CFG.name).all()
        assert np.allclose(oof[["normal_mild", "moderate", "severe"]].sum(1), 1.0, atol=1e-5)
        oofs.append(oof)
        # Two partial samples of one level (a study split across Ray Data batches) still give one row each.
        val_samples = samples(GradeStage(), job, "val")
        again = GradeStage().predict(job, model, pd.concat([val_samples, val_samples]))
        assert again["row_id"].is_unique and set(again["row_id"]) == expected
        if fold == 0:
            # predict_study on a val study agrees with the OOF table of the same model.
            study = min(val)
            vols = read_volumes(prepared["prep"])
            probs, mask = predict_study([model], CFG, vols[vols["study_id"] == study], pts[pts["study_id"] == study])
            mine = oof[oof["study_id"] == study].set_index("row_id")
            for i in np.flatnonzero(mask):
                got = mine.loc[f"{study}_{LABEL_COLUMNS[i]}", ["normal_mild", "moderate", "severe"]].to_numpy(float)
                assert np.allclose(got, probs[i], atol=1e-5)
    both = pd.concat(oofs)
    assert both["row_id"].is_unique


def test_flip_batch_matches_flip_sample_and_tta_is_symmetric(prepared):
    cfg = GradeConfig(model=TINY, multiview_spinal=True)
    pts = prepared["points"]
    study = int(pts["study_id"].iloc[0])
    vols = read_volumes(prepared["prep"])
    s = pd.DataFrame(study_samples(cfg, vols[vols["study_id"] == study], pts[pts["study_id"] == study]), columns=SAMPLE_COLUMNS)
    rows = {c: s[c].to_numpy() for c in s.columns}
    batch = collate_samples(cfg, rows, None)
    flipped = flip_batch(cfg, batch)
    conditions = [c for c, _, _ in cfg.slots]
    views = np.array([v for _, v, _ in cfg.slots])
    fx, fsm, ftm = flip_sample(batch["x"][0, :, :, 0].numpy(), views, conditions, batch["slice_mask"][0].numpy(), batch["target_mask"][0].numpy())[:3]
    assert np.array_equal(flipped["x"][0, :, :, 0].numpy(), fx)
    assert np.array_equal(flipped["slice_mask"][0].numpy(), fsm) and np.array_equal(flipped["target_mask"][0].numpy(), ftm)
    assert all(torch.equal(flip_batch(cfg, flipped)[k], batch[k]) for k in batch)
    # With flip TTA a model's prediction of the mirrored study is the mirror of its prediction.
    torch.manual_seed(0)
    model = Grader(TINY).eval()
    perm = [conditions.index(mirror_name(c)) if mirror_name(c) != c else i for i, c in enumerate(conditions)]
    p, _ = sample_probs([model], cfg, s)
    with torch.no_grad():
        one = forward(model, batch)["logits"].softmax(-1).numpy()
        two = forward(model, flipped)["logits"].softmax(-1).numpy()[:, perm]
    assert np.allclose(p, (one + two) / 2, atol=1e-5) and not np.allclose(one, two, atol=1e-3)
