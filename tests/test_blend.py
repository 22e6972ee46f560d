"""The ensemble blend: its math, OOF alignment, blend.json, the exact fit, and the Ray Tune hyper-parameter search."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from spine_ray.core.schema import PROB_COLUMNS, row_ids
from spine_ray.ensemble.blend import (
    SPINAL,
    Blend,
    FitConfig,
    _objective,
    _problem,
    apply_blend,
    equal_blend,
    fit_blend,
    fit_group,
    load_blend,
    log_members,
    make_blend,
    member_matrix,
    one_hot_blend,
    save_blend,
    score_blend,
)
from spine_ray.ensemble.metric import EPS, TARGET_GROUP, normalise, score_arrays
from spine_ray.ensemble.tune_ensemble import (
    SearchConfig,
    choose,
    cross_data,
    eligibility,
    load_run,
    score_candidate,
)
from spine_ray.synth.oof import STRESS_MEMBERS, synthetic_run

MEMBERS = ("a", "b", "c")


def _members(n: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {m: rng.dirichlet(np.ones(3), size=(n, 25)) for m in MEMBERS}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("run"))
    synthetic_run(d, n_studies=300, n_folds=4, seed=1)
    return d


@pytest.fixture(scope="module")
def stress_dir(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("stress"))
    synthetic_run(d, n_studies=200, n_folds=4, seed=2, members=STRESS_MEMBERS)
    return d


# A small grid keeps the Tune tests fast; the fit itself is the same as with the full grid.
SMALL = {"shrinks": (0.0, 0.1), "caps": (0, 1), "per_level": (False, True), "clips": (EPS,)}


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
    assert mm.coverage()[:, 1] == pytest.approx([1 - 1 / 15, 1 - 1 / 30, 1 - 1 / 30])  # b lacks rows 0 (spinal), 30 and 74
    # A per-study fill (pipeline.train_grade passes the out-of-fold prior) is taken row by row.
    per_study = np.random.default_rng(1).dirichlet(np.ones(3), size=(3, 25))
    b = member_matrix(oof, studies, list(MEMBERS), per_study).probs[1].reshape(-1, 3)
    np.testing.assert_array_equal(b[[0, 30, 74]], per_study.reshape(-1, 3)[[0, 30, 74]])
    with pytest.raises(ValueError, match="twice"):
        member_matrix(pd.concat([oof, oof]), studies, list(MEMBERS), prior)


def test_blend_json_round_trip_and_old_files(tmp_path):
    levels = np.linspace(0.5, 2.0, 25)
    b = make_blend(MEMBERS, np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]]), (0.8, 1.0, 1.3), 1.25, levels, (EPS, 1e-3, 1e-2))
    save_blend(str(tmp_path / "blend.json"), b, {"scores": {"x": 1.0}})
    assert load_blend(str(tmp_path / "blend.json")) == b
    assert json.loads((tmp_path / "blend.json").read_text())["scores"] == {"x": 1.0}
    assert Blend.from_dict(b.as_dict()) == b
    # A blend.json written before level temperatures and clips existed reads as they were.
    old = {k: v for k, v in b.as_dict().items() if k not in ("level_temperatures", "clip")}
    assert Blend.from_dict(old) == make_blend(MEMBERS, np.array(b.weights), b.temperatures, b.severe_scale)


def test_level_temperatures_and_clips_change_only_their_targets():
    probs = _members()
    hot = np.array([1.0, 0.0, 0.0])
    a = normalise(probs["a"])
    levels = np.ones(25)
    levels[7] = 2.0
    p = apply_blend(make_blend(MEMBERS, hot, level_temperatures=levels), probs)
    sq = np.sqrt(a[:, 7]) / np.sqrt(a[:, 7]).sum(-1, keepdims=True)
    np.testing.assert_allclose(p[:, 7], sq, rtol=1e-12)
    np.testing.assert_allclose(np.delete(p, 7, axis=1), np.delete(a, 7, axis=1), rtol=1e-12)
    clipped = apply_blend(make_blend(MEMBERS, hot, clips=(EPS, EPS, 0.2)), probs)
    assert clipped[:, TARGET_GROUP == 2].min() >= 0.2 / 1.2 - 1e-12 and a[:, TARGET_GROUP == 2].min() < 0.1
    np.testing.assert_allclose(clipped[:, TARGET_GROUP != 2], a[:, TARGET_GROUP != 2], rtol=1e-12)


@pytest.mark.parametrize("g,cfg", [(0, FitConfig()), (1, FitConfig(shrink=0.1, per_level=True, clip=1e-3)), (2, FitConfig(per_level=True))])
def test_objective_is_the_metric_and_its_gradient_is_exact(run_dir, g, cfg):
    run = load_run(run_dir)
    logp = log_members(run.matrix.probs)
    pr = _problem(logp, run.labels, g, np.arange(4), cfg.clip)
    rng = np.random.default_rng(g)
    t = int((TARGET_GROUP == g).sum())
    theta = np.concatenate([rng.uniform(0.1, 0.6, 4), rng.uniform(0.7, 1.4, t) if cfg.per_level else [], [0.2] if g == 0 else []])
    f, grad = _objective(theta, pr, cfg)
    h = 1e-6
    numeric = [(_objective(theta + e, pr, cfg)[0] - _objective(theta - e, pr, cfg)[0]) / (2 * h) for e in np.eye(len(theta)) * h]
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)
    if cfg == FitConfig():  # unpenalised, unclipped: exactly the metric's spinal + any_severe_spinal part
        blend = make_blend(run.matrix.members, theta[:4], (1 / theta[:4].sum(),) * 3, float(np.exp(theta[-1])))
        s = score_blend(blend, logp, run.labels)
        assert f == pytest.approx(s.spinal + s.any_severe_spinal, rel=1e-9)


def test_exact_fit_beats_every_point_a_sampler_would_try(run_dir):
    run = load_run(run_dir)
    logp, y, members = log_members(run.matrix.probs), run.labels, run.matrix.members
    got = score_blend(fit_blend(logp, y, members), logp, y).score
    best = min(score_arrays(y, p).score for p in run.matrix.probs)
    equal = score_blend(equal_blend(members), logp, y).score
    rng = np.random.default_rng(0)
    sampled = min(
        score_blend(make_blend(members, rng.random((3, 4)), rng.uniform(0.5, 2.0, 3), rng.uniform(0.5, 3.0)), logp, y).score
        for _ in range(30)
    )
    assert got <= min(best, equal, sampled)
    assert got < best - 0.01  # the members are built so that blending genuinely helps


def test_members_without_rows_do_not_enter_and_cap_and_shrink_act(stress_dir):
    run = load_run(stress_dir)
    members = run.matrix.members
    ok = eligibility(run.matrix, 0.5)
    for g, prefix in enumerate(("spinal", "foraminal", "subarticular")):
        assert [m for m, e in zip(members, ok[g], strict=True) if e] == [m for m in members if m.startswith(prefix)]
    logp = log_members(run.matrix.probs)
    blend = fit_blend(logp, run.labels, members, eligible=ok)
    w = np.asarray(blend.weights)
    assert (w[~ok] == 0).all() and (w[ok] > 0).any()
    one = fit_group(logp, run.labels, 1, ok[1], FitConfig(cap=1))
    assert (one.weights > 0).sum() == 1
    loose, tight = (fit_group(logp, run.labels, 1, ok[1], FitConfig(shrink=s)) for s in (0.0, 100.0))
    entered = ok[1]
    assert np.ptp(tight.weights[entered]) < 0.02 < np.ptp(loose.weights[entered])


def test_capped_candidates_reuse_their_uncapped_twin_and_score_the_same(stress_dir):
    run = load_run(stress_dir)
    ok = eligibility(run.matrix, 0.5)
    data = cross_data(log_members(run.matrix.probs), run.labels, run.folds, ok, run.matrix.members)
    grid = [FitConfig(shrink=s, cap=c) for c in (0, 1) for s in (0.0, 0.1)]
    alone = [score_candidate(data, c) for c in grid]
    memo: dict = {}
    shared = [score_candidate(data, c, memo) for c in grid]
    for a, b in zip(alone, shared, strict=True):
        assert np.allclose(a["held_out"], b["held_out"], equal_nan=True) and a["half_blends"] == b["half_blends"]
    assert [b["evaluations"] for b in shared[:2]] == [a["evaluations"] for a in alone[:2]]
    assert all(b["evaluations"] < a["evaluations"] for a, b in zip(alone[2:], shared[2:], strict=True))


def test_choose_falls_back_to_the_best_member_when_no_fit_beats_it():
    members = ("a", "b")
    eligible = np.ones((3, 2), dtype=bool)
    parts = np.array([[0.50, 0.30, 0.40], [0.45, 0.35, 0.41]])  # member × group
    rows = [{"config": {"shrink": 0.0}, "held_out": [0.46, 0.29, 0.42]}, {"config": {"shrink": 1.0}, "held_out": [0.44, np.nan, 0.43]}]
    c = choose(rows, parts, eligible, members)
    assert c[0]["kind"] == "fit" and c[0]["candidate"] == 1
    assert c[1]["kind"] == "fit" and c[1]["candidate"] == 0
    assert c[2] == {"kind": "member", "member": "a", "held_out": 0.40, "best_fit_held_out": 0.42}


@pytest.mark.parametrize("grid", [SMALL])
def test_search_config_grid(grid):
    cands = SearchConfig(**grid).candidates(4)
    assert len(cands) == 2 * 2 * 2
    assert len(SearchConfig(**grid, trials=3, seed=1).candidates(4)) == 3
    assert SearchConfig(**grid, trials=3).candidates(4)[0] == FitConfig()
    assert all(c.cap < 2 for c in SearchConfig(caps=(0, 1, 5)).candidates(2))
    with pytest.raises(ValueError):
        SearchConfig(mode="tpe")


def test_tune_ensemble_writes_blend_json_both_modes_agree(ray_local, stress_dir):
    from spine_ray.ensemble.tune_ensemble import tune_ensemble

    old_keys = {"blend", "scores", "best_member", "halves", "half_blends", "filled_from_prior", "studies", "prior", "search"}
    written = {}
    for mode in ("batched", "per-trial"):
        r = tune_ensemble(stress_dir, search=SearchConfig(**SMALL, mode=mode))
        saved = json.loads(open(f"{stress_dir}/blend.json").read())
        assert old_keys <= set(saved) and {"decision", "choice", "candidates", "eligible"} <= set(saved)
        assert load_blend(f"{stress_dir}/blend.json") == Blend.from_dict(r["blend"])
        written[mode] = saved["blend"]
        scores = saved["scores"]
        best = min(scores[f"member {m}"]["score"] for m in saved["blend"]["members"])
        held = scores["blend, halves (held-out)"]["score"]
        assert held <= best  # per group, a fit is taken only where it beats the best member held out
        assert scores["blend, fitted on all folds (in-sample)"]["score"] < scores["equal-weight pool"]["score"]
        assert len(saved["candidates"]) == 8 and saved["search"]["mode"] == mode and saved["search"]["trials_per_search"] == 8
        assert saved["eligible"]["spinal"] == ["spinal_a", "spinal_b"]
        for g in ("spinal", "foraminal", "subarticular"):
            assert all(w == 0 or m.startswith(g) for m, w in saved["blend"]["weights"][g].items())
        assert saved["filled_from_prior"]["spinal_a"] == 200 * 20
        assert sorted(saved["halves"]["A"] + saved["halves"]["B"]) == [0, 1, 2, 3]
        assert len(saved["prior"]) == 25
    assert written["batched"] == written["per-trial"]  # the fit is deterministic; the modes only batch differently


def test_cli_tune_ensemble(ray_local, run_dir):
    from typer.testing import CliRunner

    from spine_ray.cli import app

    r = CliRunner().invoke(app, ["tune-ensemble", run_dir, "--trials", "6", "--seed", "1"])
    assert r.exit_code == 0, r.output
    assert "held-out" in r.output and "member sharp" in r.output and "blend.json" in r.output
    assert len(json.loads(open(f"{run_dir}/blend.json").read())["candidates"]) == 6


def test_cli_missing_run_dir_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "spine_ray.cli", "tune-ensemble", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "not a training run directory" in r.stderr
