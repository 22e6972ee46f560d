"""Stage 2's augmentation on the training device (`augment_on: device`) against the CPU path: the
same draws for the same seed, the same batch keys, shapes and targets, crops equal where nothing
sub-pixel is drawn and within a float16 step elsewhere, and a tiny grader trains on either alike."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from spine_ray.core.config import ConfigError, from_dict
from spine_ray.core.schema import LEVELS
from spine_ray.engine.fold import fit_fold
from spine_ray.engine.stage import FoldJob, collate, epoch_rng, new_model
from spine_ray.engine.stream import EPOCH, ShufflePool
from spine_ray.engine.train_loop import TrainConfig
from spine_ray.models.grader import GraderConfig
from spine_ray.stages.grade.augment import (
    CROP_PARAMS,
    MIX_PARAMS,
    augment_samples,
    batch_tensors,
    collate_samples,
    defer_samples,
    draw_params,
    sample_crops,
)
from spine_ray.stages.grade.augment_torch import crops, device_batch, hashed_normal
from spine_ray.stages.grade.config import GradeConfig, MixConfig
from spine_ray.stages.grade.stage import GradeStage

TINY = GraderConfig(backbone="test_resnet", dim=16, lstm_hidden=8, dropout=0.0, level_embedding=True, condition_embedding=True, n_views=3)
CFG = GradeConfig(model=TINY, train=TrainConfig(epochs=1, batch_size=4, lr=3e-3), out_px=32, multiview_spinal=True)
MIXED = dataclasses.replace(CFG, mix=MixConfig(cutmix_p=0.4, mixup_p=0.4, alpha=0.5))
ERRORS = {"sag_t2": np.array([-2.0, 0.0, 0.0, 1.0, 3.0]), "sag_t1": np.array([0.0, 1.0, -1.0]), "axial": np.array([0.0, 2.0, -1.0])}
# One float16 step in [0.5, 1): the CPU path rounds its crops to float16, so a position or an
# intensity that differs in float32's last bits (grid_sample's float32 coordinates, float32 vs
# float64 intensity) can round one step apart; two steps leave room for the noise shipped in float16.
F16_STEP = 2.0**-11


def _rows(cfg: GradeConfig, n: int, seed: int) -> dict[str, np.ndarray]:
    """n sample rows of random stored patches: some slots missing, some slices outside, labels and slice offsets mixed."""
    rng = np.random.default_rng(seed)
    t, kk, p = len(cfg.slots), cfg.k + cfg.max_shift, cfg.patch_px
    shape = (t, 2 * kk + 1, p, p)
    inside = []
    for _ in range(n):
        a = np.ones(shape[:2], bool)
        a[:, : rng.integers(0, 3)] = False
        inside.append(a.tobytes())
    return {
        "study_id": np.array([100 + i // 2 for i in range(n)]), "level": np.array([LEVELS[i % 5] for i in range(n)], object),
        "x": np.array([rng.random(shape).astype(np.float16).tobytes() for _ in range(n)], object),
        "shape": np.array([list(shape)] * n, object), "inside": np.array(inside, object),
        "target_mask": np.array([(rng.random(t) < 0.85).tobytes() for _ in range(n)], object),
        "labels": np.array([np.where(rng.random(t) < 0.2, -1, rng.integers(0, 3, t)).astype(np.int8).tobytes() for _ in range(n)], object),
        "gt_offset": np.array([np.where(rng.random(t) < 0.3, 127, rng.integers(-4, 5, t)).astype(np.int8).tobytes() for _ in range(n)], object),
    }


def _device_path(cfg: GradeConfig, rows: dict[str, np.ndarray], seed: int, device: str = "cpu") -> dict[str, torch.Tensor]:
    """What the trainer sees with `augment_on: device`: defer → tensors → moved → `device_batch`."""
    batch = batch_tensors(cfg, defer_samples(cfg, rows, np.random.default_rng(seed), ERRORS))
    return {k: v.cpu() for k, v in device_batch(cfg, {k: v.to(device) for k, v in batch.items()}).items()}


def test_both_paths_take_the_same_draws_from_the_generator():
    rows = _rows(MIXED, 8, 0)
    a, b, c = np.random.default_rng(4), np.random.default_rng(4), np.random.default_rng(4)
    p = draw_params(MIXED, rows, a, ERRORS)
    cpu = augment_samples(MIXED, rows, b, ERRORS)
    dev = defer_samples(MIXED, rows, c, ERRORS)
    # The generators end in the same state: the CPU path draws nothing beyond `draw_params`, in the same order.
    assert a.random() == b.random() == c.random()
    for n in CROP_PARAMS:
        assert np.array_equal(dev[f"aug_{n}"], p[n] if n != "noise" else p[n].astype(np.float16)), n
        assert np.array_equal(dev[f"mix_{n}"], dev[f"aug_{n}"][p["partner"]]), n
    assert all(np.array_equal(dev[n], p[n]) for n in MIX_PARAMS)
    for k in ("slice_mask", "target_mask", "labels", "slice_target", "level", "study_id"):
        assert np.array_equal(cpu[k], dev[k]) and cpu[k].dtype == dev[k].dtype, k
    # The draws exercise every operation, and another seed draws otherwise.
    assert p["flip"].any() and not p["flip"].all() and (p["shift"] != 0).any() and (p["angle"] != 0).any()
    assert (p["mix_op"] == 1).any() and (p["mix_op"] == 2).any()
    other = draw_params(MIXED, rows, np.random.default_rng(5), ERRORS)
    assert not np.array_equal(other["angle"], p["angle"]) and not np.array_equal(other["noise"], p["noise"])


def test_without_a_generator_the_device_path_is_the_plain_collate():
    rows = _rows(CFG, 3, 1)
    plain = defer_samples(dataclasses.replace(CFG, augment_on="device"), rows, None)
    assert "aug_patch" not in plain and all(np.array_equal(v, augment_samples(CFG, rows, None)[k]) for k, v in plain.items())


@pytest.mark.parametrize("cfg", [CFG, MIXED, dataclasses.replace(CFG, axial_mm=(45.0, 30.0), out_px=24, k=1, rotate_deg=30.0)], ids=["plain", "mix", "oblong"])
def test_torch_apply_is_the_numpy_apply_within_a_float16_step(cfg):
    rows = _rows(cfg, 6, 2)
    p = draw_params(cfg, rows, np.random.default_rng(3), ERRORS)
    want = torch.from_numpy(sample_crops(cfg, rows, p).astype(np.float32))
    patch = np.stack([np.frombuffer(v, np.float16).reshape(tuple(s)) for v, s in zip(rows["x"], rows["shape"], strict=True)])
    got = crops(cfg, {"aug_patch": torch.from_numpy(patch), **{f"aug_{n}": torch.from_numpy(p[n]) for n in CROP_PARAMS}})
    assert got.shape == want.shape and got.dtype == torch.float32
    err = (got - want).abs()
    assert float(err.max()) <= F16_STEP and float(err.mean()) < 2e-5
    assert float((err > 0).float().mean()) < 0.05  # most pixels round alike
    # Slots without a target stay black in both.
    off = ~torch.from_numpy(p["active"])
    flipped = torch.from_numpy(p["flip"])
    assert (got[~flipped][off[~flipped]] == 0).all()


def test_device_batch_matches_collate_keys_shapes_targets_and_pixels():
    rows = _rows(MIXED, 8, 3)
    cpu = collate_samples(MIXED, rows, np.random.default_rng(9), ERRORS)
    dev = _device_path(MIXED, rows, 9)
    assert list(cpu) == list(dev)
    for k in cpu:
        assert cpu[k].shape == dev[k].shape and cpu[k].dtype == dev[k].dtype, k
        if k != "x":
            assert torch.equal(cpu[k], dev[k]), k
    err = (cpu["x"] - dev["x"]).abs()
    assert float(err.max()) <= 2 * F16_STEP and float(err.mean()) < 2e-5


def test_deferred_rows_survive_the_shuffle_pool():
    """Every array `defer_samples` ships is per sample: the stream's shuffle pool regroups rows and the crops still follow their draws."""
    stage, rows = GradeStage(), _rows(MIXED, 10, 8)
    out = {}
    for on in ("cpu", "device"):
        job = FoldJob("grade", "m", 0, 2, dataclasses.replace(MIXED, augment_on=on), "", "", {})
        block = stage.augment(job, rows, np.random.default_rng(0))
        block[EPOCH] = np.zeros(10, np.int64)
        pool = ShufflePool()
        pool.add(block)
        arrays = pool.take(4, np.random.default_rng(1))
        out[on] = stage.on_device(job, stage.to_batch(job, {k: v for k, v in arrays.items() if k != EPOCH}))
    assert list(out["cpu"]) == list(out["device"]) and all(torch.equal(out["cpu"][k], out["device"][k]) for k in out["cpu"] if k != "x")
    assert float((out["cpu"]["x"] - out["device"]["x"]).abs().max()) <= 2 * F16_STEP


