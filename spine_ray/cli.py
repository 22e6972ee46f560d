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


@app.command()
def synth(
    out_dir: str = typer.Argument(..., help="Where to write the dataset (path or URL); Kaggle layout."),
    studies: int = typer.Option(None, "--studies", help="Number of training studies [default: 100]."),
    seed: int = typer.Option(None, "--seed", help="Seed; the same seed gives the same bytes [default: 0]."),
    test_studies: int = typer.Option(None, "--test-studies", help="Held-out studies (test_images, test_labels.csv, oracle) [default: 0]."),
    image_size: str = typer.Option(None, "--image-size", help="Image size in pixels, or a comma list drawn per series, e.g. 384,512,640 [default: 256]."),
    quirks: float = typer.Option(None, "--quirks", help="Fraction of series given one quirk [default: 0, clean data]."),
    quirk_kinds: str = typer.Option(None, "--quirk-kinds", help="Comma list of quirks to draw from [default: all of monochrome1, rescale, explicit, implicit, deflated, mixed_sizes, non_image, truncated]."),
    config: str = typer.Option(None, "--config", help="YAML SynthConfig; the flags above override it."),
    workers: int = typer.Option(0, "--workers", help="0 = automatic (in-process below 8 studies, else Ray), 1 = in-process."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a finished dataset at OUT."),
) -> None:
    """Write a synthetic dataset with known labels, coordinates and the Bayes-optimal oracle."""
    from spine_ray.config import load
    from spine_ray.synth.generate import generate
    from spine_ray.synth.study import SynthConfig

    flags = {"studies": studies, "test_studies": test_studies, "seed": seed, "quirks": quirks}
    overrides = [f"{k}={v}" for k, v in flags.items() if v is not None]
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
