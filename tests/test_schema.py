"""The data contract: the real tables pass and round-trip; bad input gets a clear error."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from spine_ray.core.schema import (
    CONDITION_TITLES,
    LABEL_COLUMNS,
    LEVEL_TITLES,
    SchemaError,
    label_matrix,
    labels_from_matrix,
    labels_long,
    read_coordinates,
    read_labels,
    read_series,
    read_submission,
    submission_frame,
    validate_coordinates,
    write_submission,
)


def test_real_train_csv_reads_and_round_trips(real_tables, tmp_path):
    labels = read_labels(str(real_tables / "train.csv"))
    assert len(labels) == 1975
    assert list(labels.columns[1:]) == list(LABEL_COLUMNS)
    m = label_matrix(labels)
    assert (m < 0).sum() == 572
    back = labels_from_matrix(labels["study_id"], m)
    path = tmp_path / "train.csv"
    back.to_csv(path, index=False)
    again = read_labels(str(path))
    assert (label_matrix(again) == m).all()
    long = labels_long(labels)
    assert len(long) == 1975 * 25 and (long["severity"] == -1).sum() == 572


def test_real_series_descriptions_and_sample_submission(real_tables):
    series = read_series(str(real_tables / "train_series_descriptions.csv"))
    assert len(series) == 6294
    test = read_series(str(real_tables / "test_series_descriptions.csv"))
    sub = read_submission(str(real_tables / "sample_submission.csv"), study_ids=test["study_id"].unique())
    assert len(sub) == 25


def test_write_submission_emits_every_row_normalised(tmp_path, real_tables):
    rng = np.random.default_rng(0)
    sub = submission_frame([1, 2], rng.random((2, 25, 3)) + 0.1)
    written = write_submission(sub, str(tmp_path / "s.csv"), study_ids=[1, 2])
    back = read_submission(str(tmp_path / "s.csv"), study_ids=[1, 2])
    assert len(back) == 50
    assert np.allclose(back[["normal_mild", "moderate", "severe"]].sum(axis=1), 1)
    assert np.allclose(written[["normal_mild", "moderate", "severe"]], back[["normal_mild", "moderate", "severe"]])
    # Same row_id scheme as the competition's sample submission.
    sample = pd.read_csv(real_tables / "sample_submission.csv")
    assert set(sample["row_id"]) == set(submission_frame([44036939], np.ones((1, 25, 3)))["row_id"])


def _coords() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "study_id": [1, 1],
            "series_id": [10, 11],
            "instance_number": [3, 7],
            "condition": [CONDITION_TITLES[0], CONDITION_TITLES[3]],
            "level": [LEVEL_TITLES[0], LEVEL_TITLES[4]],
            "x": [10.5, 20.0],
            "y": [30.0, 40.25],
        }
    )


def test_coordinates_map_to_snake_case_targets():
    df = validate_coordinates(_coords())
    assert list(df["target"]) == ["spinal_canal_stenosis_l1_l2", "left_subarticular_stenosis_l5_s1"]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.assign(condition=["spinal_canal_stenosis", d.condition[1]]), "row 2: unknown condition"),
        (lambda d: d.assign(level=["L1/L2", "L5-S1"]), "row 3: unknown level"),
        (lambda d: d.drop(columns=["x"]), "missing columns"),
        (lambda d: d.assign(y=[1.0, float("nan")]), "row 3: y"),
    ],
)
def test_bad_coordinates_name_row_and_problem(tmp_path, mutate, message):
    path = tmp_path / "train_label_coordinates.csv"
    mutate(_coords()).to_csv(path, index=False)
    with pytest.raises(SchemaError, match=message) as e:
        read_coordinates(str(path))
    assert str(path) in str(e.value)


def _labels_csv(tmp_path, mutate=lambda d: d):
    df = labels_from_matrix([5, 6], np.zeros((2, 25), dtype=np.int8))
    path = tmp_path / "train.csv"
    mutate(df).to_csv(path, index=False)
    return str(path)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.drop(columns=[LABEL_COLUMNS[3]]), "missing columns"),
        (lambda d: d.assign(extra=1), "unexpected columns"),
        (lambda d: d.replace({"Normal/Mild": "normal"}), "row 2: unknown severity 'normal'"),
        (lambda d: d.assign(study_id=[5, 5]), "row 3: duplicate study_id=5"),
        (lambda d: d.assign(study_id=["a", 6]), "row 2: study_id 'a' is not an integer"),
    ],
)
def test_bad_labels_name_row_and_problem(tmp_path, mutate, message):
    with pytest.raises(SchemaError, match=message):
        read_labels(_labels_csv(tmp_path, mutate))


def test_missing_file_is_a_schema_error(tmp_path):
    with pytest.raises(SchemaError, match="file not found"):
        read_labels(str(tmp_path / "nope.csv"))


@pytest.mark.parametrize(
    ("value", "message"),
    [(-0.1, "negative"), (float("nan"), "finite"), (float("inf"), "finite"), (0.0, "all be zero")],
)
def test_bad_submission_probabilities(tmp_path, value, message):
    sub = submission_frame([1], np.ones((1, 25, 3)))
    sub.loc[4, ["normal_mild", "moderate", "severe"]] = [value, 0.0 if value == 0.0 else 0.5, 0.0 if value == 0.0 else 0.5]
    path = tmp_path / "s.csv"
    sub.to_csv(path, index=False)
    with pytest.raises(SchemaError, match=f"row 6: probabilities must.*{message}"):
        read_submission(str(path))


def test_submission_missing_rows_and_duplicates(tmp_path):
    sub = submission_frame([1], np.ones((1, 25, 3)))
    path = tmp_path / "s.csv"
    sub.iloc[:-1].to_csv(path, index=False)
    with pytest.raises(SchemaError, match="1 row_ids missing"):
        read_submission(str(path), study_ids=[1])
    pd.concat([sub, sub.iloc[:1]]).to_csv(path, index=False)
    with pytest.raises(SchemaError, match="row 27: duplicate row_id"):
        read_submission(str(path))
    sub.assign(row_id=["x_y"] * 25).to_csv(path, index=False)
    with pytest.raises(SchemaError, match="row 2: bad row_id"):
        read_submission(str(path))


def test_readers_take_fsspec_urls():
    import fsspec

    df = labels_from_matrix([9], np.ones((1, 25), dtype=np.int8))
    with fsspec.open("memory://bucket/train.csv", "w") as f:
        df.to_csv(f, index=False)
    assert (label_matrix(read_labels("memory://bucket/train.csv")) == 1).all()
