"""The `spine-ray` command line. Each command is a few lines that call into the package."""

from __future__ import annotations

import sys

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from spine_ray.core.config import ConfigError
from spine_ray.core.schema import SchemaError
from spine_ray.core.storage import StorageError
from spine_ray.demo import DemoConfig
from spine_ray.engine.tracking import set_tracking_uri
from spine_ray.label_clean import DEFAULT_THRESHOLD
from spine_ray.report.build import ReportConfig

app = typer.Typer(
    help="Lumbar-spine MRI degenerative grading (RSNA 2024) on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

USER_ERRORS = (SchemaError, ConfigError, StorageError, FileNotFoundError, FileExistsError)


def score_table(title: str, rows: dict[str, dict[str, float]]) -> Table:
    """A table of metric parts, one row per model."""
    table = Table(title=title)
    table.add_column("model")
    for col in ("spinal", "foraminal", "subarticular", "any_severe_spinal", "score"):
        table.add_column(col, justify="right")
    for name, s in rows.items():
        table.add_row(name, *(f"{s[c]:.4f}" for c in ("spinal", "foraminal", "subarticular", "any_severe_spinal", "score")))
    return table


@app.command()
def score(
    submission: str = typer.Argument(..., help="Submission CSV (row_id, normal_mild, moderate, severe); path or URL."),
    labels: str = typer.Option(..., "--labels", help="Labels in train.csv format; path or URL."),
) -> None:
    """Score a submission with the competition's exact metric."""
    from spine_ray.core.schema import read_labels, read_submission
    from spine_ray.ensemble.metric import score_frames

    result = score_frames(read_labels(labels), read_submission(submission))
    out.print(score_table(f"score of {submission}", {"submission": result.as_dict()}))


@app.command()
def baseline(
    labels: str = typer.Option(..., "--labels", help="Labels in train.csv format; path or URL."),
    folds: int = typer.Option(5, help="Number of study-level folds."),
    seed: int = typer.Option(0, help="Seed of the fold assignment."),
    out_dir: str = typer.Option(None, "--out", help="Where to write prior.csv, folds.csv and oof_prior.csv."),
) -> None:
    """Fit the prior baseline (p ∝ weight × frequency) and score it out-of-fold."""
    from spine_ray.core.schema import read_labels, submission_frame, write_submission
    from spine_ray.core.storage import atomic_write_bytes, join
    from spine_ray.ensemble.baseline import run_baseline, write_prior

    table = read_labels(labels)
    result = run_baseline(table, folds, seed)
    if out_dir:
        write_prior(result.prior, join(out_dir, "prior.csv"))
        atomic_write_bytes(join(out_dir, "folds.csv"), result.folds.to_csv(index=False).encode())
        sub = submission_frame(table["study_id"], result.oof)
        write_submission(sub, join(out_dir, "oof_prior.csv"), table["study_id"])
    out.print(score_table(f"prior baseline, {folds}-fold out-of-fold, {len(table)} studies", {"prior": result.score.as_dict()}))


@app.command("prepare")
def prepare_cmd(
    data_dir: str = typer.Argument(..., metavar="DATA_DIR", help="Kaggle-layout data folder ({split}_images/, {split}_series_descriptions.csv, train.csv); path or URL."),
    out_dir: str = typer.Argument(..., metavar="OUT", help="Output folder (volumes/, labels.parquet, errors.parquet, manifest.json); path or URL."),
    split: str = typer.Option("train", "--split", help="train or test."),
    workers: int = typer.Option(None, "--workers", help="Concurrent decode tasks (default: all CPUs)."),
    shard_mb: float = typer.Option(128.0, "--shard-mb", help="Target pixels per Parquet shard, MB (before compression)."),
    codec: str = typer.Option("none", "--codec", help="Compression of the pixel column: none (fastest), lz4, snappy or zstd (half the size, ~1.6x the CPU)."),
    codec_level: int = typer.Option(None, "--codec-level", help="zstd level (1 when omitted; negative levels are faster)."),
    direct_io: bool = typer.Option(
        True, "--direct-io/--page-cache",
        help="Write local shards with O_DIRECT, past the page cache (less CPU per byte; falls back where the filesystem refuses it).",
    ),
) -> None:
    """Decode every DICOM series into Parquet volumes, labels and an errors table (resumable)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from spine_ray.data.ingest import VolumeCodec, prepare

    try:
        volume_codec = VolumeCodec(codec, codec_level)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--codec") from None

    with Progress(TextColumn("decoding series"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("decode", total=None)
        summary = prepare(
            data_dir, out_dir, split, workers, shard_mb,
            on_progress=lambda n, total: bar.update(task, completed=n, total=total), codec=volume_codec,
            direct_io=direct_io,
        )
    table = Table(title=f"prepare {split}: {data_dir} → {out_dir}", show_header=False)
    table.add_column("")
    table.add_column("", justify="right")
    rate = summary.images / summary.seconds if summary.seconds > 0 else 0.0
    for name, value in (
        ("series listed", f"{summary.series_listed:,}"),
        ("series decoded", f"{summary.series_decoded:,}"),
        ("stacks", f"{summary.stacks:,}"),
        ("images", f"{summary.images:,}"),
        ("errors (see errors.parquet)", f"{summary.errors:,}"),
        ("shards", f"{summary.shards:,} ({summary.volume_bytes / 1e6:,.1f} MB)"),
        ("time", f"{summary.seconds:,.1f} s ({rate:,.0f} images/s)"),
    ):
        table.add_row(name, value)
    out.print(table)


@app.command()
def synth(
    out_dir: str = typer.Argument(..., help="Where to write the dataset (path or URL); Kaggle layout."),
    studies: int = typer.Option(None, "--studies", help="Number of training studies [default: 100]."),
    seed: int = typer.Option(None, "--seed", help="Seed; the same seed gives the same bytes [default: 0]."),
    test_studies: int = typer.Option(None, "--test-studies", help="Held-out studies (test_images, test_labels.csv, oracle) [default: 0]."),
    preset: str = typer.Option(None, "--preset", help="realistic (anatomy, scanners, reader-like labels; 384–640 px) or simple (flat shapes, 256 px, fast) [default: realistic, or the --config file's]."),
    image_size: str = typer.Option(None, "--image-size", help="Image size in pixels, or a comma list drawn per series, e.g. 384,512,640 [default: the preset's]."),
    quirks: float = typer.Option(None, "--quirks", help="Fraction of series given one quirk [default: 0, clean data]."),
    quirk_kinds: str = typer.Option(None, "--quirk-kinds", help="Comma list of quirks to draw from [default: all of monochrome1, rescale, explicit, implicit, deflated, mixed_sizes, non_image, truncated]."),
    config: str = typer.Option(None, "--config", help="YAML SynthConfig; the flags above override it."),
    workers: int = typer.Option(0, "--workers", help="0 = automatic (in-process below 8 studies, else Ray), 1 = in-process."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished dataset at OUT."),
) -> None:
    """Write a synthetic dataset with known labels, coordinates and the Bayes-optimal oracle."""
    from spine_ray.core.config import load
    from spine_ray.synth.generate import generate
    from spine_ray.synth.study import PRESETS, SynthConfig

    flags = {"studies": studies, "test_studies": test_studies, "seed": seed, "quirks": quirks}
    preset = preset or ("simple" if config else "realistic")  # simple adds nothing to a config file
    overrides = [*PRESETS.get(preset, [f"preset={preset}"]), *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    if image_size is not None:
        overrides.append(f"acquisition.image_sizes={[int(v) for v in image_size.split(',') if v.strip()]}")
    if quirk_kinds is not None:
        overrides.append(f"quirk_kinds={[k.strip() for k in quirk_kinds.split(',') if k.strip()]}")
    cfg = load(SynthConfig, config, overrides)
    summary = generate(out_dir, cfg, workers=workers, overwrite=overwrite, log=lambda m: console.print(m))
    table = Table(title=f"synthetic dataset at {out_dir}")
    for col in ("train studies", "test studies", "series", "oracle (test)", "prior (test)", "oracle (train)"):
        table.add_column(col, justify="right")
    table.add_row(
        str(summary.studies), str(summary.test_studies), str(summary.series),
        f"{summary.oracle_test:.4f}", f"{summary.prior_test:.4f}", f"{summary.oracle_train:.4f}",
    )
    out.print(table)


@app.command()
def train(
    config: str = typer.Option(..., "--config", help="Pipeline config YAML (see jobs/)."),
    stage: str = typer.Option(None, "--stage", help="Train stage 1 alone (localize), or the rest on a finished stage 1 (grade); default: every fold job of the run in one schedule."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config value, e.g. --set folds=3 --set localize.sag_t2.train.epochs=2."),
    tracking_uri: str = typer.Option("", "--tracking-uri", help="MLflow tracking URI (a server, or file:/…); default: a file store RUN_DIR/mlruns."),
) -> None:
    """Train every fold job of every stage in one schedule (each once its inputs exist) and write out-of-fold tables."""
    from spine_ray.core.config import load
    from spine_ray.pipeline import train as run_train
    from spine_ray.run_config import PipelineConfig

    set_tracking_uri(tracking_uri)
    cfg = load(PipelineConfig, config, overrides)
    report = run_train(cfg, stage)
    if "localize" in report:
        table = Table(title=f"stage 1 out-of-fold localisation error ({cfg.run_dir})")
        for col in ("view", "points", "median mm", "p90 mm", "exact slice", "±1 slice"):
            table.add_column(col, justify="right")
        for view, r in report["localize"].iterrows():
            table.add_row(view, str(int(r["points"])), f"{r['median_mm']:.1f}", f"{r['p90_mm']:.1f}", f"{r['slice_exact']:.0%}", f"{r['slice_within_1']:.0%}")
        out.print(table)
    if "grade" in report:
        g = report["grade"]
        rows = {"prior (same folds)": g["prior"], **g["members"]}
        if "oracle" in g:
            rows["oracle"] = g["oracle"]
        out.print(score_table(f"stage 2 cross-validation, {cfg.folds} folds ({cfg.run_dir}/cv.json)", rows))


@app.command("tune-lr")
def tune_lr_cmd(
    config: str = typer.Option(..., "--config", help="Pipeline config YAML (see jobs/)."),
    target: str = typer.Option("localize.sag_t2", "--target", help="Which member, STAGE.MEMBER: localize.sag_t2|sag_t1|axial (@variant), grade.<name> or onestage.<name>."),
    trials: int = typer.Option(8, "--trials", help="Number of trials (each a real training run on one fold)."),
    fold: int = typer.Option(0, "--fold", help="The fold whose held-out studies score each trial."),
    overrides: list[str] = typer.Option([], "--set", help="Override a config value, e.g. --set folds=3."),
    tracking_uri: str = typer.Option("", "--tracking-uri", help="MLflow tracking URI (a server, or file:/…); default: a file store RUN_DIR/mlruns."),
) -> None:
    """Search a model's learning rate and weight decay with Ray Tune, Optuna and ASHA."""
    set_tracking_uri(tracking_uri)
    from spine_ray.core.config import load
    from spine_ray.core.storage import join
    from spine_ray.pipeline import resolved, setup_run
    from spine_ray.run_config import PipelineConfig
    from spine_ray.tune_lr import TuneLRConfig, member_config, tune_lr

    cfg = resolved(load(PipelineConfig, config, overrides))
    member_config(cfg, target)  # an unknown member fails in one line, before any set-up
    setup_run(cfg)
    result = tune_lr(cfg, target, TuneLRConfig(trials=trials, fold=fold))
    table = Table(title=f"tune-lr {target}, fold {fold}: best of {len(result['trials'])} trials")
    for col in ("", *result["best"].keys(), "val loss"):
        table.add_column(col, justify="right")
    table.add_row("start", *(f"{v:.2e}" for v in result["start"].values()), "")
    table.add_row("best", *(f"{v:.2e}" for v in result["best"].values()), f"{result['best_val_loss']:.4f}")
    out.print(table)
    out.print(f"train with it: spine-ray train --config {join(cfg.run_dir, 'tune_lr', target, 'best.yaml')}")


@app.command("tune-ensemble")
def tune_ensemble_cmd(
    run_dir: str = typer.Argument(..., help="A training run directory (oof.parquet, folds.parquet, train_labels.csv, prior.csv); path or URL."),
    trials: int = typer.Option(1000, "--trials", help="At most this many hyper-parameter candidates (default: the whole grid)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the draw when --trials cuts the grid."),
    mode: str = typer.Option("batched", "--mode", help="batched: one Tune trial per (per-level, clip), its caps × shrinkages inside; per-trial: one Tune trial per candidate."),
    tracking_uri: str = typer.Option("", "--tracking-uri", help="MLflow tracking URI (a server, or file:/…); default: a file store RUN_DIR/mlruns."),
) -> None:
    """Fit per-group member weights, temperatures and a spinal severe factor exactly on OOF predictions; Ray Tune picks shrinkage, cap, per-level temperatures and clip held-out; write blend.json."""
    set_tracking_uri(tracking_uri)
    from spine_ray.core.storage import join
    from spine_ray.ensemble.tune_ensemble import MODES, tune_ensemble

    if mode not in MODES or trials < 1:
        raise typer.BadParameter(f"--mode must be one of {list(MODES)} and --trials ≥ 1")
    r = tune_ensemble(run_dir, trials=trials, seed=seed, mode=mode)
    s = r["search"]
    out.print(score_table(
        f"ensemble blend of {len(r['blend']['members'])} members on {r['studies']} studies "
        f"({s['trials_per_search']} candidates, {s['evaluations']} evaluations, {s['seconds']:.1f} s, {s['mode']})",
        r["scores"],
    ))
    out.print(r["decision"])
    filled = {m: n for m, n in r["filled_from_prior"].items() if n}
    if filled:
        out.print(f"rows filled from the prior: {filled}")
    out.print(f"wrote {join(run_dir, 'blend.json')}")


@app.command("clean-labels")
def clean_labels_cmd(
    run_dir: str = typer.Argument(..., help="A training run directory (oof.parquet, train_labels.csv); path or URL."),
    threshold: float = typer.Option(DEFAULT_THRESHOLD, "--threshold", help="Flag a label when the OOF ensemble gives its grade a probability below this."),
    out_path: str = typer.Option("", "--out", help="Where to write the flags table (default: RUN_DIR/label_flags.parquet)."),
    synthetic: str = typer.Option("", "--synthetic", help="The `spine-ray synth` dataset behind the run (default: found through the run's prepared manifest)."),
) -> None:
    """Flag labels the out-of-fold ensemble disbelieves (p(label) < threshold); on synthetic data, score them against the known flips."""
    from spine_ray.core.storage import join
    from spine_ray.label_clean import clean_labels

    if not 0.0 < threshold < 1.0:
        raise typer.BadParameter("--threshold must be in (0, 1)")
    r = clean_labels(run_dir, threshold, out_path or None, synthetic or None)
    table = Table(title=f"labels with OOF p(label) < {threshold:g} ({r.flags_url})")
    for col in ("condition", "judged", "flagged", "share"):
        table.add_column(col, justify="right" if col != "condition" else "left")
    for cond, row in r.counts.iterrows():
        table.add_row(str(cond), str(int(row["judged"])), str(int(row["flagged"])), f"{row['share']:.1%}")
    out.print(table)
    if r.recovery is not None:
        rc = r.recovery
        out.print(
            f"against the synthetic flips ({r.latent_url}): {rc.flipped} of {rc.judged} labels flipped (base rate {rc.base_rate:.1%}); "
            f"flagged precision {rc.precision:.1%}, recall {rc.recall:.1%} ({rc.hits} of {rc.flagged} flags are flips)"
        )
    out.print(f"retrain without them: spine-ray train --config {join(run_dir, 'config.yaml')} --set exclude_labels={r.flags_url}")


@app.command()
def infer(
    data_dir: str = typer.Argument(..., help="Kaggle-layout data folder ({split}_images/, {split}_series_descriptions.csv); path or URL."),
    run: str = typer.Option(..., "--run", help="A finished training run directory (path or URL)."),
    out_path: str = typer.Option(..., "--out", help="Where to write the submission CSV (path or URL)."),
    split: str = typer.Option("test", "--split", help="Which split's studies to score (test or train)."),
    num_gpus: float = typer.Option(0.0, "--num-gpus", help="GPUs per predictor actor (0: CPU)."),
    concurrency: int = typer.Option(1, "--concurrency", help="Predictor actors (each loads every fold's model once)."),
) -> None:
    """Score every study of a collection into a submission with Ray Data batch inference."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from spine_ray.infer import infer as run_infer

    with Progress(TextColumn("scoring studies"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("infer", total=None)
        report = run_infer(data_dir, run, out_path, split, num_gpus, concurrency, on_study=lambda n, total: bar.update(task, completed=n, total=total))
    table = Table(title=f"inference: {data_dir} ({split}) → {out_path}", show_header=False)
    table.add_column("")
    table.add_column("", justify="right")
    for name, value in (
        ("studies", report.studies), ("fully predicted", report.fully_predicted),
        ("studies entirely from the prior", report.fallback_studies), ("targets from the prior", report.fallback_targets),
        ("time", f"{report.seconds:.1f} s ({report.studies / max(report.seconds, 1e-9):.2f} studies/s)"),
    ):
        table.add_row(name, str(value))
    out.print(table)
    for study, note in list(report.notes.items())[:10]:
        console.print(f"  study {study}: {note}", highlight=False, markup=False)


@app.command()
def demo(
    out_dir: str = typer.Option("runs/demo", "--out", help="Where everything goes (data, prepared, run, submission, summary.json)."),
    config: str = typer.Option("jobs/demo.yaml", "--config", help="Pipeline config of the demo."),
    studies: int = typer.Option(DemoConfig.studies, "--studies", help="Synthetic training studies."),
    test_studies: int = typer.Option(DemoConfig.test_studies, "--test-studies", help="Synthetic held-out test studies."),
    image_size: int = typer.Option(DemoConfig.image_size, "--image-size", help="Synthetic image size (pixels)."),
    blend_trials: int = typer.Option(DemoConfig.blend_trials, "--blend-trials", help="Blend evaluations per search."),
    overrides: list[str] = typer.Option([], "--set", help="Override a pipeline config value."),
    tracking_uri: str = typer.Option("", "--tracking-uri", help="MLflow tracking URI (a server, or file:/…); default: a file store RUN_DIR/mlruns."),
) -> None:
    """synthesise → prepare → train → tune-ensemble → infer → score → report, and print one table."""
    from spine_ray.demo import run_demo

    set_tracking_uri(tracking_uri)
    s = run_demo(out_dir, config, DemoConfig(studies, test_studies, image_size, blend_trials=blend_trials), tuple(overrides), say=console.print)
    table = Table(title=f"spine-ray demo ({out_dir}/summary.json)")
    table.add_column("")
    table.add_column("score", justify="right")
    table.add_column("on", justify="left")
    table.add_row("prior", f"{s['prior_cv']:.4f}", "out-of-fold, train")
    for name, v in s["members"].items():
        table.add_row(f"member {name}", f"{v:.4f}", "out-of-fold, train")
    table.add_row("blend", f"{s['blend_cv']:.4f}", f"out-of-fold, train (held-out halves {s['blend_cv_held_out']:.4f})")
    if s.get("oracle_cv") is not None:
        table.add_row("oracle", f"{s['oracle_cv']:.4f}", "train")
    table.add_row("prior", f"{s['prior']:.4f}", "held-out test studies")
    table.add_row("[bold]submission[/]", f"[bold]{s['test_score']:.4f}[/]", "held-out test studies")
    table.add_row("oracle", f"{s['oracle']:.4f}", "held-out test studies")
    table.add_row("gap closed", f"{s['gap_closed']:.0%}", "(prior − test) / (prior − oracle)")
    out.print(table)
    times = Table(title="time per step")
    for step in s["seconds"]:
        times.add_column(step, justify="right")
    times.add_column("total", justify="right")
    times.add_row(*(f"{v:.0f} s" for v in s["seconds"].values()), f"{sum(s['seconds'].values()):.0f} s")
    out.print(times)
    out.print(f"report: {s['report']}")


@app.command()
def report(
    run_dir: str = typer.Argument(..., help="A training run directory (cv.json, oof.parquet, localize/points.parquet, …); path or URL."),
    data: str = typer.Option("", "--data", help="The prepared volumes for the pictures (default: the run config's `prepared`)."),
    out_dir: str = typer.Option("", "--out", help="Where index.html and its images go (default: RUN_DIR/report)."),
    studies: int = typer.Option(ReportConfig.studies, "--studies", help="Pictures of this many worst and this many random studies."),
) -> None:
    """Write a static HTML report of a run: scores, confusion matrices, calibration, localisation, pictures, curves, blend."""
    from spine_ray.core.storage import join
    from spine_ray.report.build import build_report

    if studies < 0:
        raise typer.BadParameter("--studies must be ≥ 0")
    dest = out_dir or join(run_dir, "report")
    build_report(run_dir, dest, ReportConfig(studies=studies, data=data))
    out.print(f"report: {join(dest, 'index.html')}")


def main() -> None:
    """Entry point: user mistakes become one clear line and exit code 2, not a traceback."""
    try:
        app()
    except USER_ERRORS as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

__all__ = ["app", "main"]
