"""The fit loop every twotower model trains with.

A model is any ``nn.Module`` with ``compute_loss(batch: dict[str, Tensor]) -> Tensor``. ``fit``
runs epochs over the batches a callable yields for each epoch, shows a progress bar with the loss and
examples/s, validates after each epoch, writes a checkpoint per epoch (safetensors + JSON, never
pickle), stops early when the validation metric stops improving, and resumes from the last checkpoint.

Resuming ends at the same result as an uninterrupted run because everything random is either
re-derived from (seed, epoch) - batch order - or saved in the checkpoint: the torch RNG state (dropout),
the optimizer state and every module buffer (e.g. the streaming frequency sketch).

One code path for one and several processes (``twotower.distributed``; a process group exists, e.g.
under torchrun): every rank iterates the same global batches and trains on its shard of each under
DDP; the loss shown is the global batch's; rank 0 alone validates, writes checkpoints (with every
rank's RNG state) and shows progress, and every rank continues from rank 0's epoch record, so all return
the same result. Resuming loads the same checkpoint on every rank and each rank's own RNG state; the
run directory must therefore be visible to every rank (one machine, or a shared filesystem).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor, nn
from tqdm.auto import tqdm

from twotower import distributed
from twotower.config import TrainConfig
from twotower.storage import load_tensors, read_json, save_tensors, write_json

log = logging.getLogger("twotower.train")

Batches = Callable[[int], Iterable[dict[str, Tensor]]]
Validate = Callable[[], dict[str, float]]


@dataclass
class FitResult:
    epochs_run: int
    best_epoch: int | None
    best_metric: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    examples_per_s: float = 0.0


def _sparse_gradients(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse for m in model.modules())


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernels update every parameter in one pass instead of a dozen elementwise passes per
    # tensor (AdamW on the ML-100K model: 0.4 ms a step instead of 5.8 ms on 2 cores); they take dense
    # gradients only, so tables with sparse gradients keep the per-tensor implementation.
    fused = None if _sparse_gradients(model) else True
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    # Adagrad is the classic choice for sparse embedding tables (per-row adaptive learning rates).
    return torch.optim.Adagrad(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)


def fit(
    model: nn.Module,
    batches: Batches,
    config: TrainConfig,
    run_dir: Path,
    validate: Validate | None = None,
    resume: bool = False,
    progress: bool = True,
    batches_per_epoch: int | None = None,
) -> FitResult:
    """Train ``model`` in place; on return it holds the best weights when early stopping is on.

    With several processes every rank calls ``fit`` with the same arguments (``validate`` is only
    called on rank 0) and gets the same result. With ``resume`` it continues from the last checkpoint
    in ``run_dir`` (if any), with the configured lr and weight decay. An epoch whose validation metric
    is not finite (NaN: no user could be evaluated) never counts as an improvement.
    """
    run_dir = Path(run_dir)
    ckpt_dir = run_dir / "checkpoints"
    distributed.ensure_groups()
    main, world = distributed.is_main(), distributed.world_size()
    device = next(model.parameters()).device
    optimizer = make_optimizer(model, config)
    stopping = config.early_stopping if validate is not None else None
    state: dict[str, Any] = {
        "epoch": 0,
        "global_step": 0,
        "history": [],
        "best_metric": None,
        "best_epoch": None,
        "bad_epochs": 0,
        "stopped": False,
    }
    resuming = resume and (ckpt_dir / "last.json").exists()
    if not resuming and main:
        # A fresh run into a directory that holds another run's checkpoint: its commit record goes now,
        # not after this run's first epoch - or a --resume after an interruption before then would
        # continue that other run (under this run's config.yaml). Its files go at the first checkpoint.
        (ckpt_dir / "last.json").unlink(missing_ok=True)
    if resuming:
        state = load_checkpoint(ckpt_dir / "last", model, optimizer, seed=config.seed)
        # load_state_dict put the checkpoint's lr / weight decay back into the param groups. This loop
        # has no schedule that changes them, so they can only differ from the config when the config
        # was changed for the resumed run: the configured values win (unchanged config: a no-op).
        for group in optimizer.param_groups:
            group.update(lr=config.lr, weight_decay=config.weight_decay)
        _resume_early_stopping(state, stopping)
        if main:
            log.info("resumed from %s at epoch %d", ckpt_dir, state["epoch"])
    elif not main:
        # Each rank its own RNG stream (dropout, sampled negatives); rank 0 keeps the caller's, so one
        # process trains exactly as it always has.
        torch.manual_seed(distributed.rank_seed(config.seed))
    step_loss = distributed.loss_module(model)  # forward(batch) = loss; DDP with several processes

    start = time.perf_counter()
    examples_seen = 0
    while state["epoch"] < config.epochs and not state["stopped"]:
        epoch = state["epoch"] + 1
        model.train()
        loss_sum, n_batches, n_examples, t0 = 0.0, 0, 0, time.perf_counter()
        epoch_batches = batches(epoch)
        bar = tqdm(
            epoch_batches,
            desc=f"epoch {epoch}/{config.epochs}",
            total=batches_per_epoch,  # the bar's length and time left; None: a count only
            disable=None if progress and main else True,  # None: a terminal only (no \r heaps in logs)
            leave=False,
            unit="batch",
        )
        try:
            for batch in bar:
                rows = len(next(iter(batch.values())))
                if rows < world:  # a tail batch too small to give every rank a row: skipped on all ranks
                    continue
                local = distributed.shard(batch)
                if device.type != "cpu":
                    local = {key: value.to(device, non_blocking=True) for key, value in local.items()}
                loss = step_loss(local)
                # The global batch's loss, the same on every rank: a divergence stops every rank at once.
                value = distributed.mean_over_ranks(loss.detach())
                if not torch.isfinite(value):
                    raise FloatingPointError(
                        f"loss is {value.item()} at epoch {epoch}, step {state['global_step']}"
                    )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                state["global_step"] += 1
                loss_sum += value.item()
                n_batches += 1
                n_examples += rows
                if n_batches % 10 == 0:
                    rate = n_examples / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{loss_sum / n_batches:.4f}", ex_s=f"{rate:,.0f}")
        finally:
            # Left by an error or an interrupt: close the epoch's iterator now (a prefetching one stops
            # and joins its thread), not whenever the traceback that holds it is collected.
            bar.close()
            close = getattr(epoch_batches, "close", None)
            if close is not None:
                close()
        if n_batches == 0:  # the same on every rank: they all see the same batches
            raise ValueError(
                f"epoch {epoch} produced no training batch: the training data is empty or smaller "
                f"than one batch of at least {max(world, 2)} rows"
            )
        seconds = time.perf_counter() - t0
        examples_seen += n_examples
        record: dict[str, Any] = {
            "epoch": epoch,
            "loss": loss_sum / max(n_batches, 1),
            "examples_per_s": n_examples / max(seconds, 1e-9),
            "seconds": seconds,
        }
        if main:  # the other ranks wait in from_main below
            if validate is not None:
                model.eval()
                with torch.no_grad():  # a validate callback need not remember to turn autograd off
                    record.update({f"valid_{k}": v for k, v in validate().items()})
            state["history"].append(record)
            state["epoch"] = epoch
            if stopping is not None:
                _update_early_stopping(state, record, stopping.metric, stopping.patience, model, ckpt_dir)
            log.info("epoch %d: %s", epoch, _format_record(record))
            if progress:
                tqdm.write(f"epoch {epoch}: {_format_record(record)}")
        # Rank 0's record and early-stopping decision, on every rank (the object itself with one process).
        state = distributed.from_main(state)
        save_checkpoint(ckpt_dir / "last", model, optimizer, state)

    restored = stopping is not None and state["best_epoch"] is not None
    if restored:
        model.load_state_dict(load_tensors(_best_weights(ckpt_dir, state["best_epoch"])))
    elapsed = time.perf_counter() - start
    return FitResult(  # a best epoch only when its weights are the ones returned (not: resumed without)
        epochs_run=state["epoch"],
        best_epoch=state["best_epoch"] if restored else None,
        best_metric=state["best_metric"] if restored else None,
        history=state["history"],
        seconds=elapsed,
        examples_per_s=examples_seen / max(elapsed, 1e-9),
    )


def _resume_early_stopping(state: dict[str, Any], stopping: Any) -> None:
    """Make a checkpoint's early-stopping state fit the resumed run's setting.

    The best value is forgotten when the run now watches another metric (comparing a recall with an
    ndcg would be meaningless; a checkpoint that does not name its metric keeps its best). Whether
    training had stopped is decided again: a run resumed without early stopping, or with more
    patience than its bad epochs, trains on instead of ending at once.
    """
    saved = state.get("best_metric_name")
    if stopping is not None and saved is not None and saved != stopping.metric:
        log.warning(
            "early stopping now watches %s, not %s: its best so far is forgotten", stopping.metric, saved
        )
        state.update(best_metric=None, best_epoch=None, bad_epochs=0, best_metric_name=stopping.metric)
    state["stopped"] = stopping is not None and state["bad_epochs"] >= stopping.patience


def _update_early_stopping(
    state: dict[str, Any],
    record: dict[str, Any],
    metric: str,
    patience: int,
    model: nn.Module,
    ckpt_dir: Path,
) -> None:
    """Record ``record``'s validation ``metric`` (higher is better) in ``state``: a finite improvement
    saves the weights as the best; otherwise a bad epoch is counted, and ``patience`` of them stop."""
    key = f"valid_{metric}"
    if key not in record:
        raise KeyError(
            f"early stopping metric {metric!r} is not among the validation metrics {sorted(record)}"
        )
    value, best = float(record[key]), state["best_metric"]
    # A non-finite value (compute_metrics gives NaN when no user can be evaluated) is never an
    # improvement, and a non-finite best (one saved by an older version) gives way to the first finite
    # value: `value > nan` is always False, so a NaN best would otherwise win every comparison.
    if not math.isfinite(value):
        log.warning("epoch %d: validation %s is %s, not an improvement", record["epoch"], metric, value)
        improved = False
    else:
        improved = best is None or not math.isfinite(best) or value > best
    state["best_metric_name"] = metric  # what best_metric is a value of, for a resumed run to check
    if improved:
        state.update(best_metric=value, best_epoch=record["epoch"], bad_epochs=0)
        # A file of its own per best epoch: the committed checkpoint's best epoch keeps its weights
        # until the JSON naming the new best is written (save_checkpoint then removes the old file).
        save_tensors(_best_path(ckpt_dir, record["epoch"]), model.state_dict())
    else:
        state["bad_epochs"] += 1
        if state["bad_epochs"] >= patience:
            log.info("early stop: %s did not improve for %d epochs", metric, patience)
            state["stopped"] = True


def _best_path(ckpt_dir: Path, epoch: int) -> Path:
    return ckpt_dir / f"best-epoch{epoch:04d}.safetensors"


def _best_weights(ckpt_dir: Path, epoch: int) -> Path:
    """The weights of best epoch ``epoch``: its own file, or ``best.safetensors`` as older versions
    wrote it (one file, overwritten by every improvement)."""
    path = _best_path(ckpt_dir, epoch)
    legacy = ckpt_dir / "best.safetensors"
    return legacy if not path.exists() and legacy.exists() else path


def _format_record(record: dict[str, Any]) -> str:
    parts = []
    for key, value in record.items():
        if key == "epoch":
            continue
        parts.append(
            f"{key}={value:.4g}" if isinstance(value, float) and math.isfinite(value) else f"{key}={value}"
        )
    return " ".join(parts)


# --- checkpoints -------------------------------------------------------------------------------


def save_checkpoint(prefix: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Write ``prefix-epochNNNN.safetensors`` (weights, optimizer tensors, RNG) and ``prefix.json``.

    The JSON is the commit record and names its tensors file: each epoch writes a new tensors file
    first, then the JSON, then deletes older tensors files and best weights (``best-epochNNNN``) of
    epochs the JSON does not name as the best. A crash at any point leaves a JSON that points at a
    complete tensors file of the same epoch, and at its best epoch's weights. With several processes
    every rank calls it: the ranks' RNG states are gathered (``rng.torch`` is rank 0's,
    ``rng.torch.rankR`` rank R's), rank 0 writes - weights and optimizer state are the same on every
    rank - and the others wait until it has.
    """
    rng = _rng_states(model)
    if distributed.is_main():
        prefix.parent.mkdir(parents=True, exist_ok=True)
        tensors_name = f"{prefix.name}-epoch{state['epoch']:04d}.safetensors"
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        optim_tensors, optim_json = _split_optimizer_state(optimizer.state_dict())
        tensors.update({f"optim.{k}": v for k, v in optim_tensors.items()})
        tensors.update(rng)
        save_tensors(prefix.parent / tensors_name, tensors)
        meta = {**state, "tensors": tensors_name, "optimizer": optim_json}
        write_json(prefix.with_suffix(".json"), {**meta, "world_size": distributed.world_size()})
        for old in prefix.parent.glob(f"{prefix.name}-epoch*.safetensors"):
            if old.name != tensors_name:
                old.unlink(missing_ok=True)
        # Best weights of epochs the committed JSON no longer names as the best (older ones, or one
        # written by an epoch that a crash kept from being committed).
        best = state.get("best_epoch")
        keep = _best_weights(prefix.parent, best).name if best is not None else None
        for old in [*prefix.parent.glob("best-epoch*.safetensors"), prefix.parent / "best.safetensors"]:
            if old.name != keep:
                old.unlink(missing_ok=True)
        # Temp files of writes that a crash interrupted (one checkpoint writer per run directory).
        for pattern in (f".{prefix.name}-epoch*.safetensors.*.tmp", ".best-epoch*.safetensors.*.tmp"):
            for stale in prefix.parent.glob(pattern):
                stale.unlink(missing_ok=True)
    distributed.barrier()


