"""`prepare` end to end on a small Kaggle-layout tree: volumes, labels, errors, manifest, resume."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pydicom
import pytest
from dicomfiles import truncate, write_non_image, write_study_tree

from spine_ray.core.schema import LABEL_COLUMNS
from spine_ray.data import dicom, geometry, ingest
from spine_ray.data.volumes import (
    VOLUME_SCHEMA,
    IncompleteOutput,
    load_volume,
    read_manifest,
    read_table,
    read_volumes,
)

STUDIES = (101, 102)
VOLUME_COLUMNS = [
    "study_id", "series_id", "series_description", "stack", "n_slices", "rows", "cols", "volume", "dtype",
    "instance_numbers", "positions", "orientation", "pixel_spacing", "slice_spacing", "affine",
    "intensity_p01", "intensity_p99",
]


def _tree(root: str) -> str:
    """Two studies (3 series each), one truncated file, one series of only a non-image, one series missing."""
    data = os.path.join(root, "data")
    write_study_tree(data, "train", STUDIES, rows=24, cols=32, slices=(4, 5, 6))
    images = os.path.join(data, "train_images")
    truncate(os.path.join(images, "101", "1012", sorted(os.listdir(os.path.join(images, "101", "1012")))[0]), 0.4)
    with open(os.path.join(data, "train_series_descriptions.csv"), "a") as f:
        f.write("102,1099,Axial T2\n102,1098,Axial T2\n")  # 1099: nothing on disk; 1098: no image
    os.makedirs(os.path.join(images, "102", "1098"))
    write_non_image(os.path.join(images, "102", "1098", "1.dcm"))
    labels = pd.DataFrame({"study_id": list(STUDIES)})
    for i, c in enumerate(LABEL_COLUMNS):
        labels[c] = ["Normal/Mild", "Moderate", "Severe", None][i % 4] if i % 5 else "Severe"
    labels.to_csv(os.path.join(data, "train.csv"), index=False)
    # One spinal point on Sagittal T2/STIR of 101, one subarticular point on the axial of 102.
    sag = sorted(os.listdir(os.path.join(images, "101", "1012")), key=lambda n: int(n.split(".")[0]))[-1]
    ax = sorted(os.listdir(os.path.join(images, "102", "1023")), key=lambda n: int(n.split(".")[0]))[-1]
    pd.DataFrame(
        [
            (101, 1012, int(sag.split(".")[0]), "Spinal Canal Stenosis", "L3/L4", 10.5, 7.25),
            (102, 1023, int(ax.split(".")[0]), "Left Subarticular Stenosis", "L4/L5", 3.0, 20.0),
        ],
        columns=["study_id", "series_id", "instance_number", "condition", "level", "x", "y"],
    ).to_csv(os.path.join(data, "train_label_coordinates.csv"), index=False)
    return data


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, ray_local):
    root = str(tmp_path_factory.mktemp("ingest"))
    data = _tree(root)
    out = os.path.join(root, "out")
    summary = ingest.prepare(data, out, "train", workers=2, shard_mb=0.001)
    return data, out, summary


def test_summary_and_manifest(prepared):
    data, out, summary = prepared
    assert (summary.series_listed, summary.series_decoded) == (8, 6)
    assert summary.stacks == 8  # 2 sagittal + 1 two-block axial per study
    assert summary.images == 2 * (4 + 5 + 6) - 1  # one truncated file
    manifest = read_manifest(out)
    assert manifest["counts"]["stacks"] == 8 and manifest["split"] == "train"
    assert len(manifest["files"]["volumes"]) == summary.shards == 6
    # The manifest is the newest file of the output: written last.
    newest = max((os.path.getmtime(os.path.join(d, f)), f) for d, _, fs in os.walk(out) if "_progress" not in d for f in fs)
    assert newest[1] == "manifest.json"


def test_prepare_restores_ray_datas_operator_reservation(prepared):
    import ray

    # prepare turns it and the downstream-capacity backpressure off for its one-operator map (each held
    # 2 workers to ~1 task at a time) and puts them back, so later Ray Data pipelines keep Ray's defaults.
    ctx = ray.data.DataContext.get_current()
    assert ctx.op_resource_reservation_enabled is True
    assert ctx.downstream_capacity_backpressure_ratio == ray.data.context.DEFAULT_DOWNSTREAM_CAPACITY_BACKPRESSURE_RATIO


def test_volumes_schema_and_plain_pandas(prepared):
    _, out, _ = prepared
    df = pd.read_parquet(os.path.join(out, "volumes"))  # no Ray, no spine_ray reader
    assert list(df.columns) == VOLUME_COLUMNS == VOLUME_SCHEMA.names
    assert len(df) == 8 and not df.duplicated(["series_id", "stack"]).any()
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(os.path.join(out, "volumes", read_manifest(out)["files"]["volumes"][0])).metadata
    # Pixels uncompressed by default (compressing costs more CPU than decoding), metadata zstd.
    assert meta.row_group(0).column(7).compression == "UNCOMPRESSED"
    assert {meta.row_group(0).column(i).compression for i in range(meta.num_columns) if i != 7} == {"ZSTD"}
    assert read_manifest(out)["config"]["codec"] == {"name": "none", "level": None}
    assert read_manifest(out)["config"]["direct_io"] is True


def test_a_shard_written_through_the_page_cache_is_the_same_bytes(prepared, tmp_path):
    """prepare writes shards with O_DIRECT by default; --page-cache (direct_io=False) must not change a byte."""
    data, out, _ = prepared
    plan = json.loads(open(os.path.join(out, "_progress", "plan.json")).read())
    group = next(g for g in plan["groups"] if g["series"][0]["series_id"] == 1011)
    counts = ingest.decode_group(group, data, str(tmp_path), direct_io=False)
    name = f"part-{group['key']}.parquet"
    assert (tmp_path / "volumes" / name).read_bytes() == open(os.path.join(out, "volumes", name), "rb").read()
    assert counts["bytes"] == os.path.getsize(tmp_path / "volumes" / name)


def test_a_zstd_shard_holds_the_same_volumes_smaller(prepared, tmp_path):
    """Shards of either codec read alike: Parquet records the codec per column chunk."""
    import pyarrow.parquet as pq

    data, out, _ = prepared
    plan = json.loads(open(os.path.join(out, "_progress", "plan.json")).read())
    group = next(g for g in plan["groups"] if g["series"][0]["series_id"] == 1011)
    counts = ingest.decode_group(group, data, str(tmp_path), ingest.VolumeCodec("zstd", 3))
    name = f"part-{group['key']}.parquet"
    packed, plain = pq.ParquetFile(tmp_path / "volumes" / name), pq.ParquetFile(os.path.join(out, "volumes", name))
    assert packed.metadata.row_group(0).column(7).compression == "ZSTD"
    assert packed.read().equals(plain.read())
    assert counts["bytes"] == os.path.getsize(tmp_path / "volumes" / name) < os.path.getsize(os.path.join(out, "volumes", name))


def test_unknown_codecs_are_refused_before_anything_is_written(prepared, tmp_path):
    from typer.testing import CliRunner

    from spine_ray.cli import app

    with pytest.raises(ValueError, match="codec must be one of none, lz4, snappy, zstd"):
        ingest.VolumeCodec("brotli")
    with pytest.raises(ValueError, match="zstd only"):
        ingest.VolumeCodec("lz4", 3)
    data, _, _ = prepared
    r = CliRunner().invoke(app, ["prepare", data, str(tmp_path / "o"), "--codec", "gzip"])
    assert r.exit_code != 0 and "codec must be one of" in r.output
    assert not (tmp_path / "o").exists()


def test_volumes_match_a_direct_decode(prepared):
    data, out, _ = prepared
    df = read_volumes(out, filters=[("series_id", "=", 1023)])
    assert list(df["stack"]) == [0, 1]
    d = os.path.join(data, "train_images", "102", "1023")
    direct = dicom.decode_series([os.path.join(d, f) for f in os.listdir(d)]).stacks
    for (_, row), s in zip(df.iterrows(), direct, strict=True):
        vol, meta = load_volume(row)
        np.testing.assert_array_equal(vol, s.volume)
        assert meta["instance_numbers"] == s.instance_numbers
        np.testing.assert_allclose(meta["affine"], s.affine)
        np.testing.assert_allclose(meta["positions"], s.positions)
        assert meta["pixel_spacing"] == s.pixel_spacing
        assert row["intensity_p01"] <= row["intensity_p99"]


def test_read_volumes_columns_only(prepared):
    _, out, _ = prepared
    df = read_volumes(out, columns=["study_id", "series_id", "n_slices"])
    assert list(df.columns) == ["study_id", "series_id", "n_slices"] and len(df) == 8


def test_errors_table(prepared):
    data, out, _ = prepared
    err = read_table(out, "errors.parquet")
    assert list(err.columns) == ["study_id", "series_id", "path", "reason"]
    by_series = err.groupby("series_id")["reason"].apply(list).to_dict()
    assert set(by_series) == {1012, 1098, 1099}
    assert len(by_series[1012]) == 1  # the truncated file; the rest of the series is in volumes
    assert any(r.startswith("not an image") for r in by_series[1098])
    assert "no usable image in series" in by_series[1098]
    assert by_series[1099] == ["series listed in train_series_descriptions.csv but no files on disk"]


def test_labels_with_points(prepared):
    data, out, _ = prepared
    labels = read_table(out, "labels.parquet")
    assert len(labels) == 2 * 25
    assert set(labels["severity"]) == {-1, 0, 1, 2}
    src = pd.read_csv(os.path.join(data, "train.csv"))
    assert (labels.query("study_id == 101 and condition == 'spinal_canal_stenosis' and level == 'l1_l2'")["severity"] == 2).all()
    assert src.loc[0, "spinal_canal_stenosis_l1_l2"] == "Severe"
    coords = pd.read_csv(os.path.join(data, "train_label_coordinates.csv"))
    vols = read_volumes(out)
    for c in coords.itertuples():
        row = labels.query(f"study_id == {c.study_id} and row_id.str.contains('{c.level.lower().replace('/', '_')}') "
                           f"and condition == '{c.condition.lower().replace(' ', '_')}'").iloc[0]
        assert (row["series_id"], row["instance_number"], row["row"], row["col"]) == (c.series_id, c.instance_number, c.y, c.x)
        path = os.path.join(data, "train_images", str(c.study_id), str(c.series_id), f"{c.instance_number}.dcm")
        h = dicom.header_from_dataset(pydicom.dcmread(path, stop_before_pixels=True), path)
        xyz = geometry.pixel_to_patient(h.position, h.orientation, h.pixel_spacing, row=c.y, col=c.x)
        np.testing.assert_allclose([row["x_mm"], row["y_mm"], row["z_mm"]], xyz, atol=1e-4)
        v = vols.query(f"series_id == {c.series_id} and stack == {row['stack']}").iloc[0]
        assert list(v["instance_numbers"])[row["slice"]] == c.instance_number
        # And back: the voxel the affine maps to that point is (slice, row, col).
        kij = geometry.patient_to_voxel(load_volume(v)[1]["affine"], xyz)
        np.testing.assert_allclose(kij, [row["slice"], c.y, c.x], atol=1e-3)
    assert labels["stack"].notna().sum() == 2
    # The axial point lies in the second (lower) oblique block.
    assert labels.query("study_id == 102 and condition == 'left_subarticular_stenosis' and level == 'l4_l5'")["stack"].iloc[0] == 1


def test_unfinished_output_is_refused(tmp_path):
    with pytest.raises(IncompleteOutput):
        read_volumes(str(tmp_path))


def test_rerun_after_interruption_finishes_without_duplicates(prepared, tmp_path):
    data, done_out, _ = prepared
    out = str(tmp_path / "out")
    shutil.copytree(done_out, out)
    progress = os.path.join(out, "_progress")
    markers = sorted(f for f in os.listdir(progress) if f.startswith("done-"))

    def shard(marker: str) -> str:
        return os.path.join(out, "volumes", f"part-{marker[len('done-'):-len('.json')]}.parquet")

    # Interrupted: manifest gone, one group wrote its shard but died before its marker, two groups
    # never ran, and a half-written temporary shard is lying around.
    with_shard = [m for m in markers if os.path.exists(shard(m))]
    crashed, lost = with_shard[0], with_shard[1:3]
    os.remove(os.path.join(out, "manifest.json"))
    for m in [crashed, *lost]:
        os.remove(os.path.join(progress, m))
    for m in lost:
        os.remove(shard(m))
        os.remove(os.path.join(progress, m.replace("done-", "errors-").replace(".json", ".parquet")))
    with open(os.path.join(out, "volumes", ".part-x.parquet.tmp-123"), "wb") as f:
        f.write(b"PAR1 half")
    with pytest.raises(IncompleteOutput):
        read_volumes(out)
    summary = ingest.prepare(data, out, "train", workers=2)
    manifest = read_manifest(out)
    assert manifest["config"]["resumed_groups"] == len(markers) - 3
    a = read_volumes(done_out).drop(columns="volume")
    b = read_volumes(out).drop(columns="volume")
    assert len(b) == len(a) and not b.duplicated(["series_id", "stack"]).any()
    assert sorted(b["series_id"]) == sorted(a["series_id"])
    assert summary.images == read_manifest(done_out)["counts"]["images"]
    assert len(read_table(out, "errors.parquet")) == len(read_table(done_out, "errors.parquet"))
    # A finished output re-run is a no-op apart from rewriting the manifest.
    again = ingest.prepare(data, out, "train", workers=2)
    assert read_manifest(out)["config"]["resumed_groups"] == len(markers) and again.stacks == summary.stacks


def test_output_of_another_input_is_refused(prepared, tmp_path):
    data, done_out, _ = prepared
    out = str(tmp_path / "o")
    shutil.copytree(done_out, out)
    with pytest.raises(ValueError, match="another OUT"):
        ingest.prepare(data, out, "test")


def test_plan_groups_are_deterministic(prepared):
    data, _, _ = prepared
    a = ingest.make_plan(data, "train", 0.05)
    b = ingest.make_plan(data, "train", 0.05)
    assert json.dumps(a) == json.dumps(b)
    series = [s["series_id"] for g in a["groups"] for s in g["series"]]
    assert len(series) == len(set(series)) == 7 and [m["series_id"] for m in a["missing"]] == [1099]


def test_cli_prepare_prints_a_summary(prepared, tmp_path):
    from typer.testing import CliRunner

    from spine_ray.cli import app

    data, _, _ = prepared
    r = CliRunner().invoke(app, ["prepare", data, str(tmp_path / "cli"), "--workers", "2", "--shard-mb", "1"])
    assert r.exit_code == 0, r.output
    for text in ("series decoded", "stacks", "images", "errors", "time"):
        assert text in r.output
    assert read_manifest(str(tmp_path / "cli"))["counts"]["stacks"] == 8
    assert read_manifest(str(tmp_path / "cli"))["config"]["direct_io"] is True
    cached = CliRunner().invoke(app, ["prepare", data, str(tmp_path / "cached"), "--workers", "1", "--page-cache"])
    assert cached.exit_code == 0, cached.output
    assert read_manifest(str(tmp_path / "cached"))["config"]["direct_io"] is False
    bad = CliRunner().invoke(app, ["prepare", data, str(tmp_path / "cli"), "--split", "test"])
    assert bad.exit_code != 0 and read_manifest(str(tmp_path / "cli"))  # the finished output is untouched


def test_decode_study_matches_prepare(prepared):
    data, out, _ = prepared
    vols, errors = ingest.decode_study(data, "train", 101)
    ref = read_volumes(out, filters=[("study_id", "=", 101)]).sort_values(["series_id", "stack"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(vols, ref)
    assert list(errors["series_id"]) == [1012]


def test_decode_study_takes_descriptions_given_instead_of_the_series_csv(prepared, tmp_path):
    data, out, _ = prepared
    listed = pd.read_csv(os.path.join(data, "train_series_descriptions.csv"))
    mine = listed[listed["study_id"] == 101]
    # A copy of the images without the series CSV: the descriptions can only come from the caller.
    shutil.copytree(os.path.join(data, "train_images", "101"), tmp_path / "train_images" / "101")
    vols, _ = ingest.decode_study(str(tmp_path), "train", 101, dict(zip(mine["series_id"], mine["series_description"], strict=True)))
    ref = read_volumes(out, filters=[("study_id", "=", 101)]).sort_values(["series_id", "stack"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(vols, ref)


def test_real_tables_without_images(real_tables, tmp_path):
    """The real series list and train.csv: every series is reported missing, labels cover every target."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("train.csv", "train_series_descriptions.csv"):
        shutil.copy(real_tables / name, data / name)
    summary = ingest.prepare(str(data), str(tmp_path / "out"), "train", workers=1)
    assert (summary.series_listed, summary.errors, summary.stacks) == (6294, 6294, 0)
    labels = read_table(str(tmp_path / "out"), "labels.parquet")
    assert len(labels) == 1975 * 25 and (labels["severity"] == -1).sum() == 572
    assert read_volumes(str(tmp_path / "out")).empty


