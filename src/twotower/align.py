"""Align the early funnel stages with the main ranker: distillation and ranker-as-reward training.

The main ranker (:class:`~twotower.reranker.RunRanker`) scores the candidates retrieval hands it better
than retrieval can, but retrieval trained on interactions alone never learns what the ranker would have
picked. Here the ranker is the *teacher*: its relevance logits on each user's candidate list are soft
targets (:mod:`twotower.distillation`) for

* the retrieval towers (:func:`align_retrieval`): the student logit of a candidate is the two-tower
  score ``<u, i> / T``. The retrieval's own loss on its positives (interactions, possibly with
  position-debiased click weights, :mod:`twotower.debiased_labels`) stays in every step, so the
  towers keep what they knew while they move towards the ranker;
* a light ranker (:func:`distill_light_ranker`): its relevance logit on the same pair features.

Candidate lists (:func:`candidate_lists`) are fixed when alignment starts: the user's top
``candidates`` items under the retrieval being aligned (where the funnel's decisions happen) plus
``random`` uniform catalogue items, so the student also learns where the teacher puts items it does
not retrieve yet - without them it could only reorder its own list and never pull an item in.

The teacher runs on its own features: the retrieval embeddings it was trained on, frozen
(:class:`Teacher`). Moving the retrieval towers therefore never moves the targets.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from pydantic import Field
from torch import Tensor
from tqdm.auto import tqdm

from twotower.config import SectionDefaults
from twotower.data.dataset import Interactions, iterate_batches
from twotower.distillation import AlignmentConfig, alignment_loss, alignment_terms
from twotower.reranker import RunRanker, pair_features
from twotower.retrieval import TwoTowerModel

__all__ = [
    "AlignConfig",
    "Teacher",
    "align_retrieval",
    "alignment_lists",
    "candidate_lists",
    "click_positives",
    "concat_positives",
    "distill_light_ranker",
]

log = logging.getLogger("twotower")


class AlignConfig(SectionDefaults):
    """How an early stage is trained towards the main ranker (see the module docstring)."""

    epochs: int = Field(3, ge=1)
    lr: float = Field(1e-3, gt=0)
    users_per_step: int = Field(128, ge=1, description="users whose candidate lists enter one step")
    candidates: int = Field(100, ge=2, description="top items of the aligned model per user's list")
    random: int = Field(100, ge=0, description="uniform catalogue items added to each list")
    section_defaults: ClassVar[dict[str, dict[str, Any]]] = {"alignment": {"distill_weight": 1.0}}
    alignment: AlignmentConfig
    seed: int = 0


@dataclass
class Teacher:
    """The main ranker with the frozen embeddings its pair features come from."""

    ranker: RunRanker
    user_emb: Tensor  # [U, d], the retrieval user embeddings the ranker was trained on
    item_emb: Tensor  # [I, d]

    @torch.no_grad()
    def logits(self, users: Tensor, items: Tensor, chunk: int = 512) -> Tensor:
        """Relevance logits ``[B, N]`` of ``items [B, N]`` (catalogue indices) for ``users [B]``."""
        out = [
            self.ranker.score(self.user_emb[u], i, self.item_emb[i.clamp(min=0)])
            for u, i in zip(users.split(chunk), items.split(chunk), strict=True)
        ]
        return torch.cat(out) if out else torch.empty(0, items.shape[1])

    @torch.no_grad()
    def top(self, users: Tensor, k: int, chunk: int = 256) -> Tensor:
        """The ranker's own top-``k`` over the whole catalogue, ``[B, k]``, best first; ties go to the
        lower catalogue index, as in serving and :func:`twotower.funnel.run_funnel` (``topk`` leaves the
        order of ties unspecified, so a tying ranker's top k was arbitrary and the funnel's recall of it
        an accident)."""
        everything = torch.arange(len(self.item_emb))
        out = []
        for u in users.split(chunk):
            scores = self.logits(u, everything.expand(len(u), -1), chunk)
            order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # items ascend already
            out.append(order[:, : min(k, scores.shape[1])])
        return torch.cat(out)


@torch.no_grad()
def candidate_lists(
    user_emb: Tensor, item_emb: Tensor, top: int, random: int, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """``(items [U, top + random], mask)``: each user's ``top`` items by inner product, then ``random``
    uniform items. A random item already in the list (or drawn twice) is masked, not dropped, so the
    lists stay rectangular."""
    top = min(top, len(item_emb))
    best = torch.cat([torch.topk(u @ item_emb.T, top, dim=1).indices for u in user_emb.split(1024)])
    if not random:
        return best, torch.ones_like(best, dtype=torch.bool)
    generator = torch.Generator().manual_seed(seed)
    extra = torch.randint(len(item_emb), (len(user_emb), random), generator=generator)
    items = torch.cat([best, extra], dim=1)
    # A slot is valid when no earlier slot of its row holds the same item.
    order = torch.sort(items, dim=1, stable=True)
    repeat = torch.zeros_like(items, dtype=torch.bool)
    repeat[:, 1:] = order.values[:, 1:] == order.values[:, :-1]
    mask = torch.ones_like(items, dtype=torch.bool).scatter(1, order.indices, ~repeat)
    return items, mask


@torch.no_grad()
def alignment_lists(
    model: TwoTowerModel, teacher: Teacher, config: AlignConfig
) -> tuple[Tensor, Tensor, Tensor]:
    """``(items, mask, teacher logits)``, each ``[U, candidates + random]``: every user's candidate
    list under ``model`` as it is now, and the teacher's targets on it."""
    model.eval()
    items, mask = candidate_lists(
        model.user_embeddings(), model.item_embeddings(), config.candidates, config.random, config.seed
    )
    return items, mask, teacher.logits(torch.arange(model.num_users), items)


