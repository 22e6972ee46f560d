"""OOF label cleaning: which labels are flagged, precision/recall against known flips, the training
exclusion (train samples only, part of the cache key) and one-line errors for a bad flags table."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from spine_ray.core.schema import (
    LABEL_COLUMNS,
    N_TARGETS,
    SchemaError,
    label_matrix,
    read_labels,
    row_id,
)
from spine_ray.data.label_flags import FLAG_COLUMNS, excluded_targets, read_flags, write_flags
from spine_ray.label_clean import (
    clean_labels,
    ensemble_probs,
    find_latent,
    flag_counts,
    flag_labels,
    noise_recovery,
    noiseless_grades,
)

T0, T1, T2 = LABEL_COLUMNS[0], LABEL_COLUMNS[7], LABEL_COLUMNS[24]


def _oof(rows: list[tuple[int, str, str, tuple[float, float, float]]]) -> pd.DataFrame:
    return pd.DataFrame(
        [{"row_id": row_id(s, t), "study_id": s, "fold": 0, "member": m, "normal_mild": p[0], "moderate": p[1], "severe": p[2]}
         for s, t, m, p in rows]
    )


def test_crafted_oof_flags_exactly_the_disbelieved_labels():
    oof = _oof([
        (1, T0, "a", (0.9, 0.08, 0.02)), (1, T0, "b", (0.7, 0.2, 0.1)),    # label 2: mean p = 0.06 → flagged
        (1, T1, "a", (0.1, 0.8, 0.1)), (1, T1, "b", (0.3, 0.6, 0.1)),      # label 1: p = 0.7 → kept
        (2, T0, "a", (0.05, 0.15, 0.8)),                                   # only member a: label 0, p = 0.05 → flagged
        (2, T1, "a", (0.6, 0.3, 0.1)), (2, T1, "b", (0.6, 0.3, 0.1)),      # label empty → not judged
        (2, T2, "b", (0.85, 0.1, 0.05)),                                   # label 2: p = 0.05 → flagged at 0.1, not at 0.04
    ])
    labels = np.full((2, N_TARGETS), 0, np.int8)
    labels[0, 0], labels[0, 7], labels[1, 0], labels[1, 7], labels[1, 24] = 2, 1, 0, -1, 2
    probs = ensemble_probs(oof, [1, 2])
    assert np.allclose(probs[0, 0], [0.8, 0.14, 0.06]) and np.allclose(probs[1, 0], [0.05, 0.15, 0.8])
    assert np.isnan(probs[0, 3]).all()  # no member predicted it
    flags = flag_labels(probs, labels, [1, 2], threshold=0.1)
    assert list(flags.columns) == list(FLAG_COLUMNS)
    got = {(int(s), t): bool(f) for s, t, f in zip(flags["study_id"], flags["target"], flags["flagged"], strict=True)}
    assert got == {(1, T0): True, (1, T1): False, (2, T0): True, (2, T2): True}
    row = flags[(flags["study_id"] == 1) & (flags["target"] == T0)].iloc[0]
    assert row["label"] == 2 and row["p_label"] == pytest.approx(0.06) and row["p_normal_mild"] == pytest.approx(0.8)
    strict = flag_labels(probs, labels, [1, 2], threshold=0.04)
    assert not strict["flagged"].any()
    counts = flag_counts(flags)
    assert counts.loc["total", "judged"] == 4 and counts.loc["total", "flagged"] == 3
    assert counts.loc["spinal_canal_stenosis", "flagged"] == 2 and counts.loc["right_subarticular_stenosis", "flagged"] == 1
    with pytest.raises(ValueError, match="threshold"):
        flag_labels(probs, labels, [1, 2], threshold=1.5)


def test_precision_and_recall_against_a_crafted_latent_table():
    assert noiseless_grades(np.array([-0.5, 0.0, 0.99, 1.0, 3.0])).tolist() == [0, 1, 1, 2, 2]
    # 6 judged labels; the latent says 3 are flipped (rows 0, 1, 2); 3 flagged (rows 0, 1, 5): 2 hits.
    latent = pd.DataFrame([[7, *([0.5] * N_TARGETS)], [8, *([-1.0] * N_TARGETS)]], columns=["study_id", *LABEL_COLUMNS])
    flags = pd.DataFrame({
        "study_id": [7, 7, 8, 8, 7, 8],
        "target": [T0, T1, T0, T1, T2, T2],
        "label": [0, 2, 1, 0, 1, 0],
        "flagged": [True, True, False, False, False, True],
    })
    r = noise_recovery(flags, latent)
    assert (r.judged, r.flipped, r.flagged, r.hits) == (6, 3, 3, 2)
    assert r.precision == pytest.approx(2 / 3) and r.recall == pytest.approx(2 / 3) and r.base_rate == pytest.approx(0.5)
    with pytest.raises(SchemaError, match="latent.csv.*no latent row"):
        noise_recovery(flags.assign(study_id=[7, 7, 9, 9, 7, 9]), latent)


def test_clean_labels_on_a_synthetic_run_beats_the_base_rate(tmp_path):
    from spine_ray.synth.labels import sample_labels
    from spine_ray.synth.oof import synthetic_run

    run, data = str(tmp_path / "run"), tmp_path / "data"
    synthetic_run(run, n_studies=120, seed=4)
    labels, latent, _ = sample_labels(120, np.random.default_rng(4))  # the run's own draw
    assert (label_matrix(read_labels(f"{run}/train_labels.csv")) == labels).all()
    data.mkdir()
    pd.DataFrame(latent, columns=list(LABEL_COLUMNS)).assign(study_id=range(1000, 1120)).to_csv(data / "latent.csv", index=False)
    r = clean_labels(run, 0.2, synthetic=str(data))
    flags = read_flags(r.flags_url)
    assert r.flags_url == f"{run}/label_flags.parquet" and len(flags) == int((labels >= 0).sum())
    assert (flags["flagged"] == (flags["p_label"] < 0.2)).all()
    assert r.recovery is not None and r.recovery.flagged == int(flags["flagged"].sum()) > 0
    assert r.recovery.precision > 3 * r.recovery.base_rate


def test_bad_or_missing_flags_table_is_one_clear_error(tmp_path):
    missing = str(tmp_path / "nope.parquet")
    with pytest.raises(SchemaError, match="nope.parquet: file not found"):
        read_flags(missing)
    (tmp_path / "junk.parquet").write_text("study_id,target\n")
    with pytest.raises(SchemaError, match="junk.parquet: not a readable Parquet table"):
        read_flags(str(tmp_path / "junk.parquet"))
    pd.DataFrame({"study_id": [1], "target": [T0]}).to_parquet(tmp_path / "cols.parquet")
    with pytest.raises(SchemaError, match=r"cols.parquet: missing columns \['flagged'\]"):
        read_flags(str(tmp_path / "cols.parquet"))
    pd.DataFrame({"study_id": [1], "target": ["spine_l9"], "flagged": [True]}).to_parquet(tmp_path / "tgt.parquet")
    with pytest.raises(SchemaError, match="tgt.parquet: unknown target 'spine_l9'"):
        read_flags(str(tmp_path / "tgt.parquet"))
    # The CLI turns it into one line and exit code 2, without a traceback.
    r = subprocess.run([sys.executable, "-m", "spine_ray.cli", "clean-labels", str(tmp_path / "norun")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "norun/oof.parquet: file not found" in r.stderr and "Traceback" not in r.stderr


def test_real_labels_with_the_prior_as_oof(real_tables):
    from spine_ray.ensemble.prior import fit_prior, predict_prior

    table = read_labels(str(real_tables / "train.csv"))
    labels = label_matrix(table)
    probs = predict_prior(fit_prior(labels), len(labels))
    flags = flag_labels(probs, labels, table["study_id"].tolist(), threshold=0.1)
    assert len(flags) == int((labels >= 0).sum())
    # Without images the prior can only disbelieve the rare grades of a target, never Normal/Mild.
    assert flags["flagged"].any() and (flags.loc[flags["flagged"], "label"] > 0).all()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Two synthetic studies at 64 px, prepared in this process (plan, decode each group, finalise: no Ray)."""
    from spine_ray.data.ingest import decode_group, finalise, make_plan
    from spine_ray.synth.acquisition import AcquisitionConfig
    from spine_ray.synth.generate import generate
    from spine_ray.synth.study import SynthConfig

    root = tmp_path_factory.mktemp("clean")
    data, prep = str(root / "data"), str(root / "prep")
    generate(data, SynthConfig(studies=2, seed=5, acquisition=AcquisitionConfig(image_sizes=(64,), sagittal_slices=(15, 16))), workers=1)
    plan = make_plan(data, "train", 128.0)
    for group in plan["groups"]:
        decode_group(group, data, prep)
    finalise(plan, data, prep, {}, 0.0)
    return root / "prep"


