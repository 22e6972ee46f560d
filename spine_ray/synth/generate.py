"""Generate a whole synthetic dataset in the competition's layout, in-process or one Ray task per study.

Layout under OUT: `train_images/`, `train.csv`, `train_label_coordinates.csv`,
`train_series_descriptions.csv`, `test_images/`, `test_series_descriptions.csv`,
`sample_submission.csv`, `test_labels.csv`, `test_label_coordinates.csv`,
`oracle_submission.csv`, `oracle_train.csv`, `latent.csv`, `quirks.csv`, `synth_config.yaml`
and, written last, `manifest.json`: a directory without it is not a finished dataset.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from spine_ray.core.config import save
from spine_ray.core.schema import (
    COORDINATE_COLUMNS,
    LABEL_COLUMNS,
    SERIES_COLUMNS,
    labels_from_matrix,
    submission_frame,
    write_submission,
)
from spine_ray.core.storage import atomic_write_bytes, exists, join, remove
from spine_ray.ensemble.metric import score_arrays
from spine_ray.ensemble.prior import fit_prior, predict_prior
from spine_ray.synth.labels import sample_labels
from spine_ray.synth.study import StudyResult, StudyTask, SynthConfig, make_study

MANIFEST = "manifest.json"
IN_PROCESS_BELOW = 8  # smaller runs skip Ray entirely


@dataclass(frozen=True)
class SynthSummary:
    """What a run produced and the two reference scores on its test studies."""

    studies: int
    test_studies: int
    series: int
    oracle_test: float
    prior_test: float
    oracle_train: float


def plan_tasks(cfg: SynthConfig) -> tuple[list[StudyTask], np.ndarray]:
    """Study ids, splits, labels and latents for every study; also the oracle probabilities [n, 25, 3]."""
    rng = np.random.default_rng([cfg.seed, 0])
    n = cfg.studies + cfg.test_studies
    ids = np.unique(rng.integers(1_000_000, 4_294_967_295, 2 * n + 8))
    ids = rng.permutation(ids)[:n]
    labels, latent, oracle = sample_labels(n, rng, cfg.labels)
    tasks = [
        StudyTask(i, int(ids[i]), "train" if i < cfg.studies else "test", labels[i], latent[i])
        for i in range(n)
    ]
    return tasks, oracle


def run_tasks(
    tasks: list[StudyTask], cfg: SynthConfig, out: str, workers: int = 0, say: Callable[[str], None] = lambda _m: None
) -> list[StudyResult]:
    """Make every study: in-process for small runs or workers=1, otherwise one Ray task each."""
    if workers == 1 or (workers == 0 and len(tasks) < IN_PROCESS_BELOW):
        return [make_study(t, cfg, out) for t in tasks]
    import ray

    from spine_ray.core.raycluster import init_ray

    init_ray(num_cpus=workers or None, quiet=True)
    remote = ray.remote(num_cpus=1, max_retries=2)(make_study)
    cfg_ref = ray.put(cfg)
    refs = [remote.remote(t, cfg_ref, out) for t in tasks]
    pending, step = list(refs), max(1, len(refs) // 10)
    while pending:
        _, pending = ray.wait(pending, num_returns=min(step, len(pending)))
        say(f"{len(refs) - len(pending)}/{len(refs)} studies written")
    return ray.get(refs)


def _csv(url: str, df: pd.DataFrame) -> None:
    atomic_write_bytes(url, df.to_csv(index=False).encode())


def generate(out: str, cfg: SynthConfig, workers: int = 0, overwrite: bool = False, log: Callable[[str], None] | None = None) -> SynthSummary:
    """Write a complete synthetic dataset to `out` (path or URL); the manifest is written last."""
    say = log or (lambda _msg: None)
    manifest = join(out, MANIFEST)
    if exists(manifest):
        if not overwrite:
            raise FileExistsError(f"{out} already holds a finished dataset (overwrite it with --overwrite)")
        remove(manifest)
    for split in ("train_images", "test_images"):
        remove(join(out, split), recursive=True)
    tasks, oracle = plan_tasks(cfg)
    say(f"generating {cfg.studies} train + {cfg.test_studies} test studies")
    results = run_tasks(tasks, cfg, out, workers, say)

    ids = np.array([t.study_id for t in tasks])
    labels = np.stack([t.labels for t in tasks]) if tasks else np.zeros((0, 25), np.int8)
    latent = np.stack([t.latent for t in tasks]) if tasks else np.zeros((0, 25))
    train = np.array([t.split == "train" for t in tasks], dtype=bool)
    for split, mask in (("train", train), ("test", ~train)):
        rows = [r for t, r in zip(tasks, results, strict=True) if t.split == split]
        _csv(join(out, f"{split}_series_descriptions.csv"), pd.DataFrame([s for r in rows for s in r.series], columns=list(SERIES_COLUMNS)))
        coords = pd.DataFrame([c for r in rows for c in r.coordinates], columns=list(COORDINATE_COLUMNS))
        _csv(join(out, "train_label_coordinates.csv" if split == "train" else "test_label_coordinates.csv"), coords)
        _csv(join(out, "train.csv" if split == "train" else "test_labels.csv"), labels_from_matrix(ids[mask], labels[mask]))
    if (~train).any():
        write_submission(submission_frame(ids[~train], oracle[~train]), join(out, "oracle_submission.csv"), ids[~train])
        uniform = submission_frame(ids[~train], np.ones((int((~train).sum()), 25, 3)))
        _csv(join(out, "sample_submission.csv"), uniform.sort_values("row_id").reset_index(drop=True))
    write_submission(submission_frame(ids[train], oracle[train]), join(out, "oracle_train.csv"), ids[train])
    lat = pd.DataFrame(latent, columns=list(LABEL_COLUMNS))
    lat.insert(0, "study_id", ids)
    _csv(join(out, "latent.csv"), lat)
    quirks = pd.DataFrame([q for r in results for q in r.quirks], columns=["study_id", "series_id", "quirk", "detail"])
    _csv(join(out, "quirks.csv"), quirks)
    save(cfg, join(out, "synth_config.yaml"))

    def _score(mask: np.ndarray, probs: np.ndarray) -> float:
        return score_arrays(labels[mask], probs).score if mask.any() else float("nan")

    prior = fit_prior(labels[train])
    summary = SynthSummary(
        studies=cfg.studies,
        test_studies=cfg.test_studies,
        series=sum(len(r.series) for r in results),
        oracle_test=_score(~train, oracle[~train]),
        prior_test=_score(~train, predict_prior(prior, int((~train).sum()))),
        oracle_train=_score(train, oracle[train]),
    )
    # Strict JSON: a score that does not exist (no test studies) is null, not NaN.
    scores = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in summary.__dict__.items()}
    body = {"format": "spine-ray-synth/1", "seed": cfg.seed, **scores}
    atomic_write_bytes(manifest, json.dumps(body, indent=2, sort_keys=True, allow_nan=False).encode())
    return summary
