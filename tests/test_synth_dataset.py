"""A small generated dataset: strict DICOM decoding, layout, 3D consistency, determinism, quirks."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest

from spine_ray.core.schema import (
    AXIAL_T2,
    SAGITTAL_T1,
    SAGITTAL_T2,
    read_coordinates,
    read_labels,
    read_series,
    read_submission,
)
from spine_ray.ensemble.metric import score_frames
from spine_ray.synth import generate as gen
from spine_ray.synth.acquisition import AcquisitionConfig
from spine_ray.synth.geometry import pixel_to_patient
from spine_ray.synth.study import SynthConfig, make_study

SMALL = AcquisitionConfig(image_sizes=(64,), sagittal_slices=(15, 16))
CFG = SynthConfig(studies=3, test_studies=2, seed=11, acquisition=SMALL)


def is_finished(out: Path) -> bool:
    """Whether `out` holds a completely written dataset: its manifest, written last, exists."""
    return (out / gen.MANIFEST).exists()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    gen.generate(str(out), CFG, workers=1)
    return out


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


def test_layout_passes_the_schema_readers(dataset):
    train = read_labels(str(dataset / "train.csv"))
    test = read_labels(str(dataset / "test_labels.csv"))
    assert len(train) == 3 and len(test) == 2
    series = read_series(str(dataset / "train_series_descriptions.csv"))
    coords = read_coordinates(str(dataset / "train_label_coordinates.csv"))
    read_series(str(dataset / "test_series_descriptions.csv"))
    read_submission(str(dataset / "sample_submission.csv"), test["study_id"])
    read_submission(str(dataset / "oracle_train.csv"), train["study_id"])
    assert set(series["series_description"]) >= {SAGITTAL_T1, SAGITTAL_T2, AXIAL_T2}
    for sid in train["study_id"]:
        assert 1_000_000 <= sid < 10**10
        for _, row in series[series.study_id == sid].iterrows():
            assert (dataset / "train_images" / str(sid) / str(row.series_id)).is_dir()
    # Every labelled target has a coordinate, on the right kind of series, on an existing file.
    labelled = int((train.iloc[:, 1:].notna()).to_numpy().sum())
    assert len(coords) == labelled
    kinds = coords.merge(series, on=["study_id", "series_id"])
    want = {"Spinal": SAGITTAL_T2, "Left Neural": SAGITTAL_T1, "Right Neural": SAGITTAL_T1, "Left Subarticular": AXIAL_T2, "Right Subarticular": AXIAL_T2}
    for _, r in kinds.iterrows():
        assert r.series_description == next(v for k, v in want.items() if r.condition.startswith(k))
        assert (dataset / "train_images" / str(r.study_id) / str(r.series_id) / f"{r.instance_number}.dcm").exists()
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["studies"] == 3 and is_finished(dataset)


def test_every_file_decodes_strictly(dataset):
    n = 0
    for path in sorted((dataset / "train_images").rglob("*.dcm")):
        ds = pydicom.dcmread(path)  # no force: needs a valid preamble and file meta
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
        assert ds.PhotometricInterpretation == "MONOCHROME2"
        assert (ds.BitsAllocated, ds.BitsStored) == (16, 12)
        assert int(path.stem) == ds.InstanceNumber
        assert str(ds.StudyInstanceUID) == path.parts[-3] and str(ds.SeriesInstanceUID) == path.parts[-2]
        arr = ds.pixel_array
        assert arr.shape == (ds.Rows, ds.Columns) and arr.max() < 4096 and arr.std() > 0
        n += 1
    assert n > 3 * 40
    frames = {pydicom.dcmread(p, stop_before_pixels=True).FrameOfReferenceUID for p in (dataset / "train_images").glob("*/*/*.dcm")}
    assert len(frames) == 3  # one per study


def _patient_point(dataset: Path, row) -> np.ndarray:
    path = dataset / "train_images" / str(row.study_id) / str(row.series_id) / f"{row.instance_number}.dcm"
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return pixel_to_patient(
        np.array(ds.ImagePositionPatient, float), np.array(ds.ImageOrientationPatient, float),
        np.array(ds.PixelSpacing, float), row.x, row.y,
    )


def test_points_agree_in_3d_across_series(dataset):
    assert _check_3d(dataset) >= 10


def test_points_agree_in_3d_with_non_square_pixels_and_oblique_blocks(tmp_path):
    acq = replace(SMALL, non_square_fraction=1.0, axial_block_fraction=1.0, missing_series=0.0)
    gen.generate(str(tmp_path), replace(CFG, studies=1, test_studies=0, seed=5, acquisition=acq), workers=1)
    spacing = {tuple(pydicom.dcmread(p, stop_before_pixels=True).PixelSpacing) for p in tmp_path.rglob("*.dcm")}
    assert all(dy != dx for dy, dx in spacing)
    assert _check_3d(tmp_path) >= 5


def _check_3d(dataset: Path) -> int:
    """Left/right pairs of each level centre on that level's spinal point; returns pairs checked."""
    coords = read_coordinates(str(dataset / "train_label_coordinates.csv"))
    checked = 0
    for sid, study in coords.groupby("study_id"):
        pts = {(r.condition, r.level): _patient_point(dataset, r) for r in study.itertuples()}
        for level in ("L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"):
            spinal = pts.get(("Spinal Canal Stenosis", level))
            for side_pair in (("Left Subarticular Stenosis", "Right Subarticular Stenosis"),
                              ("Left Neural Foraminal Narrowing", "Right Neural Foraminal Narrowing")):
                if spinal is None or any((c, level) not in pts for c in side_pair):
                    continue
                left, right = (pts[(c, level)] for c in side_pair)
                mid = (left + right) / 2
                assert np.linalg.norm(mid - spinal) < 8.0, (sid, level, side_pair)
                assert 10.0 < np.linalg.norm(left - right) < 60.0
                assert (left - right)[0] > 0  # patient left is +x in DICOM's LPS
                others = [p for (c, lv), p in pts.items() if c == "Spinal Canal Stenosis" and lv != level]
                assert min(np.linalg.norm(mid - p) for p in others) > 20.0
                checked += 1
    return checked


