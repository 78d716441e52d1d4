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
        if value is None:  # e.g. best_epoch without early stopping: nothing to say, not "None"
            continue
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
    nproc: int = typer.Option(
        1, "--nproc", min=1, help="training processes on this machine (several machines: torchrun, README)"
    ),
) -> None:
    """Train a retrieval model and evaluate it on its protocol's test split.

    Also runs as each process of `torchrun ... -m twotower.cli train CONFIG` (RANK / WORLD_SIZE set):
    every process trains its shard of each batch, rank 0 writes the run and prints the metrics."""
    from twotower import distributed
    from twotower.experiment import train_run

    if resume and run_dir is None:
        _fail("--resume needs --run-dir (the run to continue)")
    if nproc > 1 and distributed.launched():
        _fail("--nproc starts its own processes: leave it out under torchrun")
    try:
        cfg = load_config(config, set_)  # validated before any process starts: one clear error
        run_dir = run_dir or Path("runs") / f"{config.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        if nproc > 1:
            args = ["train", str(config), *(f"--set={item}" for item in set_), f"--run-dir={run_dir}"]
            args += (["--resume"] if resume else []) + (["--quiet"] if quiet else [])
            _launch_local(nproc, args)
            return
        owned = distributed.init_from_env()
        try:
            main = distributed.is_main()
            # Under torchrun the default name holds a time stamp: every rank takes rank 0's.
            run_dir = Path(distributed.broadcast_json(str(run_dir)))
            metrics = train_run(cfg, run_dir, resume=resume, progress=not quiet)
        finally:
            distributed.teardown(owned)
    except (ValueError, OSError) as exc:
        # ValueError covers ConfigError, DataError, an unreadable checkpoint ("delete ... or train
        # without resume"); OSError a --run-dir that is a file or not writable: messages, no tracebacks.
        _fail(str(exc))
        return
    except KeyError as exc:  # e.g. an early-stopping metric the protocol does not compute
        _fail(str(exc.args[0]) if exc.args else repr(exc))
        return
    if main:
        typer.echo(f"run directory: {run_dir}")
        _print_metrics(metrics)


def _launch_local(nproc: int, argv: list[str]) -> None:
    """``twotower <argv>`` in ``nproc`` local processes through torchrun's launcher (``--standalone``:
    its rendezvous on a free loopback port); fails when any of them does."""
    import os

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser
    from torch.distributed.run import run as torchrun

    # The processes share the cores: without this each would start one intra-op thread per core.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    launch = ["--standalone", f"--nproc-per-node={nproc}", "--module", "twotower.cli", *argv]
    try:
        torchrun(get_args_parser().parse_args(launch))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        _fail(f"training process {rank} failed with exit code {failure.exitcode} (its error is above)")


@app.command()
def evaluate(
    run_dir: Path = typer.Argument(..., help="a run directory written by `twotower train`", exists=True),
    protocol: str | None = typer.Option(None, help="msrec, tfrs or temporal; default: the run's own"),
) -> None:
    """Evaluate a trained run again (full corpus, the run's protocol unless --protocol)."""
    from twotower.recommender import evaluate_run

    try:
        metrics = evaluate_run(run_dir, protocol)
    except KeyError as exc:  # an unknown --protocol: str() of a KeyError would quote its message
        _fail(str(exc.args[0]) if exc.args else repr(exc))
        return
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
        return
    _print_metrics(metrics)