def test_rerun_after_a_task_crashed(prepared, tmp_path):
    """A real failure mid-job: one group cannot publish its shard, the job dies; the re-run finishes it."""
    data, done_out, _ = prepared
    out = str(tmp_path / "out")
    plan = ingest.make_plan(data, "train", 0.001)
    blocked = os.path.join(out, "volumes", f"part-{plan['groups'][-1]['key']}.parquet")
    os.makedirs(blocked)  # a directory where the shard must go: os.replace fails inside the Ray task
    with pytest.raises(Exception) as crash:  # noqa: B017 - Ray wraps the task's error in its own types
        ingest.prepare(data, out, "train", workers=2, shard_mb=0.001)
    assert "IsADirectoryError" in str(crash.value) or "Is a directory" in str(crash.value)
    with pytest.raises(IncompleteOutput):
        read_volumes(out)
    assert not any(f.startswith(".") for f in os.listdir(os.path.join(out, "volumes")))  # no temp shard left
    os.rmdir(blocked)
    summary = ingest.prepare(data, out, "train", workers=2, shard_mb=0.001)
    a = read_volumes(done_out).drop(columns="volume").sort_values(["series_id", "stack"]).reset_index(drop=True)
    b = read_volumes(out).drop(columns="volume").sort_values(["series_id", "stack"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert summary.stacks == len(a) and read_manifest(out)["config"]["resumed_groups"] < len(plan["groups"])


def test_a_changed_series_list_is_refused(prepared, tmp_path):
    data, done_out, _ = prepared
    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    out = str(tmp_path / "o")
    shutil.copytree(done_out, out)
    plan = json.loads(open(os.path.join(out, "_progress", "plan.json")).read())
    plan["data_dir"] = str(copy)
    with open(os.path.join(out, "_progress", "plan.json"), "w") as f:
        json.dump(plan, f)
    with open(copy / "train_series_descriptions.csv", "a") as f:
        f.write("103,1031,Sagittal T1\n")
    with pytest.raises(ValueError, match="series list"):
        ingest.prepare(str(copy), out, "train")
    assert read_manifest(out)  # left as it was


@pytest.mark.parametrize("groups,workers", [(29, 2), (29, 1), (9, 2), (87, 2), (300, 16), (3000, 2), (1, 4), (0, 2)])
def test_task_sizes_cover_every_group_in_even_tasks(groups, workers):
    sizes = ingest.task_sizes(groups, workers)
    assert sum(sizes) == groups and all(1 <= s <= ingest.MAX_GROUPS_PER_TASK for s in sizes)
    assert not sizes or max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)
    # Enough tasks for every worker to take several (when there are groups enough), else one group each.
    assert len(sizes) >= min(groups, workers * ingest.TASKS_PER_WORKER)
    # Every worker gets as many tasks as the others (no last task alone while the rest idle).
    assert len(sizes) % workers == 0 or len(sizes) == groups


def test_tasks_of_several_groups_write_what_single_groups_write(prepared, tmp_path, monkeypatch):
    data, done_out, summary = prepared
    plan = ingest.make_plan(data, "train", 0.001)
    monkeypatch.setattr(ingest, "TASKS_PER_WORKER", 1)  # read in this driver: 1 worker, tasks of 3-4 groups
    assert len(ingest.task_sizes(len(plan["groups"]), 1)) < len(plan["groups"])
    out = str(tmp_path / "out")
    again = ingest.prepare(data, out, "train", workers=1, shard_mb=0.001)
    a = read_volumes(done_out).sort_values(["series_id", "stack"]).reset_index(drop=True)
    b = read_volumes(out).sort_values(["series_id", "stack"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    assert (again.series_decoded, again.images, again.errors) == (summary.series_decoded, summary.images, summary.errors)
    assert sorted(os.listdir(os.path.join(out, "volumes"))) == sorted(os.listdir(os.path.join(done_out, "volumes")))


def test_a_group_already_done_is_not_decoded_again(prepared, tmp_path, monkeypatch):
    """A retried task that had finished some of its groups skips them and returns their counts."""
    data, _, _ = prepared
    group = next(g for g in ingest.make_plan(data, "train", 0.001)["groups"] if g["series"][0]["study_id"] == 102)
    out = str(tmp_path / "out")
    first = ingest.decode_group(group, data, out)
    assert first["stacks"] >= 1

    def fail(*args, **kwargs):
        raise AssertionError("decoded twice")

    monkeypatch.setattr(ingest, "decode_one_series", fail)
    assert ingest.decode_group(group, data, out) == first
