"""The realistic preset: narrowing by mechanism against published ranges, reader-like coordinates, transitional anatomy, layout."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml

from spine_ray.core.config import load
from spine_ray.core.schema import LEVEL_TITLES, read_coordinates, read_labels
from spine_ray.synth import generate as gen
from spine_ray.synth.anatomy import N_TISSUES, THORACIC_ABOVE, measure_level, sample_spine
from spine_ray.synth.geometry import pixel_to_patient
from spine_ray.synth.render import REALISTIC_CONTRAST, TEXTURE_DEPTH
from spine_ray.synth.study import PRESETS, SynthConfig

CFG = load(SynthConfig, None, [*PRESETS["realistic"], "studies=2", "test_studies=1", "seed=4", "acquisition.image_sizes=[64]"])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("realistic") / "ds"
    gen.generate(str(out), CFG, workers=1)
    return out


def test_tables_are_complete():
    assert all(len(c) == N_TISSUES for c in REALISTIC_CONTRAST.values()) and len(TEXTURE_DEPTH) == N_TISSUES


def test_measurements_narrow_with_severity_as_published_grades_say():
    m = {z: measure_level(sample_spine(np.full(25, z), np.random.default_rng(3)), 3, step=0.5) for z in (-2.0, 0.0, 1.0, 2.0)}
    for key in ("sac_ap_mm", "sac_area_mm2", "recess_left_mm", "recess_right_mm", "foramen_fat_left_mm2", "foramen_fat_right_mm2"):
        values = [m[z][key] for z in sorted(m)]
        assert all(a > b for a, b in zip(values, values[1:], strict=False)), (key, values)
    # Dural sac area: normal well above 100 mm², severe below 75 (Schönström 1985).
    assert m[-2.0]["sac_area_mm2"] > 150 and m[1.0]["sac_area_mm2"] < 80 and m[2.0]["sac_area_mm2"] < 75
    # Lateral recess: > 5 mm normal, ≤ 3 mm stenotic (Ciric 1980, Bartynski & Lin 2003).
    assert m[-2.0]["recess_left_mm"] > 5 and m[1.0]["recess_left_mm"] <= 3
    # Foramen: perineural fat mostly gone and the root flattened when severe (Lee 2010).
    assert m[1.0]["foramen_fat_left_mm2"] < 0.2 * m[-2.0]["foramen_fat_left_mm2"]
    assert m[2.0]["foramen_root_left_mm2"] < 0.5 * m[-2.0]["foramen_root_left_mm2"]


def test_transitional_segments_keep_levels_named_by_counting_from_the_sacrum():
    kinds = {}
    for i in range(400):
        s = sample_spine(np.zeros(25), np.random.default_rng([8, i]))
        kinds.setdefault(s.transitional, s)
    assert set(kinds) == {"none", "lumbarised_s1", "sacralised_l5"}
    normal, lumb, sacr = kinds["none"], kinds["lumbarised_s1"], kinds["sacralised_l5"]
    assert len(lumb.disc_s) == len(normal.disc_s) + 1  # one more mobile segment
    l5 = THORACIC_ABOVE + 4
    # L5/S1 is the lowest full disc; a lumbarised S1 keeps a thinner disc below it, unlabelled.
    assert lumb.labelled[l5] == 4 and lumb.labelled[l5 + 1] == -1 and lumb.disc_h[l5 + 1] < lumb.disc_h[l5]
    assert lumb.s_sacrum < lumb.disc_s[l5 + 1] < lumb.disc_s[l5]
    assert normal.disc_s[l5 + 1] < normal.s_sacrum < normal.disc_s[l5]
    # A sacralised L5 keeps its name on a rudimentary disc.
    assert sacr.disc_h[l5] < 0.6 * sacr.disc_h[l5 - 1]


def _patient_point(root: Path, row) -> np.ndarray:
    ds = pydicom.dcmread(root / "train_images" / str(row.study_id) / str(row.series_id) / f"{row.instance_number}.dcm", stop_before_pixels=True)
    return pixel_to_patient(np.array(ds.ImagePositionPatient, float), np.array(ds.ImageOrientationPatient, float), np.array(ds.PixelSpacing, float), row.x, row.y)


def _spinal_errors(root: Path, cfg: SynthConfig) -> list[tuple[float, float]]:
    """Per spinal coordinate: distance (mm) to its own level's target point and to the nearest other level's."""
    tasks, _ = gen.plan_tasks(cfg)
    coords = read_coordinates(str(root / "train_label_coordinates.csv"))
    out = []
    for t in tasks:
        if t.split != "train":
            continue
        pts = sample_spine(t.latent, np.random.default_rng([cfg.seed, 1, t.index])).target_points()
        for r in coords[(coords.study_id == t.study_id) & (coords.condition == "Spinal Canal Stenosis")].itertuples():
            p = _patient_point(root, r)
            lv = LEVEL_TITLES.index(r.level)
            own = np.linalg.norm(p - pts[(0, lv)])
            other = min(np.linalg.norm(p - pts[(0, k)]) for k in range(5) if k != lv)
            out.append((own, other))
    return out


def test_dataset_layout_and_strict_dicom(dataset):
    train = read_labels(str(dataset / "train.csv"))
    coords = read_coordinates(str(dataset / "train_label_coordinates.csv"))
    assert len(coords) == int(train.iloc[:, 1:].notna().to_numpy().sum())
    for path in sorted((dataset / "train_images").rglob("*.dcm"))[:40]:
        ds = pydicom.dcmread(path)
        assert ds.pixel_array.max() < 4096 and ds.pixel_array.std() > 0
    assert yaml.safe_load((dataset / "synth_config.yaml").read_text())["preset"] == "realistic"


def test_reader_coordinates_are_near_their_level_and_sometimes_on_the_next(dataset, tmp_path):
    exact = replace(CFG, studies=1, test_studies=0, off_level=0.0, jitter_mm=0.0)
    gen.generate(str(tmp_path / "exact"), exact, workers=1)
    errors = _spinal_errors(tmp_path / "exact", exact)
    assert errors and all(own < 3.0 and other > 15.0 for own, other in errors)  # within half a slice gap
    slipped = replace(exact, off_level=1.0)
    gen.generate(str(tmp_path / "slipped"), slipped, workers=1)
    errors = _spinal_errors(tmp_path / "slipped", slipped)
    assert errors and all(own > 15.0 and other < 3.0 for own, other in errors)  # on an adjacent level


def test_same_seed_same_bytes(dataset, tmp_path):
    again = tmp_path / "again"
    gen.generate(str(again), CFG, workers=1)
    digest = {str(p.relative_to(again)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(again.rglob("*.dcm"))}
    assert digest == {str(p.relative_to(dataset)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(dataset.rglob("*.dcm"))}


def test_cli_defaults_to_realistic_and_rejects_unknown_presets(tmp_path):
    base = [sys.executable, "-m", "spine_ray.cli", "synth"]
    r = subprocess.run([*base, str(tmp_path / "d"), "--studies", "1", "--image-size", "40"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load((tmp_path / "d" / "synth_config.yaml").read_text())["preset"] == "realistic"
    bad = subprocess.run([*base, str(tmp_path / "e"), "--preset", "cartoon"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "cartoon" in bad.stderr


def test_a_presets_acquisition_is_the_one_its_synth_config_gets() -> None:
    from spine_ray.synth.acquisition import AcquisitionConfig
    from spine_ray.synth.presets import preset_acquisition

    assert preset_acquisition("realistic") == load(SynthConfig, None, list(PRESETS["realistic"])).acquisition
    assert preset_acquisition("realistic").image_sizes == (384, 448, 512, 640)
    assert preset_acquisition("simple") == AcquisitionConfig()
