"""The ensemble blend: its math, OOF alignment, blend.json, and the Ray Tune + Optuna search."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from spine_ray.blend import (
    SPINAL,
    Blend,
    apply_blend,
    equal_blend,
    load_blend,
    log_members,
    make_blend,
    member_matrix,
    one_hot_blend,
    save_blend,
    score_blend,
)
from spine_ray.metric import normalise, score_arrays
from spine_ray.schema import PROB_COLUMNS, row_ids
from spine_ray.synth.oof import synthetic_run
from spine_ray.tune_ensemble import SplitData, load_run, optuna_search

MEMBERS = ("a", "b", "c")


def _members(n: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {m: rng.dirichlet(np.ones(3), size=(n, 25)) for m in MEMBERS}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("run"))
    synthetic_run(d, n_studies=300, n_folds=4, seed=1)
    return d


def test_weights_are_normalised_and_validated():
    b = make_blend(MEMBERS, np.array([2.0, 2.0, 0.0]))
    assert b.weights == ((0.5, 0.5, 0.0),) * 3
    assert make_blend(MEMBERS, np.zeros(3)).weights[0] == pytest.approx((1 / 3,) * 3)
    with pytest.raises(ValueError):
        Blend(MEMBERS, ((0.5, 0.5, 0.5),) * 3)
    with pytest.raises(ValueError):
        make_blend(MEMBERS, np.array([1.0, -1.0, 0.0]))


def test_one_hot_at_temperature_one_is_that_member_exactly():
    probs = _members()
    for m in MEMBERS:
        np.testing.assert_allclose(apply_blend(one_hot_blend(MEMBERS, m), probs), normalise(probs[m]), rtol=1e-12, atol=1e-15)


def test_temperature_pool_and_severe_scaling():
    probs = _members()
    a = normalise(probs["a"])
    hot = np.array([1.0, 0.0, 0.0])
    # Temperature 2 on one member: p^(1/2), renormalised, in that group only.
    p = apply_blend(make_blend(MEMBERS, hot, temperatures=(1.0, 2.0, 1.0)), probs)
    sq = np.sqrt(a) / np.sqrt(a).sum(-1, keepdims=True)
    np.testing.assert_allclose(p[:, 5:15], sq[:, 5:15], rtol=1e-12)
    np.testing.assert_allclose(p[:, :5], a[:, :5], rtol=1e-12)
    # Equal weights: the normalised geometric mean.
    geo = np.cbrt(np.prod([normalise(probs[m]) for m in MEMBERS], axis=0))
    np.testing.assert_allclose(apply_blend(equal_blend(MEMBERS), probs), geo / geo.sum(-1, keepdims=True), rtol=1e-10)
    # Severe factor: spinal p(severe) × s, renormalised; other conditions untouched.
    p = apply_blend(make_blend(MEMBERS, hot, severe_scale=1.25), probs)
    want = a.copy()
    want[:, SPINAL, 2] *= 1.25
    want /= want.sum(-1, keepdims=True)
    np.testing.assert_allclose(p, want, rtol=1e-12)
    assert (p[:, SPINAL, 2] > a[:, SPINAL, 2]).all()
    with pytest.raises(KeyError):
        apply_blend(equal_blend(MEMBERS), {"a": probs["a"]})


def test_member_matrix_aligns_by_row_id_and_fills_from_prior():
    studies = [7, 3, 11]
    probs = _members(len(studies))
    prior = np.tile([0.7, 0.2, 0.1], (25, 1))
    frames = []
    for m in MEMBERS:
        df = pd.DataFrame(probs[m].reshape(-1, 3), columns=list(PROB_COLUMNS))
        df.insert(0, "row_id", row_ids(studies))
        df.insert(1, "member", m)
        frames.append(df)
    frames[1] = frames[1].drop(index=[0, 30, 74])  # member b lacks three rows
    frames.append(pd.DataFrame({"row_id": ["99_spinal_canal_stenosis_l1_l2"], "member": ["a"], "normal_mild": [1.0], "moderate": [0.0], "severe": [0.0]}))
    oof = pd.concat(frames).sample(frac=1.0, random_state=0)  # shuffled; a study not asked for
    mm = member_matrix(oof, studies, list(MEMBERS), prior)
    assert mm.probs.shape == (3, 3, 25, 3)
    assert mm.filled == {"a": 0, "b": 3, "c": 0}
    np.testing.assert_array_equal(mm.probs[0], probs["a"])
    b = mm.probs[1].reshape(-1, 3)
    np.testing.assert_array_equal(b[[0, 30, 74]], prior[[0, 5, 24]])
    keep = np.setdiff1d(np.arange(75), [0, 30, 74])
    np.testing.assert_array_equal(b[keep], probs["b"].reshape(-1, 3)[keep])
    with pytest.raises(ValueError, match="twice"):
        member_matrix(pd.concat([oof, oof]), studies, list(MEMBERS), prior)


def test_blend_json_round_trip(tmp_path):
    b = make_blend(MEMBERS, np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]), (0.8, 1.0, 1.3), 1.25)
    save_blend(str(tmp_path / "blend.json"), b, {"scores": {"x": 1.0}})
    assert load_blend(str(tmp_path / "blend.json")) == b
    assert json.loads((tmp_path / "blend.json").read_text())["scores"] == {"x": 1.0}
    assert Blend.from_dict(b.as_dict()) == b


def test_search_never_worse_than_best_member_or_equal_pool(run_dir):
    run = load_run(run_dir)
    data = SplitData(log_members(run.matrix.probs), run.labels)
    members = run.matrix.members
    blend, n = optuna_search(data, members, trials=60, seed=0)
    assert n == 60
    got = score_blend(blend, data.logp, data.labels).score
    best = min(score_arrays(run.labels, p).score for p in run.matrix.probs)
    equal = score_blend(equal_blend(members), data.logp, data.labels).score
    assert got <= best and got <= equal
    assert got < best - 0.01  # the members are built so that blending genuinely helps


@pytest.mark.parametrize("mode,trials", [("batched", 40), ("per-trial", 2)])
def test_tune_ensemble_writes_blend_json(ray_local, run_dir, mode, trials):
    from spine_ray.tune_ensemble import tune_ensemble

    r = tune_ensemble(run_dir, trials=trials, seed=0, mode=mode)
    saved = json.loads(open(f"{run_dir}/blend.json").read())
    assert load_blend(f"{run_dir}/blend.json") == Blend.from_dict(r["blend"])
    scores = saved["scores"]
    for key in ("prior (out-of-fold)", "equal-weight pool", "blend, fitted on all folds (in-sample)",
                "blend, halves (in-sample)", "blend, halves (held-out)"):
        assert np.isfinite(scores[key]["score"])
    best = min(scores[f"member {m}"]["score"] for m in saved["blend"]["members"])
    assert scores["blend, fitted on all folds (in-sample)"]["score"] <= best
    assert scores["blend, halves (held-out)"]["score"] < scores["prior (out-of-fold)"]["score"]
    assert saved["filled_from_prior"]["biased"] > 0
    assert sorted(saved["halves"]["A"] + saved["halves"]["B"]) == [0, 1, 2, 3]
    assert saved["search"]["mode"] == mode and saved["search"]["evaluations"] == 3 * max(trials, 5)  # all 5 start points, always
    assert len(saved["prior"]) == 25


def test_cli_tune_ensemble(ray_local, run_dir):
    from typer.testing import CliRunner

    from spine_ray.cli import app

    r = CliRunner().invoke(app, ["tune-ensemble", run_dir, "--trials", "20", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert "held-out" in r.output and "member sharp" in r.output and "blend.json" in r.output


def test_cli_missing_run_dir_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "spine_ray.cli", "tune-ensemble", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "not a training run directory" in r.stderr