def click_positives(labels: pd.DataFrame, user_ids: np.ndarray, item_ids: np.ndarray) -> Interactions:
    """The clicked rows of a :func:`~twotower.debiased_labels.debiased_labels` frame as retrieval
    positives: catalogue indices, the frame's ``weight`` as sample weight. Ids are matched as text, as
    the ranker does (a log and a run may type an id column differently); clicks on users or items
    outside the catalogue are dropped with a warning."""
    clicked = labels[labels["clicked"].to_numpy(dtype=bool)]
    users = pd.Index(user_ids.astype(str)).get_indexer(clicked["user_id"].astype(str))
    items = pd.Index(item_ids.astype(str)).get_indexer(clicked["item_id"].astype(str))
    known = (users >= 0) & (items >= 0)
    if not known.all():
        log.warning("%d clicks name users or items outside the catalogue; ignored", int((~known).sum()))
    return Interactions(
        torch.from_numpy(users[known].astype(np.int64)),
        torch.from_numpy(items[known].astype(np.int64)),
        torch.tensor(clicked["weight"].to_numpy(dtype=np.float32)[known]),
    )


def concat_positives(a: Interactions, b: Interactions) -> Interactions:
    """``a`` then ``b``, weighted (1 where a side has no weights); ``history_end`` is kept when both
    sides have one (a history model trained on events "before" its targets needs it)."""
    weights = [x.weight if x.weight is not None else torch.ones(len(x)) for x in (a, b)]
    ends = (
        None if a.history_end is None or b.history_end is None else torch.cat([a.history_end, b.history_end])
    )
    return Interactions(
        torch.cat([a.user_idx, b.user_idx]), torch.cat([a.item_idx, b.item_idx]), torch.cat(weights), ends
    )


def _student_logits(model: TwoTowerModel, users: Tensor, items: Tensor) -> Tensor:
    """Two-tower logits ``[B, N]`` with gradients, each distinct item embedded once."""
    query = model.encode_users(users)
    unique, where = torch.unique(items, return_inverse=True)
    emb = model.item_tower(model.item_features(unique))
    return torch.einsum("bd,bnd->bn", query, emb[where]) / model.config.temperature


def _cycle(data: Interactions, batch_size: int, seed: int) -> Iterator[dict[str, Tensor]]:
    """Shuffled batches of ``data`` without end, a fresh order each pass."""
    for epoch in itertools.count(1):
        yield from iterate_batches(data, batch_size, seed, epoch)


