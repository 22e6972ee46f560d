"""benchmarks/gpu.py at its tiny size on CPU without Ray: every unit measured, the table printed."""

from __future__ import annotations

import json
import math
from pathlib import Path

from benchmarks import gpu


def test_tiny_cpu_run_measures_every_unit(tmp_path: Path, capsys) -> None:
    out = tmp_path / "gpu.json"
    gpu.main(["--size", "tiny", "--device", "cpu", "--studies", "3", "--steps", "2", "--no-ray", "--infer-studies", "1", "--shared", "2",
              "--json", str(out), "--work", str(tmp_path / "work")])
    results = json.loads(out.read_text())
    assert results["meta"]["ray"] is False
    assert list(results["units"]) == [u.key for u in gpu.UNITS]
    for r in results["units"].values():
        for key in ("fit_samples_per_s", "ready_samples_per_s", "bare_samples_per_s", "bare4x_samples_per_s", "augment_per_core", "cpu_cores"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["label"], key, r[key])
        assert 0.0 <= r["data_wait_frac"] < 1.0
        assert r["samples_built"] > 0
        assert r["grad_checkpointing"] is False  # `auto` (the one-stage unit) is off on CPU
    for key, r in results["units"].items():  # the grade units also measure `augment_on: device`
        dev = (r["bare_device_aug_samples_per_s"], r["augment_device_per_core"])
        assert all(math.isfinite(v) and v > 0 for v in dev) if key.startswith("grade") else dev == (None, None), (key, dev)
    shared = results["units"]["grade_convnext"]["shared"]  # two fold jobs in two processes on the one device
    assert shared["jobs"] == 2 and len(shared["per_job"]) == 2 and all(r > 0 for r in shared["per_job"])
    assert shared["samples_per_s"] == sum(shared["per_job"])
    assert all(r["shared"] is None for k, r in results["units"].items() if k != "grade_convnext")
    assert results["infer"]["studies_per_s"] > 0 and results["infer"]["members"] == 11
    assert all(r["cudnn_benchmark"] is False and r["bare_cudnn_flipped_samples_per_s"] is None for r in results["units"].values())  # no cuDNN on CPU
    printed = capsys.readouterr().out
    assert "| unit (recipe batch) | fit samples/s |" in printed
    for u in gpu.UNITS:
        assert f"| {u.label} (" in printed
    assert "(90.6)" in printed  # the issue's figure beside today's
    assert "| grade, convnext_small (8) |" in printed.split("More work per GPU")[1]
    on_device = printed.split("Grade augmentation on the device")[1].split("Start-up")[0]
    assert "| grade, convnext_small (8) |" in on_device and "| grade, tf_efficientnet_b3 (8) |" in on_device and "localiser" not in on_device
    assert "cuDNN's autotuner" not in printed
    for r in results["units"].values():  # start-up figures: each batch's first steps, the unit's time beyond its windows
        assert r["bare_warmup_s"] > 0 and r["bare4x_warmup_s"] > 0 and 0.0 <= r["overhead_s"] <= r["seconds"]
    assert "| grade, convnext_small (8) |" in printed.split("Start-up: the bare loop's first steps")[1]
    unit = results["units"]["grade_convnext"]  # as a GPU run reports it: the autotuner flipped on, at twice the rate
    unit["bare_cudnn_flipped_samples_per_s"] = 2 * unit["bare_samples_per_s"]
    cudnn = gpu.table(results).split("cuDNN's autotuner")[1]
    assert "| grade, convnext_small (8) | off |" in cudnn and cudnn.split("\n")[4].endswith("| 2.00 |")


def test_a_batch_the_device_cannot_hold_is_na_and_the_run_goes_on(monkeypatch) -> None:
    import torch

    from spine_ray.engine.stage import FoldJob, collate, epoch_rng
    from spine_ray.stages.grade.stage import GradeStage
    from tests.test_grade_augment import CFG, _rows

    stage, job = GradeStage(), FoldJob("grade", CFG.name, 0, 2, CFG, "", "", {})
    rows = _rows(CFG, 8, 0)
    small = collate(stage, job, {k: v[:4] for k, v in rows.items()}, epoch_rng(0, 0, 0))
    large = collate(stage, job, rows, epoch_rng(0, 0, 1))
    step = gpu._bare_step

    def bounded(stage, job, model, o, batch):  # as a device with room for 4 samples
        if batch["x"].shape[0] > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        step(stage, job, model, o, batch)

    monkeypatch.setattr(gpu, "_bare_step", bounded)
    (bare, bare4), checkpointed, warm = gpu.bare_rates(stage, job, [small, large], torch.device("cpu"), 2, [0.05, 0.05])
    assert bare > 0 and math.isnan(bare4) and checkpointed is False
    assert warm[0] > 0 and math.isnan(warm[1])  # the warm-up of a batch that does not fit: n/a too
    assert gpu._num(bare4) == "n/a"
    # With `flip_cudnn`, one more rate: the first batch with the autotuner the other way; the member's setting after.
    seen: list[bool] = []
    monkeypatch.setattr(gpu, "_bare_step", lambda *a: (seen.append(torch.backends.cudnn.benchmark), step(*a)))
    rates, _, _ = gpu.bare_rates(stage, job, [small], torch.device("cpu"), 2, [0.05], flip_cudnn=0.05)
    assert len(rates) == 2 and all(r > 0 for r in rates)
    assert set(seen) == {False, True} and seen[0] is False and seen[-1] is True and torch.backends.cudnn.benchmark is False


