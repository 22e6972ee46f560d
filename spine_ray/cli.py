"""The `spine-ray` command line. Each command is a few lines that call into the package."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from spine_ray.config import ConfigError
from spine_ray.schema import SchemaError
from spine_ray.storage import StorageError

app = typer.Typer(
    help="Lumbar-spine MRI degenerative grading (RSNA 2024) on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

USER_ERRORS = (SchemaError, ConfigError, StorageError, FileNotFoundError)


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
    from spine_ray.metric import score_frames
    from spine_ray.schema import read_labels, read_submission

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
    from spine_ray.baseline import run_baseline, write_prior
    from spine_ray.schema import read_labels, submission_frame, write_submission
    from spine_ray.storage import atomic_write_bytes, join

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
    shard_mb: float = typer.Option(128.0, "--shard-mb", help="Target pixels per Parquet shard, MB (before zstd)."),
) -> None:
    """Decode every DICOM series into Parquet volumes, labels and an errors table (resumable)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from spine_ray.ingest import prepare

    with Progress(TextColumn("decoding series"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("decode", total=None)
        summary = prepare(data_dir, out_dir, split, workers, shard_mb, on_progress=lambda n, total: bar.update(task, completed=n, total=total))
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


def main() -> None:
    """Entry point: user mistakes become one clear line and exit code 2, not a traceback."""
    try:
        app()
    except USER_ERRORS as e:
        console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)


if __name__ == "__main__":
    main()

__all__ = ["app", "main", "Path"]