def load_checkpoint(
    prefix: Path, model: nn.Module, optimizer: torch.optim.Optimizer, seed: int = 0
) -> dict[str, Any]:
    """Load weights, optimizer state and this rank's RNG state; returns the training state (JSON).

    A damaged (e.g. truncated) ``prefix.json`` or tensors file raises a ValueError naming it.
    """
    meta = _read_checkpoint_file(prefix.with_suffix(".json"), read_json)
    tensors = _read_checkpoint_file(prefix.parent / meta.pop("tensors"), load_tensors)
    meta.pop("world_size", None)
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optim = {k[6:]: v for k, v in tensors.items() if k.startswith("optim.")}
    optimizer.load_state_dict(_join_optimizer_state(optim, meta.pop("optimizer")))
    rank = distributed.rank()
    key = "rng.torch" if rank == 0 else f"rng.torch.rank{rank}"
    if key in tensors:
        torch.set_rng_state(tensors[key])
    else:  # resumed on more processes than were saved: this rank starts a stream of its own
        log.warning("checkpoint %s has no RNG state for rank %d: reseeding it", prefix, rank)
        torch.manual_seed(distributed.rank_seed(seed + int(meta["epoch"])))
    device = next(model.parameters()).device
    if device.type == "cuda" and f"rng.cuda.rank{rank}" in tensors:
        torch.cuda.set_rng_state(tensors[f"rng.cuda.rank{rank}"], device)
    return meta


