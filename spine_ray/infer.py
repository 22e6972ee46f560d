"""`spine-ray infer`: score a study collection of any size into a submission with Ray Data.

One streaming pipeline: studies → decode their series (CPU tasks, the ingest module) → predict
(an actor pool of `StudyPredictor`s, each loading every fold's checkpoint of every model once:
stage 1 on each view, crops, stage 2 for every member and fold, blend) → submission rows,
gathered on the driver a study at a time. Every study gets all 25 rows whatever happens: a
missing series, a failed decode or a failing model falls back to the prior model for the targets
it could not predict, and each fallback is counted and logged. The file is validated by the
submission reader's rules before it is written, atomically.

`StudyPredictor` is plain PyTorch: the benchmark and tests call it without Ray.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from spine_ray.core.config import load
from spine_ray.core.schema import N_TARGETS, read_series, submission_frame, write_submission
from spine_ray.core.storage import atomic_write_text, exists, join
from spine_ray.ensemble.baseline import read_prior
from spine_ray.models.backbone import speed_up
from spine_ray.run_config import Member, PipelineConfig
from spine_ray.stages.localize import VIEWS, variant_member

log = logging.getLogger(__name__)


def submitted_members(cfg: PipelineConfig) -> list[Member]:
    """The members inference runs: all but the one-stage diagnostics (`gt_heatmap`), which are never submitted."""
    return [m for m in cfg.members() if not (m.stage == "onestage" and m.config.gt_heatmap)]


def decode_study(data_dir: str, split: str, study_id: int, series: list[tuple[int, str]]) -> tuple[bytes, list[str]]:
    """Decode one study (the ingest module's path): (volume rows as Parquet bytes, problems found).

    Problems name every unusable file and every listed series without files on disk.
    """
    from spine_ray.data.ingest import decode_study as decode

    volumes, errors = decode(data_dir, split, study_id, dict(series))
    problems = [f"{e.path}: {e.reason}" for e in errors.itertuples()]
    found = set(volumes["series_id"]) | set(errors["series_id"])
    problems += [f"series {sid} ({desc}): no files" for sid, desc in series if sid not in found]
    buf = io.BytesIO()
    volumes.to_parquet(buf, index=False, compression="none")
    return buf.getvalue(), problems


class StudyPredictor:
    """All models of a run, loaded once: one study's volume rows → blended probabilities [25, 3]."""

    def __init__(self, run_dir: str, device: str = "cpu") -> None:
        from spine_ray.stages.registry import load_member

        self.device = torch.device(device)
        cfg = load(PipelineConfig, join(run_dir, "config.yaml"))
        self.prior = read_prior(join(run_dir, "prior.csv"))
        # Every fold's model of every member, with the member config stored beside its weights.
        loaded = {(m.stage, m.name): load_member(run_dir, m.stage, m.name, cfg.folds, self.device) for m in submitted_members(cfg)}
        if self.device.type == "cuda":  # as each member trained: channels-last encoders (its autocast is applied where it predicts)
            for models, mcfg in loaded.values():
                for model in models:
                    speed_up(model, mcfg.train.channels_last, compile_backbone=False)
        # Stage-1 members: the main localisers ("") and each variant's, every view's folds.
        self.localizers: dict[str, tuple[dict, dict]] = {}
        for variant, _ in cfg.stage1_members():
            views = {view: loaded["localize", variant_member(view, variant)] for view in VIEWS}
            self.localizers[variant] = ({v: ms for v, (ms, _) in views.items()}, {v: c for v, (_, c) in views.items()})
        self.graders = {m.name: loaded["grade", m.name] for m in cfg.grade}
        self.onestage = {name: v for (stage, name), v in loaded.items() if stage == "onestage"}  # no stage-1 points needed
        self.blend = None
        if exists(join(run_dir, "blend.json")):
            from spine_ray.ensemble.blend import load_blend

            self.blend = load_blend(join(run_dir, "blend.json"))

    @torch.no_grad()
    def predict(self, volumes: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Volume rows of one study → (probabilities [25, 3], predicted mask [25]); prior where not predicted."""
        if volumes.empty:
            return self.prior.copy(), np.zeros(N_TARGETS, bool)
        members, masks = self.member_probs(volumes)
        if self.blend is not None:
            from spine_ray.ensemble.blend import apply_blend

            blended = apply_blend(self.blend, {k: v[None] for k, v in members.items()})[0]
        else:
            blended = np.mean(list(members.values()), axis=0)
        mask = np.any(list(masks.values()), axis=0)
        return np.where(mask[:, None], blended, self.prior), mask

    @torch.no_grad()
    def member_probs(self, volumes: pd.DataFrame) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Volume rows of one study → every member's probabilities [25, 3] (prior where it predicted nothing) and mask [25]."""
        from spine_ray.stages.grade.predict import predict_study
        from spine_ray.stages.localize import locate_study
        from spine_ray.stages.onestage import predict_study as onestage_study

        members, masks = {}, {}
        for variant, (localizers, configs) in self.localizers.items():
            points = locate_study(localizers, configs, volumes)
            for name, (models, cfg) in self.graders.items():  # cross-ensembling: every grader on every stage-1 member's points
                probs, mask = predict_study(models, cfg, volumes, points)
                member = variant_member(name, variant)
                members[member] = np.where(mask[:, None], probs, self.prior)
                masks[member] = mask
        for name, (models, cfg) in self.onestage.items():  # no stage-1 points: runs even where stage 1 found none
            probs, mask = onestage_study(models, cfg, volumes)
            members[name], masks[name] = np.where(mask[:, None], probs, self.prior), mask
        return members, masks

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Ray Data entry: a batch of decoded studies → their probabilities and fallback notes."""
        out = {"study_id": [], "probs": [], "predicted": [], "note": []}
        for study, vol, encoded in zip(batch["study_id"], batch["volumes"], batch["problems"], strict=True):
            problems = json.loads(encoded)
            note = "; ".join(list(problems)[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else "")
            try:
                volumes = pq.read_table(io.BytesIO(vol)).to_pandas() if len(vol) else pd.DataFrame()
                probs, mask = self.predict(volumes)
            except Exception as e:  # noqa: BLE001 - one bad study must not sink the collection
                log.exception("study %s failed; using the prior", study)
                probs, mask = self.prior.copy(), np.zeros(N_TARGETS, bool)
                note = f"{note}; prediction failed: {type(e).__name__}: {e}".lstrip("; ")
            out["study_id"].append(int(study))
            out["probs"].append(probs.astype(np.float64).reshape(-1))
            out["predicted"].append(mask)
            out["note"].append(note)
        return {k: np.asarray(v) if k != "probs" else np.stack(v) for k, v in out.items()}


class _Decode:
    def __init__(self, data_dir: str, split: str) -> None:
        self.data_dir, self.split = data_dir, split

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        vols, problems = [], []
        for study, series in zip(batch["study_id"], batch["series"], strict=True):
            try:
                v, p = decode_study(self.data_dir, self.split, int(study), [tuple(s) for s in json.loads(series)])
            except Exception as e:  # noqa: BLE001 - reported, the study falls back to the prior
                v, p = b"", [f"decode failed: {type(e).__name__}: {e}"]
            vols.append(v)
            problems.append(json.dumps(p))  # a JSON list per study: Arrow-friendly, unlike ragged lists
        return {"study_id": batch["study_id"], "volumes": np.array(vols, dtype=object), "problems": np.array(problems)}


@dataclass
class InferReport:
    """What an inference run did."""

    studies: int = 0
    fully_predicted: int = 0
    fallback_studies: int = 0
    fallback_targets: int = 0
    seconds: float = 0.0
    notes: dict[str, str] = field(default_factory=dict)


def infer(data_dir: str, run_dir: str, out: str, split: str = "test", num_gpus: float = 0.0, concurrency: int = 1, on_study: Any = None) -> InferReport:
    """Score every study listed in `{split}_series_descriptions.csv` into the submission at `out`."""
    import ray

    from spine_ray.core.raycluster import init_ray
    from spine_ray.core.storage import absolute
    from spine_ray.engine.train_loop import check_checkpoint
    from spine_ray.stages.registry import model_url

    t0 = time.perf_counter()
    data_dir, run_dir, out = absolute(data_dir), absolute(run_dir), absolute(out)
    series = read_series(join(data_dir, f"{split}_series_descriptions.csv"))
    items = [
        {"study_id": int(s), "series": json.dumps([[int(r.series_id), r.series_description] for r in g.itertuples()])}
        for s, g in series.groupby("study_id")
    ]
    cfg = load(PipelineConfig, join(run_dir, "config.yaml"))
    for m in submitted_members(cfg):
        for k in range(cfg.folds):
            check_checkpoint(model_url(run_dir, m.stage, m.name, k))  # before any worker loads it
    init_ray()
    ds = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    # Decoding: stateless CPU tasks, one study each.
    ds = ds.map_batches(_Decode(data_dir, split), batch_size=1, num_cpus=1)
    ds = ds.map_batches(
        StudyPredictor, fn_constructor_args=(run_dir, "cuda" if num_gpus else "cpu"), batch_size=1,
        num_gpus=num_gpus, num_cpus=0 if num_gpus else 1, compute=ray.data.ActorPoolStrategy(size=concurrency),
    )
    report, studies, probs = InferReport(), [], []
    for row in ds.iter_rows():
        study = int(row["study_id"])
        studies.append(study)
        probs.append(np.asarray(row["probs"]).reshape(N_TARGETS, 3))
        missing = int((~np.asarray(row["predicted"])).sum())
        report.studies += 1
        report.fallback_targets += missing
        if missing == N_TARGETS:
            report.fallback_studies += 1
        elif missing == 0:
            report.fully_predicted += 1
        if row["note"] or missing:
            report.notes[str(study)] = f"{missing} targets from the prior" + (f"; {row['note']}" if row["note"] else "")
            log.warning("study %s: %s", study, report.notes[str(study)])
        if on_study is not None:
            on_study(report.studies, len(items))
    expected = sorted(int(s) for s in series["study_id"].unique())
    if sorted(studies) != expected:
        raise RuntimeError(f"inference returned {len(studies)} of {len(expected)} studies")
    write_submission(submission_frame(studies, np.stack(probs)), out, expected)
    report.seconds = time.perf_counter() - t0
    atomic_write_text(out + ".report.json", json.dumps(report.__dict__, indent=2))
    return report
