"""Issue 14 training switches of stage 2: backbone blocks and partial freezing, soft-target losses,
CutMix / mixup of batches, two-step training (freezing, resumption) and tiny folds with each switch."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
from tinyruns import prepared_run

from spine_ray.core.config import ConfigError, from_dict
from spine_ray.engine.fold import fit_fold, local_batches, run_fold
from spine_ray.engine.sample_cache import samples
from spine_ray.engine.stage import FoldJob, fold_epochs, new_model
from spine_ray.engine.train_loop import TrainConfig
from spine_ray.models.freezing import backbone_blocks, eval_frozen_norms, freeze_backbone
from spine_ray.models.grader import GraderConfig
from spine_ray.stages.grade.augment import collate_samples, mix_batch
from spine_ray.stages.grade.config import FreezeConfig, GradeConfig, MixConfig, TwoStepConfig
from spine_ray.stages.grade.predict import severity_auc
from spine_ray.stages.grade.stage import GradeStage
from spine_ray.stages.losses import (
    any_severe_spinal_loss,
    grader_loss,
    severity_loss,
    slice_loss,
    soft_targets,
)

# dropout 0: a resumed fold then retraces the uninterrupted one exactly.
TINY = GraderConfig(backbone="test_resnet", dim=16, lstm_hidden=8, dropout=0.0, level_embedding=True, condition_embedding=True, n_views=3)
CFG = GradeConfig(model=TINY, train=TrainConfig(epochs=1, batch_size=4, lr=3e-3), out_px=32)


def _names(model: torch.nn.Module, *prefixes: str) -> set[str]:
    return {n for n, _ in model.named_parameters() if n.startswith(prefixes)}


# --- which parameters are blocks -------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "n", "prefixes"),
    [
        ("resnet10t", 2, ("layer3.", "layer4.")),
        ("resnet10t", 1, ("layer4.",)),
        ("test_convnext", 1, ("stages.3.blocks.1.", "head.norm.")),  # the final norm trains with the last block
        ("test_convnext", 2, ("stages.3.", "head.norm.")),  # a stage's downsample opens its first block
        ("test_vit", 1, ("blocks.5.", "norm.")),
        ("test_efficientnet", 1, ("blocks.4.", "conv_head.", "bn2.")),
    ],
)
def test_freeze_backbone_unfreezes_exactly_the_last_blocks(name, n, prefixes):
    m = timm.create_model(name, pretrained=False, num_classes=0, in_chans=1)
    trainable = set(freeze_backbone(m, n))
    assert trainable == _names(m, *prefixes) and trainable
    assert {k for k, p in m.named_parameters() if p.requires_grad} == trainable


def test_freeze_all_none_and_too_many_blocks():
    m = timm.create_model("resnet10t", pretrained=False, num_classes=0, in_chans=1)
    blocks = backbone_blocks(m)
    assert len(blocks) == 5 and blocks[0][0].startswith("conv1")  # stem, layer1…4
    assert freeze_backbone(m, 0) == [] and not any(p.requires_grad for p in m.parameters())
    assert len(freeze_backbone(m, 5)) == len(list(m.parameters()))
    with pytest.raises(ValueError, match="has 5 blocks"):
        freeze_backbone(m, 6)


def test_frozen_batch_norms_stay_in_eval_mode():
    m = timm.create_model("resnet10t", pretrained=False, num_classes=0, in_chans=1)
    freeze_backbone(m, 1)
    m.train()
    eval_frozen_norms(m)
    assert not m.bn1.training and not m.layer3[0].bn1.training and m.layer4[0].bn1.training


# --- soft-target losses ----------------------------------------------------------------------


def test_soft_one_hot_targets_give_the_hard_losses():
    g = torch.Generator().manual_seed(0)
    logits, slogits = torch.randn(6, 5, 3, generator=g), torch.randn(6, 5, 5, generator=g)
    labels = torch.randint(-1, 3, (6, 5), generator=g)
    st = torch.randint(-1, 5, (6, 5), generator=g)
    study = torch.where(torch.arange(5) == 0, torch.arange(6)[:, None] // 2, -1)
    q, qs = soft_targets(labels, 3), soft_targets(st, 5)
    assert torch.allclose(severity_loss(logits, q), severity_loss(logits, labels))
    assert torch.allclose(severity_loss(logits, q, (1, 1, 1)), severity_loss(logits, labels, (1, 1, 1)))
    assert torch.allclose(slice_loss(slogits, qs), slice_loss(slogits, st))
    assert torch.allclose(any_severe_spinal_loss(logits, q, study), any_severe_spinal_loss(logits, labels, study))
    out = {"logits": logits, "slice_logits": slogits}
    hard, soft = grader_loss(out, labels, st, study), grader_loss(out, q, qs, study)
    assert all(torch.allclose(hard[k], soft[k]) for k in hard)


def test_mixed_target_is_the_share_weighted_loss_of_both_labels():
    logits = torch.randn(1, 3)
    lam, a, b, w = 0.3, 0, 2, (1.0, 2.0, 4.0)
    nll = -torch.log_softmax(logits, -1)[0]
    want = (lam * w[a] * nll[a] + (1 - lam) * w[b] * nll[b]) / (lam * w[a] + (1 - lam) * w[b])
    q = torch.tensor([[lam, 0.0, 1 - lam]])
    assert torch.allclose(severity_loss(logits, q), want)


def test_severity_auc_matches_a_hand_count():
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7], [0.0, 0.0, 0.0]])
    labels = np.array([0, 1, 1, 2, -1])
    # class 0: pos {0.9}, neg {0.2, 0.6, 0.1} → 1; class 1: pos {0.7, 0.3}, neg {0.1, 0.2} → 1; class 2: pos {0.7} → 1
    assert severity_auc(probs, labels) == pytest.approx(1.0)
    # class 0: pos {0.2} vs neg {0.6, 0.1} → 0.5; class 1: pos {0.3, 0.2} vs neg {0.7} → 0; class 2 absent
    assert severity_auc(probs[[1, 2, 3]], np.array([0, 1, 1])) == pytest.approx(0.25)


# --- CutMix / mixup of a batch ---------------------------------------------------------------


def _arrays(b: int = 6, t: int = 5, s: int = 5, px: int = 16) -> dict[str, np.ndarray]:
    """An augmented batch whose crops are constant per sample (value j + 1), so a pixel names its source."""
    rng = np.random.default_rng(1)
    x = np.broadcast_to((np.arange(b, dtype=np.float32) + 1)[:, None, None, None, None], (b, t, s, px, px)).astype(np.float16)
    return {
        "x": x, "slice_mask": np.ones((b, t, s), bool), "target_mask": np.ones((b, t), bool),
        "labels": rng.integers(0, 3, (b, t)), "slice_target": rng.integers(0, s, (b, t)),
        "level": np.zeros(b, np.int64), "study_id": np.arange(b, dtype=np.int64),
    }


def test_cutmix_labels_follow_the_pasted_area_and_a_seed_reproduces_them():
    a = _arrays()
    out = mix_batch(MixConfig(cutmix_p=1.0), a, np.random.default_rng(7))
    again = mix_batch(MixConfig(cutmix_p=1.0), a, np.random.default_rng(7))
    other = mix_batch(MixConfig(cutmix_p=1.0), a, np.random.default_rng(8))
    assert all(np.array_equal(out[k], again[k]) for k in out)
    assert not np.array_equal(out["x"], other["x"])
    assert out["labels"].shape == (6, 5, 3) and out["slice_target"].shape == (6, 5, 5)
    mixed = 0
    for j in range(6):
        for i in range(5):
            crop = out["x"][j, i].astype(np.float32)
            assert (crop == crop[0]).all()  # one box through every slice of the slot's stack
            own = crop[0] == j + 1
            others = np.unique(crop[0][~own])
            lam = own.mean()
            assert len(others) <= 1
            q_own, s_own = np.eye(3)[a["labels"][j, i]], np.eye(5)[a["slice_target"][j, i]]
            if len(others):
                k = int(others[0]) - 1
                mixed += 1
                want = lam * q_own + (1 - lam) * np.eye(3)[a["labels"][k, i]]
                np.testing.assert_allclose(out["labels"][j, i], want, atol=1e-6)
                np.testing.assert_allclose(out["slice_target"][j, i], lam * s_own + (1 - lam) * np.eye(5)[a["slice_target"][k, i]], atol=1e-6)
            elif lam == 1.0:
                np.testing.assert_allclose(out["labels"][j, i], q_own)
    assert mixed > 10


def test_mixup_soft_labels_sum_to_one_and_match_the_blend():
    a = _arrays()
    out = mix_batch(MixConfig(mixup_p=1.0, alpha=0.4), a, np.random.default_rng(3))
    np.testing.assert_allclose(out["labels"].sum(-1), 1.0, atol=1e-6)
    np.testing.assert_allclose(out["slice_target"].sum(-1), 1.0, atol=1e-6)
    partner = np.random.default_rng(3).permutation(6)
    for j in range(6):
        k = partner[j]
        if k == j:
            continue
        for i in range(5):
            v = float(out["x"][j, i, 0, 0, 0])  # λ(j+1) + (1−λ)(k+1), float16-rounded
            lam = (v - (k + 1)) / (j - k)
            want = lam * np.eye(3)[a["labels"][j, i]] + (1 - lam) * np.eye(3)[a["labels"][k, i]]
            np.testing.assert_allclose(out["labels"][j, i], want, atol=2e-2)


def test_masked_slots_never_mix():
    a = _arrays()
    a["target_mask"] = a["target_mask"].copy()
    a["target_mask"][::2, 1] = False  # even samples: slot 1 absent
    a["target_mask"][1::2, 3] = False  # odd samples: slot 3 absent
    a["x"] = a["x"] * a["target_mask"][:, :, None, None, None]
    a["labels"] = np.where(a["target_mask"], a["labels"], -1)
    a["slice_target"] = np.where(a["target_mask"], a["slice_target"], -1)
    for seed in range(10):
        for mix in (MixConfig(cutmix_p=1.0), MixConfig(mixup_p=1.0)):
            out = mix_batch(mix, a, np.random.default_rng(seed))
            partner = np.random.default_rng(seed).permutation(6)
            for j in range(6):
                for i in range(5):
                    both = a["target_mask"][j, i] and a["target_mask"][partner[j], i]
                    if not a["target_mask"][j, i]:  # a masked slot keeps its zeros and no label
                        assert not out["x"][j, i].any() and not out["labels"][j, i].any() and not out["slice_target"][j, i].any()
                    elif not both:  # a real slot with a masked partner slot stays its own
                        assert (out["x"][j, i] == j + 1).all()
                        np.testing.assert_array_equal(out["labels"][j, i], np.eye(3)[a["labels"][j, i]])
            assert np.array_equal(out["target_mask"], a["target_mask"])


def test_switch_configs_validate_and_leave_the_sample_key():
    cfg = dataclasses.replace(CFG, mix=MixConfig(cutmix_p=0.5, mixup_p=0.5))
    stage = GradeStage()
    assert stage.sample_key(_job({"prep": "", "run": ""}, cfg), "train") == stage.sample_key(_job({"prep": "", "run": ""}), "train")
    with pytest.raises(ValueError, match="sum ≤ 1"):
        MixConfig(cutmix_p=0.8, mixup_p=0.5)
    with pytest.raises(ConfigError, match="drop freeze"):
        from_dict(GradeConfig, {"two_step": {"epochs": 1}, "freeze": {"backbone": True}})
    with pytest.raises(ConfigError, match="needs freeze.backbone"):
        from_dict(GradeConfig, {"freeze": {"unfreeze_last": 2}})
    loaded = from_dict(GradeConfig, {"two_step": {"epochs": 2, "lr": 1e-4}, "mix": {"cutmix_p": 1.0}})
    assert loaded.two_step == TwoStepConfig(epochs=2, lr=1e-4) and loaded.mix.cutmix_p == 1.0


# --- tiny folds ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_local):
    """Four synthetic studies at 64 px, prepared; two folds and a fake stage-1 points table."""
    return prepared_run(tmp_path_factory.mktemp("switches"), studies=4, seed=5)


def _job(p: dict, cfg: GradeConfig = CFG, fold: int = 0) -> FoldJob:
    return FoldJob("grade", cfg.name, fold, 2, cfg, p["prep"], p["run"], {"points": f"{p['run']}/points.parquet"})


def _train(p: dict, cfg: GradeConfig, resume: dict | None = None, states: list | None = None):
    stage, job = GradeStage(), _job(p, cfg)
    train = samples(stage, job, "train")
    on_end = (lambda r: states.append(r.state)) if states is not None else None
    return fit_fold(stage, job, local_batches(stage, job, train), len(train), device=torch.device("cpu"), resume=resume, on_epoch_end=on_end)


def _params(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


def test_two_step_freezes_exactly_the_backbone_in_step_2_and_resumes_mid_step(prepared):
    cfg = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, epochs=2), two_step=TwoStepConfig(epochs=2, lr=3e-3))
    assert fold_epochs(GradeStage(), _job(prepared, cfg)) == 4
    states: list = []
    model, metrics = _train(prepared, cfg, states=states)
    assert [s["phase"] for s in states] == [0, 0, 1, 1] and [s["epoch"] for s in states] == [0, 1, 0, 1]
    assert metrics["phase"] == 1 and np.isfinite(metrics["train_loss"])
    assert states[0]["metrics"]["train_any_severe"] == 0.0 and states[2]["metrics"]["train_any_severe"] > 0  # plain CE, then the metric loss
    after_step1 = {k: v for k, v in states[1]["model"].items()}
    final = model.state_dict()
    # Step 2 moved nothing in the encoder (weights and batch-norm statistics) and trained the rest.
    enc = [k for k in final if k.startswith("encoder.")]
    assert enc and all(torch.equal(final[k], after_step1[k]) for k in enc)
    assert any(not torch.equal(final[k], after_step1[k]) for k in final if k.startswith("head."))
    assert not any(p.requires_grad for p in model.encoder.parameters())  # step 2's freezing is kept
    # Resume inside step 1 and inside step 2: the same weights as the uninterrupted fold.
    for mid in (states[0], states[2]):
        again, _ = _train(prepared, cfg, resume=mid)
        got = again.state_dict()
        assert all(torch.allclose(got[k], final[k], atol=1e-6) for k in final), f"resume from phase {mid['phase']}"


def test_partial_freezing_fold_trains_only_the_last_block(prepared):
    cfg = dataclasses.replace(CFG, freeze=FreezeConfig(backbone=True, unfreeze_last=1))
    fresh = new_model(GradeStage(), _job(prepared, cfg)).state_dict()  # the fold's seeded initial weights
    model, _ = _train(prepared, cfg)
    got = model.state_dict()
    assert {n.split(".")[0] for n in backbone_blocks(model.encoder)[-1]} == {"layer4"}
    moved = {k for k in got if k.startswith("encoder.") and not torch.equal(got[k], fresh[k])}
    assert moved and all(k.startswith("encoder.layer4.") for k in moved)  # weights and BN statistics of the last block only
    assert any(not torch.equal(got[k], fresh[k]) for k in got if k.startswith("proj."))


@pytest.mark.parametrize("mix", [MixConfig(cutmix_p=1.0), MixConfig(mixup_p=1.0, alpha=0.4)])
def test_mixed_folds_train_on_soft_targets(prepared, mix):
    cfg = dataclasses.replace(CFG, mix=mix)
    stage, job = GradeStage(), _job(prepared, cfg)
    train = samples(stage, job, "train")
    rows = {c: train[c].to_numpy()[:4] for c in train.columns}
    batch = collate_samples(cfg, rows, np.random.default_rng(0))
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape[-1] == 3
    assert collate_samples(cfg, rows, None)["labels"].dtype == torch.int64  # validation stays hard
    _, metrics = _train(prepared, cfg)
    assert np.isfinite(metrics["train_loss"]) and metrics["train_severity"] > 0


@pytest.mark.slow
def test_run_fold_two_step_selects_step_1_by_auc_and_writes_oof(prepared):
    cfg = dataclasses.replace(CFG, train=dataclasses.replace(CFG.train, epochs=2), two_step=TwoStepConfig(epochs=1, lr=1e-3))
    states: list = []
    # Fold 1 holds out a study with a moderate label: its AUC is defined (fold 0's val is all normal).
    model, metrics, oof = run_fold(GradeStage(), _job(prepared, cfg, fold=1), device=torch.device("cpu"), on_epoch_end=lambda r: states.append(r.state))
    assert "val_auc" in metrics and 0.0 <= metrics["val_auc"] <= 1.0
    step1 = [s for s in states if s["phase"] == 0]
    aucs = [s["metrics"]["val_auc"] for s in step1]
    assert step1[-1]["best"]["epoch"] == int(np.argmax(aucs)) and step1[-1]["best"]["value"] == max(aucs)
    # Step 2 started from the selected epoch's weights: its frozen encoder holds them still.
    best = step1[-1]["best"]["model"]
    assert all(torch.equal(model.state_dict()[k], best[k]) for k in best if k.startswith("encoder."))
    assert len(oof) and np.allclose(oof[["normal_mild", "moderate", "severe"]].sum(1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_ray_train_fold_with_two_step_and_cutmix_writes_its_oof(prepared, tmp_path):
    from spine_ray.engine.fold import read_oof
    from spine_ray.engine.resources import ResourcesConfig
    from spine_ray.engine.schedule import run_folds
    from spine_ray.engine.stage import fold_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "folds.parquet").write_bytes(open(f"{prepared['run']}/folds.parquet", "rb").read())
    cfg = dataclasses.replace(CFG, name="two_step_cutmix", two_step=TwoStepConfig(epochs=1, lr=1e-3), mix=MixConfig(cutmix_p=1.0))
    job = dataclasses.replace(_job(prepared, cfg), run_dir=str(run), inputs={"points": f"{prepared['run']}/points.parquet"})
    (oof,) = run_folds(GradeStage(), [job], ResourcesConfig(num_workers=1, cpus_per_worker=1))
    assert len(oof) and (oof["member"] == "two_step_cutmix").all()
    pd.testing.assert_frame_equal(read_oof(job), oof)
    # The worker's batch stream ran through both steps: one epoch each, tagged with its step.
    results = sorted((run / "ray").rglob("result.json"))
    rows = [json.loads(line) for p in results for line in p.read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in rows] == [(0, 0), (1, 0)]
    assert (Path(fold_dir(job)) / "model.pt").exists()