def _read_checkpoint_file(path: Path, read: Callable[[Path], Any]) -> Any:
    """``read(path)``, with a damaged file's bare parser error (JSONDecodeError, SafetensorError:
    neither says which file) turned into one that names the file and the way out. OS errors (a
    missing file, no permission) name the file already and pass through unchanged."""
    try:
        return read(path)
    except (ValueError, SafetensorError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(
            f"checkpoint {path} is unreadable ({err}); delete {path.parent} or train without resume"
        ) from err


def _rng_states(model: nn.Module) -> dict[str, Tensor]:
    """Every rank's RNG state (collective): the CPU generator's, and the GPU's when training on one."""
    states = distributed.all_gather_cpu(torch.get_rng_state())
    out = {("rng.torch" if r == 0 else f"rng.torch.rank{r}"): s for r, s in enumerate(states)}
    device = next(model.parameters()).device
    if device.type == "cuda":
        cuda = distributed.all_gather_cpu(torch.cuda.get_rng_state(device))
        out.update({f"rng.cuda.rank{r}": s for r, s in enumerate(cuda)})
    return out


def _split_optimizer_state(sd: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Optimizer state -> flat tensors ``"{param}.{key}"`` + JSON (param groups, scalar entries)."""
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"{pid}.{key}"] = value
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    for pid, entries in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}