def test_exclusion_masks_training_labels_only_and_changes_the_train_cache_key(prepared, tmp_path):
    from spine_ray.data.volumes import read_volumes
    from spine_ray.engine.sample_cache import cache_key
    from spine_ray.engine.stage import FoldJob
    from spine_ray.models.grader import GraderConfig
    from spine_ray.stages.grade.config import SLOTS, GradeConfig
    from spine_ray.stages.grade.samples import fake_points
    from spine_ray.stages.grade.stage import GradeStage

    prep = str(prepared)
    lab = pd.read_parquet(f"{prep}/labels.parquet")
    fake_points(lab, np.random.default_rng(0)).to_parquet(tmp_path / "points.parquet")
    sev = lab.assign(target=lab["condition"] + "_" + lab["level"]).drop_duplicates(["study_id", "target"])
    sev = sev[(sev["severity"] >= 0) & sev["slice"].notna()]
    pick = sev.sample(6, random_state=0)[["study_id", "target", "severity"]]
    flags = pick.rename(columns={"severity": "label"}).assign(p_label=0.01, p_normal_mild=0.0, p_moderate=0.0, p_severe=0.0, flagged=True)
    kept = sev.drop(pick.index).head(3)[["study_id", "target", "severity"]]
    flags = pd.concat([flags, kept.rename(columns={"severity": "label"}).assign(
        p_label=0.9, p_normal_mild=0.0, p_moderate=0.0, p_severe=0.0, flagged=False)], ignore_index=True)
    write_flags(flags, str(tmp_path / "flags.parquet"))
    assert set(map(tuple, excluded_targets(str(tmp_path / "flags.parquet")).to_numpy())) == set(map(tuple, pick[["study_id", "target"]].to_numpy()))

    cfg = GradeConfig(model=GraderConfig(backbone="test_resnet", dim=16, lstm_hidden=8, level_embedding=True, condition_embedding=True, n_views=3), out_px=16, k=1, max_shift=0, context=1.0)
    inputs = {"points": str(tmp_path / "points.parquet")}
    plain = FoldJob("grade", cfg.name, 0, 2, cfg, prep, str(tmp_path), inputs)
    masked = FoldJob("grade", cfg.name, 0, 2, cfg, prep, str(tmp_path), {**inputs, "exclude_labels": str(tmp_path / "flags.parquet")})
    rows = read_volumes(prep)
    stage = GradeStage()

    def labels_of(samples: pd.DataFrame) -> dict[tuple[int, str], int]:
        out = {}
        for s, lv, raw, m in zip(samples["study_id"], samples["level"], samples["labels"], samples["target_mask"], strict=True):
            lab_, mask = np.frombuffer(raw, np.int8), np.frombuffer(m, bool)
            out |= {(int(s), f"{c}_{lv}"): int(lab_[i]) for i, (c, _, _) in enumerate(SLOTS) if mask[i]}
        return out

    before, after = labels_of(stage.to_samples(plain, "train", rows)), labels_of(stage.to_samples(masked, "train", rows))
    excluded = set(map(tuple, pick[["study_id", "target"]].to_numpy()))
    changed = {k for k in before if after.get(k, -1) != before[k]}
    assert changed and changed == {k for k in excluded if before.get(k, -1) >= 0}
    assert all(after.get(k, -1) == -1 for k in excluded)
    # Validation (and so the OOF scores) keeps every label.
    assert labels_of(stage.to_samples(plain, "val", rows)) == labels_of(stage.to_samples(masked, "val", rows))
    # Train samples store labels: the exclusion table's content is part of their cache key; val's key is unchanged.
    k_plain, k_masked = cache_key(stage, plain, "train")[0], cache_key(stage, masked, "train")[0]
    write_flags(flags.assign(flagged=~flags["flagged"]), str(tmp_path / "flags.parquet"))
    assert len({k_plain, k_masked, cache_key(stage, masked, "train")[0]}) == 3
    assert cache_key(stage, plain, "val")[0] == cache_key(stage, masked, "val")[0]
    # clean-labels finds the synthetic latents through the run's config and the prepared manifest.
    (tmp_path / "config.yaml").write_text(f"prepared: {prep}\n")
    assert find_latent(str(tmp_path)) == str(prepared.parent / "data" / "latent.csv")
    assert find_latent(str(tmp_path / "elsewhere")) is None


