"""Several training processes, one code path: torch.distributed helpers (DDP; gloo on CPU, nccl on GPU).

N processes ("ranks") train on the same sequence of GLOBAL batches as one process would: every rank
builds each global batch (its order depends only on (seed, epoch)) and keeps its contiguous shard of
rows (``shard``), so N processes with the same global batch size solve the same optimisation problem
as one. Every helper here is the identity, or does nothing, when there is a single process (no process
group, or a group of one): the fit loop and the retrieval task call them unconditionally.

Two extra process groups are created beside the default one (``ensure_groups``): ``gather``, for the
task's cross-rank gathers, so that their collectives (the gather's backward runs inside
``loss.backward()``) never interleave with DDP's gradient buckets on the same group; and ``cpu`` (gloo),
for control messages (JSON, RNG states, barriers) that stay on the CPU even when training uses nccl.

``gather_rows(..., grad=True)`` is an all-gather that keeps gradients: the backward of a gather is a
sum over ranks of the output gradient, restricted to this rank's rows (a reduce-scatter, done here as
an all-reduce so it works on gloo with uneven row counts). With each rank's loss scaled so that the mean
over ranks is the global-batch loss (``Shards.loss_scale``), DDP's gradient AVERAGE then equals the
gradient of the global-batch loss: see ``twotower.tasks`` for the derivation.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from twotower.storage import _json_default

log = logging.getLogger("twotower.distributed")

__all__ = [
    "Shards",
    "active",
    "all_gather_cpu",
    "barrier",
    "batch_shards",
    "broadcast_json",
    "ensure_groups",
    "from_main",
    "gather_rows",
    "init",
    "init_from_env",
    "is_main",
    "launched",
    "local_device",
    "loss_module",
    "mean_over_ranks",
    "rank",
    "rank_seed",
    "regroup",
    "shard",
    "split_count",
    "teardown",
    "world_size",
]

# "gather", "cpu", "wait" and "owner" (the default group they were created for)
_groups: dict[str, Any] = {}
# How long the other ranks wait for rank 0's own work (``from_main``): per-epoch validation and the final
# full-corpus evaluation, which on a large catalogue can outlast the collectives' timeout (30 min) and
# must not kill the job. A rank that dies is still noticed at once (its sockets close; torchrun stops
# the others); a rank that hangs elsewhere is still caught after ``init``'s ``timeout_s``.
WAIT_FOR_MAIN_S = 24 * 3600.0
_timeouts: dict[str, float] = {}  # "train" and "wait", as ``init`` was given them


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def is_main() -> bool:
    """Rank 0: the process that validates, evaluates, writes files and shows progress."""
    return rank() == 0


def launched() -> bool:
    """Started by torchrun (or anything that sets its environment): RANK and WORLD_SIZE are set."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def local_device(device: torch.device | str = "cpu") -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` for CUDA (one GPU per local process), else ``device``."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init(
    rank: int | None = None,
    world_size: int | None = None,
    *,
    device: torch.device | str = "cpu",
    init_method: str = "env://",
    timeout_s: float = 1800.0,
    wait_for_main_s: float = WAIT_FOR_MAIN_S,
) -> bool:
    """Join the process group (torchrun's environment by default); True when this call created it.

    gloo for CPU training, nccl for CUDA. ``timeout_s`` bounds every collective but one: the other
    ranks' wait for rank 0's validation or evaluation (``from_main``), bounded by ``wait_for_main_s``.
    A process group that already exists is left as it is (the caller owns it) and False is returned,
    so ``teardown`` only ever destroys what ``init`` created.
    """
    _timeouts.update(train=timeout_s, wait=wait_for_main_s)
    if active():
        ensure_groups()
        return False
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_device(device))
    kwargs: dict[str, Any] = {}
    if rank is not None:
        kwargs["rank"] = rank
    if world_size is not None:
        kwargs["world_size"] = world_size
    dist.init_process_group(
        backend, init_method=init_method, timeout=datetime.timedelta(seconds=timeout_s), **kwargs
    )
    ensure_groups()
    log.info("process group: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return True


def init_from_env(device: torch.device | str = "cpu") -> bool:
    """``init()`` when launched by torchrun and no group exists yet; False (nothing to own) otherwise."""
    return init(device=device) if launched() and not active() else False


def teardown(owned: bool) -> None:
    """Destroy the process group if ``init`` created it (``owned``)."""
    if owned and active():
        _groups.clear()
        dist.destroy_process_group()


def ensure_groups() -> None:
    """Create the ``gather`` and ``cpu`` groups for the current default group (collective: every rank
    must call it at the same point; ``init`` and ``fit`` do)."""
    if not active() or world_size() == 1:
        return
    owner = dist.group.WORLD
    if _groups.get("owner") is owner:
        return
    _groups.clear()
    # new_group does not inherit the default group's timeout (it falls back to 30 min): pass them.
    train = datetime.timedelta(seconds=_timeouts.get("train", 1800.0))
    wait = datetime.timedelta(seconds=_timeouts.get("wait", WAIT_FOR_MAIN_S))
    _groups["gather"] = dist.new_group(timeout=train)
    gloo = dist.get_backend() == "gloo"
    _groups["cpu"] = _groups["gather"] if gloo else dist.new_group(backend="gloo", timeout=train)
    _groups["wait"] = dist.new_group(backend="gloo", timeout=wait)
    _groups["owner"] = owner


def _group(name: str) -> Any:
    ensure_groups()
    return _groups[name]


# --- control messages (CPU) -------------------------------------------------------------------


def barrier() -> None:
    if world_size() > 1:
        dist.barrier(group=_group("cpu"))


def broadcast_json(obj: Any, src: int = 0, *, group_name: str = "cpu") -> Any:
    """``obj`` of rank ``src`` on every rank, sent as JSON text (never pickle); the object itself with
    one process. Every rank must call it; only ``src``'s ``obj`` is read."""
    if world_size() == 1:
        return obj
    group = _group(group_name)
    if rank() == src:
        text = json.dumps(obj, default=_json_default).encode()
        buffer = torch.frombuffer(bytearray(text), dtype=torch.uint8)
        length = torch.tensor([buffer.numel()], dtype=torch.long)
    else:
        length = torch.zeros(1, dtype=torch.long)
    dist.broadcast(length, src=src, group=group)
    if rank() != src:
        buffer = torch.empty(int(length), dtype=torch.uint8)
    dist.broadcast(buffer, src=src, group=group)
    return json.loads(buffer.numpy().tobytes().decode()) if rank() != src else obj


def from_main(obj: Any) -> Any:
    """``broadcast_json(obj)`` from rank 0 after work that only rank 0 does (validation, evaluation):
    the other ranks wait up to ``init``'s ``wait_for_main_s``, not the collectives' timeout."""
    return broadcast_json(obj, 0, group_name="wait")


def all_gather_cpu(tensor: Tensor) -> list[Tensor]:
    """Every rank's copy of a CPU tensor of the same shape on every rank (e.g. RNG states)."""
    if world_size() == 1:
        return [tensor]
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous(), group=_group("cpu"))
    return parts