def test_oracle_files_score_as_reported(dataset):
    test = read_labels(str(dataset / "test_labels.csv"))
    oracle = read_submission(str(dataset / "oracle_submission.csv"), test["study_id"])
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert abs(score_frames(test, oracle).score - manifest["oracle_test"]) < 1e-9


def test_same_seed_same_bytes_also_through_ray(dataset, tmp_path, ray_local):
    again = tmp_path / "again"
    gen.generate(str(again), CFG, workers=2)  # one Ray task per study
    assert _digest(again) == _digest(dataset)
    other = tmp_path / "other"
    gen.generate(str(other), replace(CFG, seed=12, studies=1, test_studies=0), workers=1)
    assert (other / "train.csv").read_bytes() != (dataset / "train.csv").read_bytes()


def test_interrupted_run_does_not_look_finished(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    calls = []

    def failing(task, cfg, out_url):
        calls.append(task.index)
        if len(calls) == 2:
            raise RuntimeError("worker lost")
        return make_study(task, cfg, out_url)

    monkeypatch.setattr(gen, "make_study", failing)
    with pytest.raises(RuntimeError):
        gen.generate(str(out), replace(CFG, studies=2, test_studies=0), workers=1)
    assert not is_finished(out) and not (out / "train.csv").exists()
    monkeypatch.undo()
    gen.generate(str(out), replace(CFG, studies=2, test_studies=0), workers=1)
    assert is_finished(out)
    with pytest.raises(FileExistsError):
        gen.generate(str(out), replace(CFG, studies=2, test_studies=0), workers=1)


def test_missing_and_extra_series(tmp_path):
    acq = replace(SMALL, missing_series=1.0, extra_axial=(0.0, 1.0), axial_block_fraction=1.0)
    gen.generate(str(tmp_path), replace(CFG, studies=1, test_studies=0, acquisition=acq), workers=1)
    assert json.loads((tmp_path / "manifest.json").read_text())["oracle_test"] is None  # no test studies
    series = read_series(str(tmp_path / "train_series_descriptions.csv"))
    assert list(series["series_description"]) == [AXIAL_T2] * 3
    coords = read_coordinates(str(tmp_path / "train_label_coordinates.csv"))
    assert set(coords["condition"]) <= {"Left Subarticular Stenosis", "Right Subarticular Stenosis"}


QUIRK_CHECKS = {
    "monochrome1": lambda dss: any(d.PhotometricInterpretation == "MONOCHROME1" for d in dss),
    "rescale": lambda dss: any("RescaleSlope" in d and float(d.RescaleSlope) != 1 or float(d.get("RescaleIntercept", 0)) != 0 for d in dss),
    "explicit": lambda dss: any(d.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian and "PixelData" in d for d in dss),
    "implicit": lambda dss: any(d.file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian for d in dss),
    "deflated": lambda dss: any(d.file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian for d in dss),
    "mixed_sizes": lambda dss: len({(d.Rows, d.Columns) for d in dss if "Rows" in d}) > 1,
    "non_image": lambda dss: any("PixelData" not in d for d in dss),
}


@pytest.mark.filterwarnings("ignore:End of file reached")
@pytest.mark.parametrize("kind", [*QUIRK_CHECKS, "truncated"])
def test_quirks_do_what_they_say(tmp_path, kind):
    cfg = replace(CFG, studies=1, test_studies=0, quirks=1.0, quirk_kinds=(kind,), acquisition=replace(SMALL, image_sizes=(48,)))
    gen.generate(str(tmp_path), cfg, workers=1)
    log = (tmp_path / "quirks.csv").read_text().splitlines()[1:]
    assert log and all(f",{kind}," in line for line in log)
    for line in log:
        study, series = line.split(",")[:2]
        folder = tmp_path / "train_images" / study / series
        if kind == "truncated":
            inst = line.rsplit(" ", 1)[-1]
            with pytest.raises(Exception):  # noqa: B017 - any read error will do
                pydicom.dcmread(folder / f"{inst}.dcm").pixel_array  # noqa: B018
            continue
        dss = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
        assert QUIRK_CHECKS[kind](dss)
        for d in dss:
            if "PixelData" in d:
                assert d.pixel_array.shape == (d.Rows, d.Columns)


def test_instance_numbers_not_always_spatial_nor_from_one():
    from spine_ray.synth.acquisition import plan_study
    from spine_ray.synth.phantom import sample_phantom

    rng = np.random.default_rng(3)
    acq = replace(SMALL, shuffled_instances=1.0, offset_instances=1.0, axial_block_fraction=1.0)
    plans = plan_study(sample_phantom(np.zeros(25), rng), np.zeros(25, np.int8), rng, acq)
    for p in plans:
        numbers = np.array(p.instance_numbers)
        assert len(set(numbers)) == len(numbers) and numbers.min() > 1
        assert not (np.diff(numbers) > 0).all()
    assert len(plans[-1].geometry.slices) >= 5 * SMALL.axial_block_slices[0]  # one block per disc


def test_cli_synth_and_its_errors(tmp_path):
    import subprocess
    import sys

    cli = [sys.executable, "-m", "spine_ray.cli", "synth", str(tmp_path / "d"), "--studies", "1", "--test-studies", "1", "--image-size", "48"]
    r = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "oracle" in r.stdout and is_finished(tmp_path / "d")
    assert read_submission(str(tmp_path / "d" / "oracle_submission.csv"))["row_id"].size == 25
    again = subprocess.run(cli, capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    bad = subprocess.run([*cli[:4], str(tmp_path / "e"), "--quirk-kinds", "sparkles"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "sparkles" in bad.stderr


def test_pixel_to_patient_inverts_projection_with_non_square_pixels():
    from spine_ray.synth.geometry import plane_stack

    row, col = np.array([0.0, 0.96, 0.28]), np.array([0.1, 0.0, -1.0])
    s = plane_stack(np.array([5.0, -20.0, 30.0]), row, col, (40, 60), (0.7, 0.9), np.array([0.0]))[0]
    p = s.voxel_centres()[13, 27]  # row 13, column 27
    x, y, d = s.project(p)
    assert np.allclose((x, y, d), (27, 13, 0), atol=1e-3)
    back = pixel_to_patient(np.array(s.position), np.array([*s.row_dir, *s.col_dir]), np.array(s.spacing), x, y)
    assert np.allclose(back, p, atol=1e-3)