def test_device_batch_is_exact_where_nothing_sub_pixel_is_drawn():
    """Integer slice shifts, flips, CutMix and mixup alone, on a patch whose grid maps crop pixels onto patch pixels: bit for bit."""
    cfg = dataclasses.replace(MIXED, out_px=16, context=2.0, rotate_deg=0.0, xy_jitter_mm=0.0, intensity_aug=False)
    rows = _rows(cfg, 8, 4)
    p = draw_params(cfg, rows, np.random.default_rng(2), ERRORS)
    assert p["flip"].any() and (p["shift"] != 0).any() and (p["mix_op"] == 1).any() and (p["mix_op"] == 2).any()
    cpu = collate_samples(cfg, rows, np.random.default_rng(2), ERRORS)
    dev = _device_path(cfg, rows, 2)
    assert all(torch.equal(cpu[k], dev[k]) for k in cpu)
    # …and a wrong draw shows: another seed's crops differ.
    assert not torch.equal(_device_path(cfg, rows, 3)["x"], cpu["x"])


def test_device_noise_is_seeded_gaussian_and_ships_seeds_not_fields():
    """`noise_on: device`: each slot's noise comes from a seed, N(0, σ²) and independent; the pipeline ships no noise field."""
    seeds = torch.arange(24).reshape(4, 6) * 7919 + 3
    z = hashed_normal(seeds, (5, 48, 48), 0.03)
    assert z.shape == (4, 6, 5, 48, 48) and z.dtype == torch.float32
    assert abs(float(z.mean())) < 1e-3 and float(z.std()) == pytest.approx(0.03, rel=0.02)
    assert float((z.abs() > 0.06).float().mean()) == pytest.approx(0.0455, abs=0.004)  # the normal's 2σ tail
    assert float(((z / 0.03) ** 4).mean()) == pytest.approx(3.0, abs=0.1)  # its kurtosis
    flat = z.reshape(24, -1)
    assert float((torch.corrcoef(flat) - torch.eye(24)).abs().max()) < 0.05  # slots independent
    assert abs(float(torch.corrcoef(torch.stack([z[..., :-1].flatten(), z[..., 1:].flatten()]))[0, 1])) < 0.01  # neighbours too
    assert torch.equal(hashed_normal(seeds, (5, 48, 48), 0.03), z) and not torch.equal(hashed_normal(seeds + 1, (5, 48, 48), 0.03), z)
    cfg = dataclasses.replace(MIXED, augment_on="device", noise_on="device")
    rows = _rows(cfg, 6, 7)
    dev = defer_samples(cfg, rows, np.random.default_rng(0), ERRORS)
    assert "aug_noise" not in dev and dev["aug_noise_seed"].shape == (6, len(cfg.slots)) and "mix_noise_seed" in dev
    cpu = collate_samples(cfg, rows, np.random.default_rng(0), ERRORS)
    got = device_batch(cfg, batch_tensors(cfg, dev))
    assert all(got[k].shape == cpu[k].shape and got[k].dtype == cpu[k].dtype for k in cpu)
    assert 0 <= float(got["x"].min()) and float(got["x"].max()) <= 1