def align_retrieval(
    model: TwoTowerModel,
    teacher: Teacher,
    positives: Interactions,
    config: AlignConfig,
    batch_size: int = 512,
    progress: bool = False,
    lists: tuple[Tensor, Tensor, Tensor] | None = None,
) -> list[dict[str, Any]]:
    """Fine-tune ``model`` in place: its own loss on ``positives`` plus the enabled alignment terms on
    every user's candidate list. With no term enabled it is plain continued training on ``positives``
    (the control every alignment row should be compared with). ``lists`` are :func:`alignment_lists`
    computed beforehand (several students of one model share them). Returns one record per epoch."""
    users = torch.arange(model.num_users)
    items, mask, targets = lists if lists is not None else alignment_lists(model, teacher, config)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    steps = math.ceil(len(users) / config.users_per_step)
    # One positive batch per user step, of the training batch size at most: an in-batch softmax costs
    # B^2, so a pass over all positives per epoch would make batches of thousands and steps of seconds.
    # Later epochs continue where the last one stopped, so the positives are still all visited in turn.
    positive_batch = max(2, min(batch_size, math.ceil(len(positives) / steps)))
    stream = _cycle(positives, positive_batch, config.seed + 7919)
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    model.train()
    for epoch in range(1, config.epochs + 1):
        order = users[torch.randperm(len(users), generator=generator)]
        sums: dict[str, float] = {}
        bar = tqdm(
            order.split(config.users_per_step),
            desc=f"align {epoch}/{config.epochs}",
            disable=None if progress else True,  # None: on a terminal only, as in train.fit
            leave=False,
        )
        for chunk in bar:
            terms: dict[str, Tensor] = {}
            if len(positives) >= 2:
                terms["retrieval"] = model.compute_loss(next(stream))
            if config.alignment.enabled:
                student = _student_logits(model, chunk, items[chunk])
                parts = alignment_terms(student, targets[chunk], mask[chunk], config.alignment)
                terms.update(parts)
                terms["alignment"] = alignment_loss(student, targets[chunk], mask[chunk], config.alignment)
            loss = terms.get("retrieval", 0.0) + terms.get("alignment", 0.0)
            if not isinstance(loss, Tensor):
                continue
            if not torch.isfinite(loss):
                raise FloatingPointError(f"alignment loss is {loss.item()} at epoch {epoch}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + float(value.detach())
        record = {"epoch": epoch, **{k: v / steps for k, v in sums.items()}}
        log.info("align epoch %d: %s", epoch, record)
        history.append(record)
    model.eval()
    return history


def distill_light_ranker(
    light: RunRanker,
    teacher: Teacher,
    items: Tensor,
    mask: Tensor,
    config: AlignConfig,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """Fine-tune the light ranker's relevance tower in place towards the teacher on the lists ``items
    [U, N]`` (``mask`` marks real candidates): what the light ranker sees in serving is retrieval's
    top N, so that is where its order must agree with the main ranker's. Both rankers read the same
    pair features (the teacher's embeddings). Returns one record per epoch."""
    if light.embedding_dim != teacher.user_emb.shape[1] or light.num_items != len(teacher.item_emb):
        raise ValueError("the light ranker and the teacher must share the retrieval embeddings")
    if not config.alignment.enabled:
        raise ValueError("distill_light_ranker needs alignment.distill_weight or reward_weight > 0")
    users = torch.arange(len(items))
    targets = teacher.logits(users, items)
    model = light.model
    optimizer = torch.optim.Adam(model.relevance.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    model.train()
    for epoch in range(1, config.epochs + 1):
        total, steps = 0.0, 0
        order = users[torch.randperm(len(users), generator=generator)]
        shown = None if progress else True  # None: on a terminal only, as in train.fit
        for chunk in tqdm(order.split(config.users_per_step), disable=shown, leave=False):
            cand = items[chunk]
            features = pair_features(teacher.user_emb[chunk], teacher.item_emb[cand])
            student = model.relevance_logit({"features": features, "item": cand})
            loss = alignment_loss(student, targets[chunk], mask[chunk], config.alignment)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, steps = total + float(loss.detach()), steps + 1
        history.append({"epoch": epoch, "alignment": total / max(steps, 1)})
    model.eval()
    return history
