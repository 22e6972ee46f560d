"""`spine-ray report RUN_DIR`: a self-contained static HTML report of one training run.

Reads only the run's own tables (cv.json, oof.parquet, folds, train_labels.csv, prior.csv,
localize/points.parquet and summary.json, blend.json, each fold's metrics.jsonl, and beside the run
a demo's summary.json and an inference report) plus the prepared volumes for the pictures, and
writes `OUT/index.html`, its PNGs under `OUT/img/` and every number it shows in `OUT/report.json`.
No server and no network: open index.html from disk.

Every score comes from `spine_ray.ensemble.metric.score_arrays`: a per-target log loss is the metric's group
part with every other target unlabelled, so the report and the metric cannot disagree. The other
statistics (accuracy, precision/recall/F1, ROC-AUC, calibration) take the arg-max or one grade's
probability of the metric-normalised predictions of the scored rows, unweighted.
"""

from __future__ import annotations

import html
import io
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from spine_ray.core.schema import (
    CONDITION_GROUP,
    CONDITION_TITLES,
    CONDITIONS,
    GROUPS,
    LABEL_COLUMNS,
    LEVEL_TITLES,
    LEVELS,
    SEVERITIES,
)
from spine_ray.core.storage import exists, join, read_parquet, read_text
from spine_ray.engine.timelines import fold_files, fold_timelines
from spine_ray.engine.tracking import METRICS_FILE
from spine_ray.ensemble.blend import Blend, blend_logp, log_members
from spine_ray.ensemble.metric import normalise, score_arrays
from spine_ray.ensemble.tune_ensemble import RunData, load_run

N_BINS = 10


@dataclass(frozen=True)
class ReportConfig:
    """What to draw and where the side tables are."""

    studies: int = 3  # pictures of the N worst and N random studies
    seed: int = 0
    data: str = ""  # prepared volumes for the pictures; "" → the run config's `prepared`
    summary: str = ""  # a demo's summary.json; "" → RUN_DIR/../summary.json when present
    infer_report: str = ""  # SUBMISSION.report.json; "" → RUN_DIR/../submission.csv.report.json when present

    def __post_init__(self) -> None:
        if self.studies < 0:
            raise ValueError("studies must be ≥ 0")


# ---------------------------------------------------------------- statistics (pure)