def test_pipeline_passes_a_valid_exclusion_to_grade_and_refuses_a_bad_one(tmp_path):
    from spine_ray.core.config import load
    from spine_ray.pipeline import resolved, stage_inputs
    from spine_ray.run_config import PipelineConfig

    (tmp_path / "run" / "localize").mkdir(parents=True)
    pd.DataFrame({"study_id": [1]}).to_parquet(tmp_path / "run" / "localize" / "points.parquet")
    write_flags(pd.DataFrame({"study_id": [1], "target": [T0], "label": [2], "p_label": [0.01], "p_normal_mild": [0.9],
                              "p_moderate": [0.09], "p_severe": [0.01], "flagged": [True]}), str(tmp_path / "flags.parquet"))
    base = [f"run_dir={tmp_path / 'run'}"]
    assert "exclude_labels" not in stage_inputs(resolved(load(PipelineConfig, None, base)), "grade")
    cfg = resolved(load(PipelineConfig, None, [*base, f"exclude_labels={tmp_path / 'flags.parquet'}"]))
    assert stage_inputs(cfg, "grade")["exclude_labels"] == str(tmp_path / "flags.parquet")
    cfg = resolved(load(PipelineConfig, None, [*base, f"exclude_labels={tmp_path / 'gone.parquet'}"]))
    with pytest.raises(SchemaError, match="gone.parquet: file not found"):
        stage_inputs(cfg, "grade")