def test_synthetic_prepared_output_has_label_points(tmp_path: Path) -> None:
    wide = gpu.synth_prepared(tmp_path / "prep", 2, 64, seed=1, workers=1)
    from spine_ray.data.volumes import read_table, read_volumes

    volumes = read_volumes(str(tmp_path / "prep"))
    labels = read_table(str(tmp_path / "prep"), "labels.parquet")
    assert set(volumes["study_id"]) == set(wide["study_id"])
    assert set(volumes["series_description"]) == {"Sagittal T1", "Sagittal T2/STIR", "Axial T2"}
    points = labels[labels["slice"].notna()]
    assert len(points) > 0
    # Every point lies on a slice of the stack it names.
    merged = points.merge(volumes[["study_id", "series_id", "n_slices"]], on=["study_id", "series_id"])
    assert len(merged) == len(points) and (merged["slice"] < merged["n_slices"]).all()


def test_the_ray_path_is_taken_only_where_ray_imports(monkeypatch) -> None:
    import sys

    assert gpu.ray_unusable(no_ray=True) == "--no-ray"
    assert gpu.ray_unusable(no_ray=False) is None  # this environment has Ray
    monkeypatch.setitem(sys.modules, "ray", None)  # as an archive that is found but does not load
    why = gpu.ray_unusable(no_ray=False)
    assert why is not None and why.startswith("Ray not importable here: ModuleNotFoundError")


def test_tables_of_a_run_cut_short(tmp_path: Path, capsys) -> None:
    """`--table` prints what a saved JSON holds: a run stopped at its time limit after its first unit, no inference."""
    unit = {"label": "grade, convnext_small", "batch": 8, "fit_samples_per_s": 200.0, "ready_samples_per_s": 210.0, "bare_samples_per_s": 220.0,
            "bare4x_samples_per_s": 400.0, "fit_over_bare": 200 / 220, "peak_gib_fit": 9.0, "data_wait_frac": 0.01, "gpu_util_pct": 97.0,
            "cpu_cores": 3.1, "pipeline_cores": None, "augment_per_core": 40.0, "shared": None, "bare_device_aug_samples_per_s": None,
            "bare_cudnn_flipped_samples_per_s": None, "bare_warmup_s": 41.0, "bare4x_warmup_s": 38.5, "overhead_s": 120.0, "seconds": 190.0,
            "issue": dict(zip(("fit", "bare", "bare4x", "peak_gib", "augment_per_core"), gpu.UNITS[0].issue, strict=True))}
    meta = {"config": "rsna2024.yaml", "size": "real", "studies": 4, "image_px": 512, "steps": 20, "device": "NVIDIA H200", "torch": "2.11",
            "path": "a one-worker Ray Train TorchTrainer", "ray": True, "util": "NVML"}  # no "seconds": stopped inside its first unit's save
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"meta": meta, "units": {"grade_convnext": unit}, "infer": None}))
    gpu.main(["--table", str(path)])
    printed = capsys.readouterr().out
    assert "| grade, convnext_small (8) | 200.0 (90.6) | 210.0 | 220.0 (90.9) | 400.0 (172.3) | 0.91 |" in printed
    assert "| grade, convnext_small (8) | 41.0 | 38.5 | 120 | 190 |" in printed
    assert "n/a s in all" in printed and "infer: StudyPredictor" not in printed


def test_units_are_sized_to_leave_their_expected_overhead() -> None:
    """A unit's windows: an equal part of what is left after the reserve (inference, shared runs to come), its own shared
    run and the overhead expected for every unit still to come (--overhead-s until one is measured, then their mean)."""
    assert gpu.unit_seconds(400.0, reserve=80.0, mine=0.0, overheads=[], assumed=90.0, left=2) == (400 - 80 - 180) / 2
    assert gpu.unit_seconds(400.0, reserve=80.0, mine=0.0, overheads=[20.0, 40.0], assumed=90.0, left=2) == (400 - 80 - 60) / 2
    assert gpu.unit_seconds(400.0, reserve=20.0, mine=60.0, overheads=[], assumed=0.0, left=4) == 80.0
    assert gpu.unit_seconds(100.0, reserve=80.0, mine=0.0, overheads=[], assumed=90.0, left=3) == 5.0  # late: the least windows, not none