def target_logloss(labels: np.ndarray, probs: np.ndarray, t: int) -> float:
    """Target t's weighted log loss: the metric's group part with every other target unlabelled."""
    only = np.full_like(labels, -1)
    only[:, t] = labels[:, t]
    if not (only >= 0).any():
        return float("nan")
    return float(getattr(score_arrays(only, probs), GROUPS[CONDITION_GROUP[t // len(LEVELS)]]))


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC-AUC of binary labels y under scores (Mann–Whitney, ties counted half); NaN with one class."""
    y = np.asarray(y, bool)
    pos, neg = score[y], score[~y]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))


def confusion_counts(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """3 × 3 counts, rows true grade, columns predicted grade."""
    out = np.zeros((3, 3), dtype=np.int64)
    np.add.at(out, (y, pred), 1)
    return out


def grade_scores(cm: np.ndarray) -> dict[str, dict[str, float]]:
    """Precision, recall and F1 per grade from a confusion matrix (NaN where undefined)."""
    out = {}
    for k, name in enumerate(SEVERITIES):
        tp, pred_k, true_k = cm[k, k], cm[:, k].sum(), cm[k, :].sum()
        p = tp / pred_k if pred_k else float("nan")
        r = tp / true_k if true_k else float("nan")
        f1 = 2 * p * r / (p + r) if pred_k and true_k and (p + r) > 0 else (0.0 if pred_k and true_k else float("nan"))
        out[name] = {"precision": float(p), "recall": float(r), "f1": float(f1), "support": int(true_k)}
    return out


def target_table(labels: np.ndarray, probs: np.ndarray) -> pd.DataFrame:
    """Per condition × level: n, weighted log loss, accuracy, balanced accuracy, ROC-AUC (≥ moderate, severe)."""
    p = normalise(probs)
    rows = []
    for t, name in enumerate(LABEL_COLUMNS):
        m = labels[:, t] >= 0
        y, pt = labels[m, t], p[m, t]
        pred = pt.argmax(-1)
        recalls = [float((pred[y == k] == k).mean()) for k in range(3) if (y == k).any()]
        rows.append({
            "target": name, "condition": CONDITION_TITLES[t // 5], "level": LEVEL_TITLES[t % 5], "n": int(m.sum()),
            "log_loss": target_logloss(labels, probs, t),
            "accuracy": float((pred == y).mean()) if len(y) else float("nan"),
            "balanced_accuracy": float(np.mean(recalls)) if recalls else float("nan"),
            "auc_moderate_or_worse": roc_auc(y >= 1, pt[:, 1] + pt[:, 2]),
            "auc_severe": roc_auc(y == 2, pt[:, 2]),
        })
    return pd.DataFrame(rows)


def condition_confusions(labels: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
    """Per condition, the 3 × 3 confusion counts over its five levels' scored rows (arg-max prediction)."""
    pred = normalise(probs).argmax(-1)
    out = {}
    for c, cond in enumerate(CONDITIONS):
        cols = slice(c * len(LEVELS), (c + 1) * len(LEVELS))
        m = labels[:, cols] >= 0
        out[cond] = confusion_counts(labels[:, cols][m], pred[:, cols][m])
    return out


def calibration(labels: np.ndarray, probs: np.ndarray, bins: int = N_BINS) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], list[float]]:
    """Per grade (one vs rest over scored rows): (mean p, observed rate, count) per bin, and the ECE."""
    p = normalise(probs)[labels >= 0]
    y = labels[labels >= 0]
    curves, eces = [], []
    for k in range(3):
        pk, yk = p[:, k], (y == k).astype(np.float64)
        b = np.minimum((pk * bins).astype(int), bins - 1)
        n = np.bincount(b, minlength=bins).astype(np.float64)
        mean_p = np.bincount(b, pk, bins) / np.maximum(n, 1)
        rate = np.bincount(b, yk, bins) / np.maximum(n, 1)
        curves.append((mean_p, rate, n))
        eces.append(float((n * np.abs(mean_p - rate)).sum() / max(n.sum(), 1)))
    return curves, eces


# ---------------------------------------------------------------- reading the run


def _json(url: str) -> Any:
    return json.loads(read_text(url)) if url and exists(url) else None


def training_epochs(run_dir: str) -> pd.DataFrame:
    """Every fold's metrics.jsonl as one table: stage, member, fold, then the reported metrics.

    `epoch` counts a fold's epochs across its training steps (two-step members restart the count in
    step 2; the step's own count stays in `step_epoch`), so curves run left to right.
    """
    rows = []
    for stage, member, fold, f in fold_files(run_dir, METRICS_FILE):
        mine = sorted((json.loads(line) for line in f if line.strip()), key=lambda r: (int(r.get("phase", 0)), int(r["epoch"])))
        rows += [{"stage": stage, "member": member, "fold": fold, **r, "step_epoch": r["epoch"], "epoch": i} for i, r in enumerate(mine)]
    return pd.DataFrame(rows)


def _blend_probs(blend: Blend | None, members: tuple[str, ...], member_probs: np.ndarray, temperatures: bool = True) -> np.ndarray | None:
    if blend is None:
        return None
    if not temperatures:
        blend = Blend(blend.members, blend.weights, (1.0, 1.0, 1.0), blend.severe_scale)
    order = [members.index(m) for m in blend.members]
    return blend_logp(blend, log_members(member_probs[order]))


def _fmt(v: Any) -> str:
    if isinstance(v, float | np.floating):
        return "–" if not np.isfinite(v) else f"{v:.4f}"
    return html.escape(str(v))


def _table(df: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in df.columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in r) + "</tr>" for r in df.itertuples(index=False))
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(src: str, alt: str) -> str:
    return f'<img src="img/{os.path.basename(src)}" alt="{html.escape(alt)}">'


CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1em;font-size:13px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}
th{background:#eef}section{margin-bottom:2em}img{max-width:100%;margin:4px;border:1px solid #ddd}h2{border-bottom:2px solid #88a}
.cond{display:inline-block;vertical-align:top;margin-right:1.5em}"""


@dataclass(frozen=True)
class _Inputs:
    """What the report's sections read: the run, its side tables and the predictions graded."""

    run_dir: str
    out: str
    cfg: ReportConfig
    run: RunData
    cv: dict[str, Any]
    blend_doc: dict[str, Any] | None
    demo: dict[str, Any] | None
    infer_rep: dict[str, Any] | None
    before: np.ndarray | None  # the blend without its temperatures
    after: np.ndarray | None  # the blend as fitted
    best: str  # the member with the best out-of-fold score
    graded: np.ndarray
    graded_name: str

    @property
    def y(self) -> np.ndarray:
        """The run's labels [n, 25]."""
        return self.run.labels

    def img(self, name: str) -> str:
        """Path of the report's picture `name`."""
        return join(self.out, "img", name)


def _load_inputs(run_dir: str, out: str, cfg: ReportConfig) -> _Inputs:
    """Read the run and its side tables; grade the blend when there is one, else the best member."""
    run = load_run(run_dir)
    cv = _json(join(run_dir, "cv.json"))
    if cv is None:
        raise FileNotFoundError(f"{run_dir}: no cv.json (run `spine-ray train` to the end first)")
    parent = run_dir.rstrip("/").rsplit("/", 1)[0]
    blend_doc = _json(join(run_dir, "blend.json"))
    demo = _json(cfg.summary or join(parent, "summary.json"))
    infer_rep = _json(cfg.infer_report or join(parent, "submission.csv.report.json"))
    members = run.matrix.members
    blend = Blend.from_dict(blend_doc["blend"]) if blend_doc else None
    after = _blend_probs(blend, members, run.matrix.probs)
    before = _blend_probs(blend, members, run.matrix.probs, temperatures=False)
    best = min(members, key=lambda m: cv["members"][m]["score"])
    graded, graded_name = (after, "blend") if after is not None else (run.matrix.probs[members.index(best)], f"member {best}")
    return _Inputs(
        run_dir=run_dir, out=out, cfg=cfg, run=run, cv=cv, blend_doc=blend_doc, demo=demo, infer_rep=infer_rep,
        before=before, after=after, best=best, graded=graded, graded_name=graded_name,
    )


def _summary_section(inp: _Inputs, rep: dict[str, Any]) -> str:
    """Every score with its four parts, as cv.json / blend.json / the demo wrote them."""
    cv = inp.cv
    scores = {"prior (out-of-fold)": cv["prior"], **{f"member {m}": s for m, s in cv["members"].items()}}
    if inp.blend_doc:
        scores |= {k: v for k, v in inp.blend_doc["scores"].items() if k.startswith("blend")}
    scores |= {"graded here: " + inp.graded_name: score_arrays(inp.y, inp.graded).as_dict()}
    if "oracle" in cv:
        scores["oracle"] = cv["oracle"]
    rep["scores"] = scores
    table = pd.DataFrame([{"model": k, **v} for k, v in scores.items()])
    body = _table(table)
    if "oracle" in cv:
        final = scores.get("blend, fitted on all folds (in-sample)", cv["members"][inp.best])["score"]
        rep["cv_gap_closed"] = (cv["prior"]["score"] - final) / (cv["prior"]["score"] - cv["oracle"]["score"])
        body += f"<p>Share of the prior→oracle gap closed out-of-fold: <b>{rep['cv_gap_closed']:.1%}</b>.</p>"
    if inp.demo:
        rep["held_out"] = {k: inp.demo[k] for k in ("prior", "test_score", "oracle", "gap_closed") if k in inp.demo}
        body += "<h3>Held-out test studies</h3>" + _table(pd.DataFrame([rep["held_out"]]))
    return body + "<p>Scores are the competition metric (lower is better): spinal, foraminal and subarticular weighted log losses, any_severe_spinal, and their mean.</p>"


def _conditions_section(inp: _Inputs, rep: dict[str, Any]) -> str:
    """Per condition × level, and a confusion matrix per condition."""
    from spine_ray.report import plots

    tt = target_table(inp.y, inp.graded)
    cms = condition_confusions(inp.y, inp.graded)
    rep["targets"] = tt.to_dict(orient="records")
    rep["confusion"] = {c: m.tolist() for c, m in cms.items()}
    rep["grades"] = {c: grade_scores(m) for c, m in cms.items()}
    body = f"<p>Predictions: {inp.graded_name}, out-of-fold.</p>" + _table(tt.drop(columns="target"))
    for c, cond in enumerate(CONDITIONS):
        g = pd.DataFrame([{"grade": k, **v} for k, v in rep["grades"][cond].items()])
        png = plots.confusion(cms[cond], ["N/M", "Mod", "Sev"], CONDITION_TITLES[c], inp.img(f"confusion_{cond}.png"))
        body += f"<div class='cond'><h3>{CONDITION_TITLES[c]}</h3>{_img(png, 'confusion ' + cond)}{_table(g)}</div>"
    return body


def _calibration_section(inp: _Inputs, rep: dict[str, Any]) -> str:
    """Calibration before and after the blend's temperature."""
    from spine_ray.report import plots

    curves_, rep["ece"] = {}, {}
    for name, p in (("before temperature", inp.before), ("after temperature", inp.after), (inp.graded_name, None if inp.after is not None else inp.graded)):
        if p is not None:
            curves_[name], rep["ece"][name] = calibration(inp.y, p)
    png = plots.reliability(curves_, SEVERITIES, inp.img("calibration.png"))
    ece = pd.DataFrame([{"predictions": k, **dict(zip(SEVERITIES, v, strict=True))} for k, v in rep["ece"].items()])
    return _img(png, "reliability diagram") + "<p>Expected calibration error per grade (10 equal-width bins, one grade vs the rest):</p>" + _table(ece)


def _localize_section(inp: _Inputs, rep: dict[str, Any], points: pd.DataFrame) -> str:
    """Stage 1: its summary, error histograms and the worst-localised studies."""
    from spine_ray.report import plots

    loc = _json(join(inp.run_dir, "localize", "summary.json")) or []
    rep["localize"] = loc
    scored = points[points["err_mm"].notna()]
    views = sorted(scored["view"].unique())
    h1 = plots.histograms({v: scored.loc[scored.view == v, "err_mm"].to_numpy() for v in views}, "error (mm)", inp.img("localize_mm.png"))
    h2 = plots.histograms({v: scored.loc[scored.view == v, "slice_err"].to_numpy() for v in views}, "slice error", inp.img("localize_slices.png"))
    worst = scored.groupby("study_id")["err_mm"].mean().sort_values(ascending=False)
    rep["worst_localised"] = [int(s) for s in worst.index[: max(inp.cfg.studies, 1)]]
    wt = worst.head(10).rename("mean error (mm)").reset_index()
    return _table(pd.DataFrame(loc)) + _img(h1, "error mm") + _img(h2, "slice error") + "<h3>Worst studies</h3>" + _table(wt)


def _studies_section(inp: _Inputs, rep: dict[str, Any], points: pd.DataFrame) -> str:
    """Pictures of the studies: the worst-localised (from `rep`) and random ones."""
    from spine_ray.report.studies import study_figures

    cfg, run = inp.cfg, inp.run
    prepared = cfg.data or _prepared_from_config(inp.run_dir)
    rng = np.random.default_rng(cfg.seed)
    others = [int(s) for s in sorted(set(points["study_id"])) if s not in rep["worst_localised"]]
    chosen = [("worst", s) for s in rep["worst_localised"][: cfg.studies]] + [("random", int(s)) for s in rng.choice(others, min(cfg.studies, len(others)), replace=False)]
    rep["pictures"] = []
    body = "<p>Red ×: predicted; green ○: ground truth; blue □: the sagittal T2 spinal point projected through the DICOM geometry onto the axial slice. The last panel resamples the axial stacks onto the sagittal T2 plane through their affines. Below: the crops stage 2 (the best member, the model of the fold that held the study out) saw at L4/L5, one row per target, with its attention over the slices (the slice it weighs most framed in red).</p>"
    for why, study in chosen:
        fold = int(run.folds[list(run.matrix.study_ids).index(study)]) if study in run.matrix.study_ids else -1
        pngs = study_figures(inp.run_dir, prepared, points, study, inp.img, member=inp.best, fold=fold)
        rep["pictures"].append({"study_id": study, "why": why, "images": [os.path.basename(p) for p in pngs]})
        body += f"<h3>Study {study} ({why})</h3>" + "".join(_img(p, f"study {study}") for p in pngs)
    return body


def _training_section(inp: _Inputs, rep: dict[str, Any]) -> str:
    """Training curves from each fold's metrics.jsonl."""
    from spine_ray.report import plots

    epochs = training_epochs(inp.run_dir)
    rep["training"] = epochs.to_dict(orient="records")
    if not len(epochs):
        return "<p>No per-epoch metrics in this run (folds trained before metrics.jsonl was written).</p>"
    folds = list(epochs.sort_values("epoch").groupby(["stage", "member", "fold"]))
    # Losses of the two stages are on different scales: one panel per stage and metric.
    series = {
        f"{stage}: {col}": {f"{member} fold {fold}": (g["epoch"].to_numpy(), g[col].to_numpy()) for (st, member, fold), g in folds if st == stage}
        for stage in ("localize", "grade")
        for col in ("train_loss", "val_loss", "epoch_s", "data_wait_frac")
        if col in epochs and epochs.loc[epochs.stage == stage, col].notna().any()
    }
    png = plots.curves(series, inp.img("training.png"))
    last = epochs.sort_values("epoch").groupby(["stage", "member", "fold"]).tail(1)
    cols = [c for c in ("stage", "member", "fold", "epoch", "train_loss", "val_loss", "epoch_s", "data_wait_frac") if c in last]
    return _img(png, "training curves") + "<p>Last epoch of each fold:</p>" + _table(last[cols])


def _timeline_section(inp: _Inputs, rep: dict[str, Any]) -> str:
    """The run's timeline: a row per slot, a bar per fold coloured by stage, and how busy the slots were."""
    from spine_ray.report import plots

    spans = fold_timelines(inp.run_dir)
    if not len(spans):
        return "<p>No fold timelines in this run (done.json without a timeline).</p>"
    t0 = spans["start"].min()
    wall, work, slots = spans["end"].max() - t0, float((spans["end"] - spans["start"]).sum()), int(spans["slot"].max()) + 1
    rep["timeline"] = {"slots": slots, "wall_s": wall, "busy": work / (slots * wall) if wall > 0 else 0.0,
                       "folds": spans.assign(start=spans["start"] - t0, end=spans["end"] - t0).to_dict(orient="records")}
    bars = [(int(r.slot), r.start - t0, r.end - t0, r.stage, f"{r.member} {r.fold}") for r in spans.itertuples()]
    png = plots.timeline(bars, inp.img("timeline.png"))
    return (_img(png, "timeline") + f"<p>{len(spans)} folds on {slots} slots over {wall / 60:.1f} min; the slots were busy "
            f"{rep['timeline']['busy']:.0%} of that time (the rest is idle: a stage waiting for the last fold of the one before, or start-up).</p>")


def _blend_section(inp: _Inputs, rep: dict[str, Any]) -> str:
    """The blend's weights, temperatures and severe factor, and what inference fell back on."""
    body = "<p>No blend.json: run <code>spine-ray tune-ensemble</code>.</p>"
    if inp.blend_doc:
        b = inp.blend_doc["blend"]
        w = pd.DataFrame([{"group": g, **ws, "temperature": b["temperatures"][g]} for g, ws in b["weights"].items()])
        body = _table(w) + f"<p>Severe factor (spinal p(severe) ×): <b>{b['severe_scale']:.4f}</b>; best single member: {html.escape(str(inp.blend_doc.get('best_member')))}.</p>"
        rep["blend"] = b
    if inp.infer_rep:
        infer_rep = inp.infer_rep
        rep["infer"] = infer_rep
        notes = pd.DataFrame([{"study_id": k, "note": v} for k, v in infer_rep.get("notes", {}).items()], columns=["study_id", "note"])
        counts = {k: infer_rep[k] for k in ("studies", "fully_predicted", "fallback_studies", "fallback_targets") if k in infer_rep}
        body += "<h3>Inference</h3>" + _table(pd.DataFrame([counts])) + (_table(notes) if len(notes) else "<p>No study fell back to the prior.</p>")
    return body


def build_report(run_dir: str, out: str, cfg: ReportConfig = ReportConfig()) -> dict[str, Any]:
    """Write OUT/index.html, OUT/img/*.png and OUT/report.json for RUN_DIR; returns report.json's content."""
    inp = _load_inputs(run_dir, out, cfg)
    os.makedirs(join(out, "img"), exist_ok=True)
    rep: dict[str, Any] = {"run_dir": run_dir, "graded": inp.graded_name, "sections": []}
    html_parts: list[str] = []

    def section(key: str, title: str, body: str) -> None:
        rep["sections"].append(key)
        html_parts.append(f'<section id="{key}"><h2>{html.escape(title)}</h2>{body}</section>')

    # Each builder runs before its section is listed, and adds its numbers to `rep` in page order.
    section("summary", "Summary", _summary_section(inp, rep))
    section("conditions", "Per condition × level", _conditions_section(inp, rep))
    section("calibration", "Calibration", _calibration_section(inp, rep))
    points = read_parquet(join(run_dir, "localize", "points.parquet"))
    section("localize", "Stage 1: localisation", _localize_section(inp, rep, points))
    section("studies", "Pictures of the studies", _studies_section(inp, rep, points))
    section("training", "Training", _training_section(inp, rep))
    section("timeline", "Timeline", _timeline_section(inp, rep))
    section("blend", "Blend and inference", _blend_section(inp, rep))

    page = f"<!doctype html><html><head><meta charset='utf-8'><title>spine-ray report</title><style>{CSS}</style></head><body><h1>spine-ray report: {html.escape(run_dir)}</h1>{''.join(html_parts)}</body></html>"
    with open(join(out, "index.html"), "w") as f:
        f.write(page)
    with open(join(out, "report.json"), "w") as f:
        json.dump(rep, f, indent=1, default=_plain)
    return rep


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"not JSON: {type(v)}")


def _prepared_from_config(run_dir: str) -> str:
    import yaml

    return str(yaml.safe_load(io.StringIO(read_text(join(run_dir, "config.yaml"))))["prepared"])