def mean_over_ranks(value: Tensor) -> Tensor:
    """The mean of a (detached) tensor over ranks, the same on every rank."""
    if world_size() == 1:
        return value
    total = value.detach().double().cpu().clone()
    dist.all_reduce(total, group=_group("cpu"))
    return total / world_size()


# --- batches ------------------------------------------------------------------------------------


def split_count(total: int, parts: int | None = None) -> list[int]:
    """``total`` split into ``parts`` (default: the world size) counts differing by at most one,
    larger first - how rows of a batch and draws of shared negatives are shared among ranks."""
    parts = world_size() if parts is None else parts
    base, extra = divmod(total, parts)
    return [base + (1 if r < extra else 0) for r in range(parts)]


def shard(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """This rank's contiguous share of a global batch's rows (the batch itself with one process)."""
    if world_size() == 1:
        return batch
    sizes = split_count(len(next(iter(batch.values()))))
    start = sum(sizes[: rank()])
    return {key: value[start : start + sizes[rank()]] for key, value in batch.items()}


def rank_seed(seed: int, rank_: int | None = None) -> int:
    """A torch seed for ``rank``: rank 0 keeps ``seed`` (one process trains exactly as before), the
    others get their own streams so dropout masks and sampled negatives differ between ranks."""
    r = rank() if rank_ is None else rank_
    return seed if r == 0 else (seed * 1_000_003 + 7_919 * r) % (2**63 - 1)


@dataclass(frozen=True)
class Shards:
    """How a global batch is spread over ranks: rows and sample-weight totals of every rank."""

    rank: int
    sizes: tuple[int, ...]
    weights: tuple[float, ...]

    @property
    def offset(self) -> int:
        """Index of this rank's first row in the global batch."""
        return sum(self.sizes[: self.rank])

    @property
    def loss_scale(self) -> float:
        """Factor on this rank's (weighted-mean) loss so that the MEAN over ranks of the scaled losses
        is the global batch's weighted-mean loss: N * W_r / W."""
        total = sum(self.weights)
        return len(self.sizes) * self.weights[self.rank] / total if total > 0 else 1.0


def batch_shards(rows: int, weight: Tensor | None, device: torch.device) -> Shards:
    """Exchange every rank's row count and weight total (one small all-gather)."""
    local = torch.tensor(
        [float(rows), float(weight.double().sum()) if weight is not None else float(rows)],
        dtype=torch.float64,
        device=device,
    )
    parts = [torch.empty_like(local) for _ in range(world_size())]
    dist.all_gather(parts, local, group=_group("gather"))
    table = torch.stack(parts).cpu()
    return Shards(rank(), tuple(int(n) for n in table[:, 0]), tuple(float(w) for w in table[:, 1]))


# --- the all-gather that keeps gradients --------------------------------------------------------


def _gather_padded(tensor: Tensor, sizes: list[int], group: Any) -> Tensor:
    """Concatenation of every rank's rows; all-gather needs one shape, so rows are padded to the max."""
    longest = max(sizes)
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


class _GatherRows(torch.autograd.Function):
    """Forward: all ranks' rows, concatenated. Backward: d(sum of every rank's loss)/d(this rank's
    rows), i.e. the output gradients summed over ranks (all-reduce), then this rank's slice."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, sizes: list[int], rank_: int, group: Any) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group = sizes, rank_, group
        return _gather_padded(tensor, sizes, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]], None, None, None


def gather_rows(tensor: Tensor, sizes: list[int] | tuple[int, ...], grad: bool = False) -> Tensor:
    """Rows of every rank concatenated in rank order (``sizes[r]`` rows from rank r); with
    ``grad=True`` gradients flow back to each rank's own rows from every rank's loss."""
    if world_size() == 1:
        return tensor
    if len(tensor) != sizes[rank()]:
        raise ValueError(f"rank {rank()} holds {len(tensor)} rows but sizes say {sizes[rank()]}")
    group = _group("gather")
    if not (grad and torch.is_grad_enabled()):
        return _gather_padded(tensor.detach(), list(sizes), group)
    if not tensor.requires_grad:
        # Every rank must run the backward's all-reduce, or the ranks that do would wait forever: a
        # rank whose rows need no gradient (e.g. none at all) still joins through a throwaway leaf.
        tensor = tensor.detach().requires_grad_()
    return _GatherRows.apply(tensor, list(sizes), rank(), group)


def regroup(gathered: Tensor, counts: list[list[int]]) -> Tensor:
    """Reorder rows gathered as ``[rank 0: group 0, group 1, ...][rank 1: ...]...`` into
    ``[group 0 of every rank][group 1 of every rank]...`` (``counts[rank][group]`` rows each), e.g.
    positives then sampled negatives, the order one process would have. Differentiable."""
    starts, position = [], 0
    for per_rank in counts:
        starts.append([])
        for n in per_rank:
            starts[-1].append(position)
            position += n
    order = [
        torch.arange(starts[r][g], starts[r][g] + counts[r][g])
        for g in range(len(counts[0]))
        for r in range(len(counts))
    ]
    return gathered[torch.cat(order).to(gathered.device)]


# --- the model under DDP ------------------------------------------------------------------------


class _LossOf(nn.Module):
    """``forward(batch) = model.compute_loss(batch)``: DDP hooks into ``forward``, our models expose
    ``compute_loss``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model.compute_loss(batch)


def loss_module(model: nn.Module) -> nn.Module:
    """A module whose ``forward(batch)`` is the loss: DistributedDataParallel around the model with
    several processes (gradients averaged over ranks), the plain model with one.

    Buffers are synced once, at construction, but not before every step (``forward_sync_buffers=False``):
    the feature tables never change and the frequency estimator's state is kept identical by
    construction (every rank updates it with the same global ids), so re-sending them would only cost.
    """
    wrapped = _LossOf(model)
    if world_size() == 1:
        return wrapped
    ensure_groups()
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(
        wrapped,
        device_ids=[device] if device.type == "cuda" else None,
        forward_sync_buffers=False,
    )
