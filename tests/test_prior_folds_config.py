"""The prior model, the study-level folds and the typed configs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest

from spine_ray.core.config import ConfigError, from_dict, load, save, to_dict
from spine_ray.core.schema import labels_from_matrix, read_labels
from spine_ray.engine.folds import assign_folds
from spine_ray.ensemble.baseline import run_baseline
from spine_ray.ensemble.metric import score_arrays
from spine_ray.ensemble.prior import fit_prior, predict_prior


def test_prior_is_weight_times_frequency():
    y = np.zeros((10, 25), dtype=np.int8)
    y[:6, 0], y[6:9, 0], y[9:, 0] = 0, 1, 2
    p = fit_prior(y, pseudo_count=0)
    assert p[0] == pytest.approx(np.array([6 * 1, 3 * 2, 1 * 4]) / 16)


def test_prior_beats_frequency_prediction_on_its_training_labels():
    rng = np.random.default_rng(0)
    y = rng.choice(3, size=(400, 25), p=[0.75, 0.18, 0.07]).astype(np.int8)
    freq = np.stack([(y == k).mean(axis=0) for k in range(3)], axis=1)
    prior = fit_prior(y, pseudo_count=0)
    assert score_arrays(y, predict_prior(prior, 400)).score < score_arrays(y, predict_prior(freq, 400)).score


def test_prior_baseline_on_real_labels_is_near_0_79(real_tables):
    result = run_baseline(read_labels(str(real_tables / "train.csv")), n_folds=5, seed=0)
    assert 0.75 < result.score.score < 0.83


def test_folds_are_study_level_balanced_and_seeded():
    rng = np.random.default_rng(0)
    labels = labels_from_matrix(range(1000, 1103), rng.integers(0, 3, size=(103, 25)).astype(np.int8))
    a = assign_folds(labels, 5, seed=1)
    assert a["study_id"].is_unique and set(a["fold"]) == set(range(5))
    sizes = a["fold"].value_counts()
    assert sizes.max() - sizes.min() <= 1
    assert a.equals(assign_folds(labels, 5, seed=1))
    assert not a["fold"].equals(assign_folds(labels, 5, seed=2)["fold"])


@dataclass(frozen=True)
class Inner:
    lr: float = 1e-3
    sizes: tuple[int, ...] = (1, 2)


@dataclass(frozen=True)
class Outer:
    name: str = "x"
    folds: int = 5
    inner: Inner = field(default_factory=Inner)
    backbone: str | None = None


def test_config_yaml_overrides_and_round_trip(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: demo\ninner:\n  lr: 0.01\n")
    cfg = load(Outer, path, ["inner.sizes=[3, 4]", "folds=3"])
    assert cfg == Outer(name="demo", folds=3, inner=Inner(lr=0.01, sizes=(3, 4)))
    save(cfg, str(tmp_path / "saved.yaml"))
    assert load(Outer, tmp_path / "saved.yaml") == cfg
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("inner.lr=fast", "inner.lr: expected a number"),
        ("folds=2.5", "folds: expected an integer"),
        ("inner.momentum=0.9", "unknown keys \\['momentum'\\]"),
        ("folds", "expected key=value"),
    ],
)
def test_bad_overrides_are_clear(override, message):
    with pytest.raises(ConfigError, match=message):
        load(Outer, None, [override])


@dataclass(frozen=True)
class WithList:
    members: tuple[Inner, ...] = (Inner(), Inner(lr=0.5))


def test_overrides_index_list_items():
    cfg = load(WithList, None, ["members.1.sizes=[9]"])
    assert cfg.members == (Inner(), Inner(lr=0.5, sizes=(9,)))
    with pytest.raises(ConfigError, match="not an item of a list of 2"):
        load(WithList, None, ["members.5.lr=1"])