def _index_config(backend: str | None, options: list[str]):
    """An IndexConfig from --index and --index-option key=value (validated: a misspelt key is an error)."""
    if backend is None and not options:
        return None
    import yaml

    from twotower.config import parse_config
    from twotower.index import IndexConfig

    raw: dict = {} if backend is None else {"backend": backend}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep:
            raise ValueError(f"--index-option {option!r}: expected key=value")
        try:
            raw[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as exc:  # a ValueError the commands report, not a parser traceback
            raise ValueError(f"--index-option {option!r}: the value is not valid YAML: {exc}") from None
    return parse_config(raw, "--index/--index-option", IndexConfig)


def _pairs(values: list[str], flag: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for value in values:
        key, sep, rest = value.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} {value!r}: expected name=value")
        out.setdefault(key, []).append(rest)
    return out


@app.command()
def recommend(
    path: Path = typer.Argument(
        ..., help="a run directory (exported on first use) or an export", exists=True
    ),
    user: list[str] = typer.Option([], "--user", "-u", help="user id (repeatable); unknown ids: cold start"),
    feature: list[str] = typer.Option([], "--feature", help="raw user feature name=value, for cold start"),
    history: list[str] = typer.Option([], "--history", help="a recent item id, oldest first (repeatable)"),
    item_filter: list[str] = typer.Option([], "--filter", help="item metadata column=value (repeatable)"),
    k: int = typer.Option(10, "-k", min=1, max=1000, help="how many items"),
    include_seen: bool = typer.Option(False, "--include-seen", help="keep the user's training items"),
    no_rerank: bool = typer.Option(
        False, "--no-rerank", help="retrieval order even when the run has a ranker"
    ),
    as_json: bool = typer.Option(False, "--json", help="print the service's JSON answer"),
) -> None:
    """Top-k items through the same pipeline as `twotower serve`: ids, scores and item metadata."""
    from pydantic import ValidationError

    from twotower.pipeline import RecommendRequest, RequestError, load_pipeline  # no FastAPI needed

    try:
        pipeline = load_pipeline(path)
        features = {name: values[-1] for name, values in _pairs(feature, "--feature").items()}
        filters = _pairs(item_filter, "--filter")
        answers = []
        for user_id in user or [None]:
            request = RecommendRequest(
                user_id=user_id, features=features or None, history=history, k=k,
                exclude_seen=not include_seen, filters=filters or None, rerank=not no_rerank,
            )  # fmt: skip
            answers.append(pipeline.recommend(request))
    except (RequestError, ValidationError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
        return
    for answer in answers:
        if as_json:
            typer.echo(answer.model_dump_json())
            continue
        how = "cold start" if answer.path == "cold_start" else "known user"
        typer.echo(f"user {answer.user_id if answer.user_id is not None else '(features only)'} ({how}):")
        if answer.ignored_history:
            typer.echo(f"  (history items not in the catalogue, ignored: {answer.ignored_history})")
        for rank, item in enumerate(answer.items, 1):
            title = item.metadata.get("title") or ""
            typer.echo(f"  {rank:>3}. {item.item_id!s:<10} {item.score:8.4f}  {title}")


@app.command("train-ranker")
def train_ranker(
    run_dir: Path = typer.Argument(..., help="a retrieval run directory", exists=True, file_okay=False),
    impressions: Path = typer.Argument(..., help="impression log (CSV/TSV/Parquet)", exists=True),
    config: Path | None = typer.Option(None, "--config", help="ranker config (YAML); default: defaults"),
    set_: list[str] = typer.Option([], "--set", help="override a key: --set train.epochs=3 (repeatable)"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
    light: bool = typer.Option(
        False, "--light", help="train the light ranker (between retrieval and ranker)"
    ),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted training (its checkpoint)"),
) -> None:
    """Train the run's debiased ranker (relevance + bias towers) on a logged impression file."""
    from twotower.reranker import RunRanker, RunRankerConfig, train_run_ranker

    try:
        cfg = load_config(config, set_, model=RunRankerConfig)
        stage = "light_ranker" if light else "ranker"
        summary = train_run_ranker(run_dir, impressions, cfg, progress=not quiet, stage=stage, resume=resume)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
        return
    typer.echo(f"ranker: {summary['ranker_dir']}")
    _print_metrics({k: v for k, v in summary.items() if k != "ranker_dir"})
    ranker = RunRanker.load(run_dir, stage)
    if ranker is not None and ranker.examination_curve:
        typer.echo("learned examination, relative to position 1:")
        for context, curve in ranker.examination_curve.items():
            typer.echo(f"  {context:<10} " + " ".join(f"{v:.2f}" for v in curve))


@app.command()
def align(
    run_dir: Path = typer.Argument(..., help="a run with a ranker", exists=True, file_okay=False),
    out: Path = typer.Option(..., "--out", help="the new, aligned run directory (must not exist)"),
    impressions: Path | None = typer.Option(
        None, "--impressions", exists=True, help="also train on this log's clicks (debiased labels)"
    ),
    config: Path | None = typer.Option(None, "--config", help="align config (YAML); default: defaults"),
    set_: list[str] = typer.Option([], "--set", help="e.g. --set align.alignment.reward_weight=1"),
    quiet: bool = typer.Option(False, "--quiet", help="no progress bar"),
) -> None:
    """Fine-tune the run's retrieval towards its main ranker (distillation / ranker as reward) into --out."""
    from twotower.align_run import AlignRunConfig, align_run

    try:
        cfg = load_config(config, set_, model=AlignRunConfig)
        summary = align_run(run_dir, out, cfg, impressions, progress=not quiet)
    except (ConfigError, DataError, FileExistsError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
        return
    counts = f"{summary['positives']:,} positives, {summary['click_positives']:,} clicks"
    typer.echo(f"aligned run: {out} ({counts})")
    for record in summary["history"]:
        typer.echo("  " + "  ".join(f"{k} {v:.4g}" for k, v in record.items()))
    typer.echo(f"next: `twotower evaluate {out}`, then `twotower train-ranker {out} LOG` (its rankers)")


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="a run directory written by `twotower train`", exists=True),
    out: Path | None = typer.Option(None, "--out", help="default: RUN_DIR/export"),
    index: str | None = typer.Option(None, "--index", help="exact, faiss-flat, faiss-hnsw or faiss-ivfpq"),
    index_option: list[str] = typer.Option([], "--index-option", help="e.g. ef_search=128 (repeatable)"),
    onnx: bool = typer.Option(False, "--onnx", help="also write query_tower.onnx (checked vs PyTorch)"),
) -> None:
    """Export a trained run for serving: towers, item embeddings, the index, ids, vocabularies."""
    from pydantic import ValidationError

    from twotower.export import export_run, load_export

    try:
        target = export_run(run_dir, out, _index_config(index, index_option), onnx=onnx)
    except (ValidationError, OSError, ValueError, ImportError) as exc:
        _fail(str(exc))
        return
    manifest = load_export(target).manifest
    report = manifest["index"]["report"]
    typer.echo(f"export: {target}")
    typer.echo(f"  items {manifest['num_items']}, dim {manifest['embedding_dim']}, {manifest['similarity']}")
    recall = report.get("recall_at_k")
    typer.echo(f"  index {manifest['index']['backend']}: recall@{report.get('k')} vs exact {recall}")
    typer.echo(f"  ranker: {'yes' if manifest['ranker'] else 'no'}")


@app.command()
def serve(
    path: Path = typer.Argument(
        ..., help="a run directory (exported on first use) or an export", exists=True
    ),
    host: str = typer.Option("127.0.0.1", help="interface to bind"),
    # Bounded: uvicorn takes 99999 modulo 65536 and listens where the announced URL does not point.
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port"),
    retrieve_n: int | None = typer.Option(
        None,
        "--retrieve-n",
        min=1,
        help="candidates from the index (default 500 with a light ranker, else 100)",
    ),
    light_n: int = typer.Option(100, "--light-n", min=1, help="candidates the light ranker passes on"),
    threads: int = typer.Option(1, "--threads", min=1, help="torch threads per request"),
    index: str | None = typer.Option(None, "--index", help="index backend when the run is exported now"),
    no_reload: bool = typer.Option(False, "--no-reload", help="disable POST /admin/reload"),
    workers: int = typer.Option(1, "--workers", min=1, help="server processes (one core each)"),
) -> None:
    """Serve POST /recommend, GET /healthz and GET /metrics over HTTP (FastAPI + uvicorn)."""
    from twotower.serve import serve as run_server

    try:
        typer.echo(f"serving {path} on http://{host}:{port}")
        run_server(
            path,
            host,
            port,
            retrieve_n,
            _index_config(index, []),
            threads,
            not no_reload,
            workers=workers,
            light_n=light_n,
        )
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="a run directory", exists=True, file_okay=False),
    out: Path | None = typer.Option(None, "--out", help="default: RUN_DIR/report.html"),
) -> None:
    """Write RUN_DIR/report.html (training curves, recall@K, examination curves) and print the headline."""
    from twotower.report import build_report, summary_table

    try:
        path = build_report(run_dir, out)
    except (OSError, ValueError, TypeError) as exc:  # OSError: an --out that cannot be written
        _fail(str(exc))
        return
    typer.echo(summary_table(run_dir))
    typer.echo(f"report: {path}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="where the demo run is written"),
    quick: bool = typer.Option(False, "--quick", help="a smaller world and fewer epochs (seconds)"),
) -> None:
    """Train on a synthetic world with a planted structure, compare with popularity, show recommendations."""
    from twotower.demo import run_demo

    if out.exists() and not out.is_dir():  # before minutes of work, not after the world is built
        _fail(f"--out {out} is a file: the demo writes a run directory")
    try:
        summary = run_demo(out, quick=quick, echo=typer.echo)
    except OSError as exc:  # an --out that is a file or cannot be written: a message, no traceback
        _fail(str(exc))
        return
    if not summary["beats_popularity"]:
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    app()
