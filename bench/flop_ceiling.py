"""A FLOP-based ceiling for a two-tower training step on this machine.

The arithmetic of a retrieval step is its matrix products: each tower's MLP layers over the batch
(``[B, in] @ [in, out]``) and the in-batch logits (``[B, d] @ [d, B]``). The backward of each product
is two products of the same size (the gradients of both operands), so a step is about 3x the forward
products' FLOPs (2*M*K*N per product). Everything else - embedding lookups and their sparse updates,
normalisation, the softmax, the optimizer - costs memory traffic and no matmul FLOPs.

The ceiling: every product of the step, forward and backward, in its own shape, timed with torch on
this machine back to back (sustained, warm caches, same threads as training), summed. The step cannot
be faster than its products alone, so ``ceiling_examples_per_s = B / sum(time of each product)`` and
``achieved / ceiling`` says how much of the step the arithmetic is. A matrix product's rate depends
on its shape (a thin [4096, 64] x [64, 256] runs far below a square one), which is why each shape is
timed rather than one peak number used for all; the peak of a large square product is reported too.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

__all__ = ["Gemm", "StepFlops", "measure_ceiling", "step_gemms"]


@dataclass(frozen=True)
class Gemm:
    """One product ``[m, k] @ [k, n]`` of the step, ``count`` times."""

    m: int
    k: int
    n: int
    what: str
    count: int = 1

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n * self.count


def _linear(batch: int, fan_in: int, fan_out: int, what: str) -> list[Gemm]:
    # y = x W: forward [B,in]x[in,out]; backward dX = dY W^T [B,out]x[out,in], dW = X^T dY [in,B]x[B,out].
    return [
        Gemm(batch, fan_in, fan_out, f"{what} fwd"),
        Gemm(batch, fan_out, fan_in, f"{what} dX"),
        Gemm(fan_in, batch, fan_out, f"{what} dW"),
    ]


def step_gemms(
    batch: int,
    dim: int,
    user_mlp: list[int],
    item_mlp: list[int],
    users: int | None = None,
    items: int | None = None,
) -> list[Gemm]:
    """Every matrix product of one training step: towers ``[in, hidden..., out]`` and B x B logits.

    With ``users``/``items`` (the batch's distinct counts) the products of the distinct-id step
    (``twotower.unique_softmax``): each tower over its distinct ids, logits distinct users x items.
    """
    rows = {"user": users or batch, "item": items or batch}
    gemms: list[Gemm] = []
    for side, sizes in (("user", user_mlp), ("item", item_mlp)):
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            gemms += _linear(rows[side], fan_in, fan_out, f"{side} layer {i}")
    # logits S = Q C^T: forward [U,d]x[d,I]; dQ = dS C is [U,I]x[I,d] and dC = dS^T Q is [I,U]x[U,d].
    u, i = rows["user"], rows["item"]
    gemms += [
        Gemm(u, dim, i, "logits fwd"),
        Gemm(u, i, dim, "logits dQ"),
        Gemm(i, u, dim, "logits dC"),
    ]
    return gemms


@dataclass
class StepFlops:
    gemms: list[Gemm]
    seconds: list[float]  # measured seconds of each product (per occurrence)
    peak_gflop_s: float  # a large square product, for reference

    @property
    def flops(self) -> int:
        return sum(g.flops for g in self.gemms)

    @property
    def ceiling_seconds(self) -> float:
        return sum(s * g.count for g, s in zip(self.gemms, self.seconds, strict=True))

    @property
    def ceiling_gflop_s(self) -> float:
        """The rate the step's own product shapes sustain together."""
        return self.flops / self.ceiling_seconds / 1e9

    def best(self, other: StepFlops) -> StepFlops:
        """The faster of two measurements of the same products, product by product: on a shared
        machine other load only ever slows a product down, so the faster time is the truer ceiling."""
        seconds = [min(a, b) for a, b in zip(self.seconds, other.seconds, strict=True)]
        return StepFlops(self.gemms, seconds, max(self.peak_gflop_s, other.peak_gflop_s))

    def report(self, batch: int, achieved_examples_per_s: float) -> dict[str, float]:
        ceiling = batch / self.ceiling_seconds
        return {
            "step_gflop": self.flops / 1e9,
            "ceiling_gflop_s": self.ceiling_gflop_s,
            "peak_gflop_s": self.peak_gflop_s,
            "ceiling_examples_per_s": ceiling,
            "achieved_gflop_s": self.flops / 1e9 * achieved_examples_per_s / batch,
            "ceiling_fraction": achieved_examples_per_s / ceiling,
        }


def _time_mm(m: int, k: int, n: int, min_seconds: float) -> float:
    """Seconds per ``[m,k] @ [k,n]`` in fp32, best of a few sustained runs (other load only slows)."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    out = torch.empty(m, n)
    for _ in range(3):
        torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(3):
        reps, start = 0, time.perf_counter()
        while True:
            torch.mm(a, b, out=out)
            reps += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds / 3:
                break
        best = min(best, elapsed / reps)
    return best


def measure_ceiling(gemms: list[Gemm], min_seconds: float = 0.3) -> StepFlops:
    """Time every distinct product shape (``min_seconds`` each) and a 2048^3 reference."""
    cache: dict[tuple[int, int, int], float] = {}
    seconds = []
    for g in gemms:
        key = (g.m, g.k, g.n)
        if key not in cache:
            cache[key] = _time_mm(*key, min_seconds)
        seconds.append(cache[key])
    square = 2048
    peak = 2 * square**3 / _time_mm(square, square, square, min_seconds) / 1e9
    return StepFlops(gemms, seconds, peak)
