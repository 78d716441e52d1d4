"""The ``twotower`` command line: thin typer wrappers over the public functions of the package."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import typer

from twotower.config import ConfigError, load_config
from twotower.data.errors import DataError

app = typer.Typer(
    help="Two-tower recommenders: train, evaluate, recommend.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


def _print_metrics(metrics: dict) -> None:
    for key, value in metrics.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        typer.echo(f"  {key:<22} {shown}")


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="log more")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")


@app.command()
def train(
    config: Path = typer.Argument(..., help="run config (YAML)", exists=True, dir_okay=False),
    set_: list[str] = typer.Option([], "--set", help="override a key: --set train.epochs=5 (repeatable)"),
    run_dir: Path | None = typer.Option(None, "--run-dir", help="default: runs/<config name>-<time>"),
    resume: bool = typer.Option(False, "--resume", help="continue from the last checkpoint in --run-dir"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
) -> None:
    """Train a retrieval model and evaluate it on its protocol's test split."""
    from twotower.experiment import train_run

    if resume and run_dir is None:
        _fail("--resume needs --run-dir (the run to continue)")
    try:
        cfg = load_config(config, set_)
        run_dir = run_dir or Path("runs") / f"{config.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        metrics = train_run(cfg, run_dir, resume=resume, progress=not quiet)
    except (ConfigError, DataError, FileNotFoundError) as exc:
        _fail(str(exc))
        return
    typer.echo(f"run directory: {run_dir}")
    _print_metrics(metrics)


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="a run directory written by `twotower train`", exists=True),
    protocol: str | None = typer.Option(None, help="msrec, tfrs or temporal; default: the run's own"),
) -> None:
    """Evaluate a trained run again (full corpus, the run's protocol unless --protocol)."""
    from twotower.recommender import evaluate_run

    try:
        metrics = evaluate_run(run_dir, protocol)
    except (ConfigError, DataError, FileNotFoundError, KeyError, ValueError) as exc:
        _fail(str(exc))
        return
    _print_metrics(metrics)


@app.command()
def recommend(
    run_dir: Path = typer.Argument(..., help="a run directory written by `twotower train`", exists=True),
    user: list[str] = typer.Option(..., "--user", "-u", help="raw user id (repeatable)"),
    k: int = typer.Option(10, "-k", min=1, help="how many items"),
    include_seen: bool = typer.Option(False, "--include-seen", help="keep the user's training items"),
) -> None:
    """Top-k items for users: ids, scores and titles where the data has them."""
    from twotower.recommender import Retriever, UnknownUserError

    try:
        retriever = Retriever.load(run_dir)
        ids, scores = retriever.recommend(user, k=k, exclude_seen=not include_seen)
    except (UnknownUserError, FileNotFoundError) as exc:
        _fail(str(exc.args[0]) if exc.args else str(exc))
        return
    for row, user_id in enumerate(user):
        typer.echo(f"user {user_id}:")
        titles = retriever.titles(ids[row])
        for rank, (item, score, title) in enumerate(zip(ids[row], scores[row], titles, strict=True), 1):
            if item is None:
                continue
            typer.echo(f"  {rank:>3}. {item!s:<10} {score:8.4f}  {title or ''}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="where the demo run is written"),
    quick: bool = typer.Option(False, "--quick", help="a smaller world and fewer epochs (seconds)"),
) -> None:
    """Train on a synthetic world with a planted structure, compare with popularity, show recommendations."""
    from twotower.demo import run_demo

    summary = run_demo(out, quick=quick, echo=typer.echo)
    if not summary["beats_popularity"]:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    app()
