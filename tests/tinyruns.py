"""A tiny prepared synthetic set with a run dir beside it, for stage-2 tests that train real folds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from spine_ray.core.schema import read_labels
from spine_ray.engine.folds import assign_folds
from spine_ray.stages.grade.samples import fake_points


def prepared_run(root: Path, studies: int, seed: int) -> dict:
    """`studies` synthetic studies at 64 px, prepared; 2 folds and a fake stage-1 points table in `root/run`."""
    from spine_ray.data.ingest import prepare
    from spine_ray.synth.acquisition import AcquisitionConfig
    from spine_ray.synth.generate import generate
    from spine_ray.synth.study import SynthConfig

    data, prep, run = str(root / "data"), str(root / "prep"), root / "run"
    generate(data, SynthConfig(studies=studies, seed=seed, acquisition=AcquisitionConfig(image_sizes=(64,), sagittal_slices=(15, 16))), workers=1)
    prepare(data, prep, "train", workers=2)
    run.mkdir()
    labels = read_labels(f"{data}/train.csv")
    assign_folds(labels, 2, 0).to_parquet(run / "folds.parquet")
    lab = pd.read_parquet(f"{prep}/labels.parquet")
    points = fake_points(lab, np.random.default_rng(0))
    points.to_parquet(run / "points.parquet")
    return {"data": data, "prep": prep, "run": str(run), "labels": labels, "lab": lab, "points": points}