def test_augment_on_is_validated():
    with pytest.raises(ValueError):
        GradeConfig(augment_on="gpu")
    with pytest.raises(ValueError):
        GradeConfig(noise_on="device")  # only with augment_on: device
    with pytest.raises(ConfigError):
        from_dict(GradeConfig, {"augment_on": "gpu"})
    assert from_dict(GradeConfig, {"augment_on": "device"}).augment_on == "device"


def test_a_tiny_grader_trains_alike_with_augment_on_device():
    """fit_fold through the stage's `on_device` hook: the same losses as the CPU path to float16 rounding."""
    stage, rows = GradeStage(), _rows(CFG, 8, 5)

    def train(cfg: GradeConfig) -> tuple[dict[str, float], torch.nn.Module]:
        job = FoldJob("grade", cfg.name, 0, 2, cfg, "", "", {})
        seed = cfg.train.seed

        def batches(epoch: int):
            rng = epoch_rng(seed, 0, epoch)
            return [collate(stage, job, {k: v[i : i + 4] for k, v in rows.items()}, rng) for i in (0, 4)]

        model, metrics = fit_fold(stage, job, batches, 8, device=torch.device("cpu"))
        return metrics, model

    on_cpu, _ = train(MIXED)
    cfg = dataclasses.replace(MIXED, augment_on="device")
    on_dev, model = train(cfg)
    assert np.isfinite(on_dev["train_loss"]) and on_dev["train_loss"] > 0
    # Two steps' mean loss; the inputs differ by a float16 step in about 1 % of pixels.
    assert on_dev["train_loss"] == pytest.approx(on_cpu["train_loss"], rel=1e-3)
    fresh = new_model(stage, FoldJob("grade", cfg.name, 0, 2, cfg, "", "", {})).state_dict()
    assert any(not torch.equal(v, fresh[k]) for k, v in model.state_dict().items() if k.startswith("encoder."))


@pytest.mark.gpu
def test_device_batch_on_cuda_matches_the_cpu_path():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    rows = _rows(MIXED, 8, 6)
    cpu = collate_samples(MIXED, rows, np.random.default_rng(1), ERRORS)
    dev = _device_path(MIXED, rows, 1, "cuda")
    assert all(torch.equal(cpu[k], dev[k]) for k in cpu if k != "x")
    err = (cpu["x"] - dev["x"]).abs()
    assert float(err.max()) <= 2 * F16_STEP and float(err.mean()) < 2e-5
    # Device noise: the same numbers on CUDA as on the CPU (float32 log/cos may differ in the last bits).
    seeds = torch.arange(12).reshape(2, 6)
    assert torch.allclose(hashed_normal(seeds.cuda(), (5, 32, 32)).cpu(), hashed_normal(seeds, (5, 32, 32)), atol=1e-6)
