"""The funnel run end to end - retrieval, light ranker, main ranker - and measured against the truth.

:func:`run_funnel` serves every user the way ``twotower serve`` does: retrieval's top
``retrieve_n`` by the two-tower score, the light ranker keeps its top ``light_n`` (skipped when there
is none), the main ranker orders those and the first ``k`` are served. As in serving, no stage passes
on fewer than the stages after it keep (retrieval at least ``light_n`` and ``k``, the light ranker at
least ``k``) and ranker ties go to the lower catalogue index. The rankers read their own
features, the frozen retrieval embeddings they were trained on (:class:`~twotower.align.Teacher`), so
a retrieval model aligned later still feeds the rankers the inputs they know.

:func:`evaluate_funnel` measures the lists against two references:

* the main ranker itself: how many of its own top-``k`` over the whole catalogue each stage keeps
  (``ranker_top{k}_recall``; at the retrieval stage this is what distillation is meant to raise) and
  how well retrieval's order of its candidates agrees with the ranker's (Spearman);
* the truth of a synthetic world (any ``relevance(rows) -> [rows, items]`` callable): nDCG@k of the
  served list, of retrieval's own top k, and of the *oracle* funnels that replace stages with the
  truth (:func:`oracle_rows`): the true best k (nDCG 1 by definition), the true best k among what
  retrieval retrieved (the ceiling the rankers work under), and the learned rankers on the truly best
  ``retrieve_n`` (the ceiling retrieval works under).

Protocol ``funnel-full-catalogue``: every user, the whole catalogue, nothing excluded - the ranker's top
k and the true ideal are taken over the same items the stages may serve.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from twotower.align import Teacher
from twotower.funnel_metrics import rank_correlation, ranker_topk_recall, served_ndcg
from twotower.pipeline import stage_sizes
from twotower.reranker import RunRanker
from twotower.retrieval import TwoTowerModel

__all__ = ["FunnelConfig", "FunnelLists", "evaluate_funnel", "oracle_rows", "run_funnel", "PROTOCOL"]

PROTOCOL = "funnel-full-catalogue"
Relevance = Callable[[np.ndarray], np.ndarray]  # user rows -> [rows, num_items] true relevance >= 0


class FunnelConfig(BaseModel):
    """Stage sizes: how many candidates each stage passes on."""

    model_config = ConfigDict(extra="forbid")

    retrieve_n: int = Field(100, ge=1, description="retrieval's candidates per user")
    light_n: int = Field(30, ge=1, description="what the light ranker keeps (when there is one)")
    k: int = Field(10, ge=1, description="the served list, and the cut-off of every metric")
    # Retrieval's recall of the ranker's top k is also reported at these list sizes (those above
    # retrieve_n are skipped): one number at one N hides whether retrieval misses the ranker's
    # favourites or merely ranks them low.
    # >= 1: a 0 or negative N sliced the list from its end and reported e.g. "recall@-1".
    recall_at: list[Annotated[int, Field(ge=1)]] = Field(default_factory=lambda: [10, 20, 50, 100])


@dataclass
class FunnelLists:
    """Catalogue indices per user and stage, best first: ``[U, n]`` each."""

    retrieved: Tensor
    retrieval_scores: Tensor
    light: Tensor | None  # what the light ranker kept; None when the funnel has none
    served: Tensor


def _reorder(ranker: RunRanker, teacher: Teacher, users: Tensor, items: Tensor, keep: int) -> Tensor:
    """``items [U, n]`` re-sorted by the ranker's relevance on the teacher's features, first ``keep``.

    Ties go to the lower catalogue index, as in serving: ``topk`` leaves their order unspecified (it
    varies with the list length), which made the served list, and its nDCG, an accident of the kernel.
    """
    scores = torch.cat([
        ranker.score(teacher.user_emb[u], i, teacher.item_emb[i])
        for u, i in zip(users.split(1024), items.split(1024), strict=True)
    ]) if len(items) else torch.empty(items.shape)  # fmt: skip
    by_item = torch.sort(items, dim=1, stable=True).indices
    by_score = torch.sort(torch.gather(scores, 1, by_item), dim=1, descending=True, stable=True).indices
    order = torch.gather(by_item, 1, by_score)[:, : min(keep, items.shape[1])]
    return torch.gather(items, 1, order)


@torch.no_grad()
def run_funnel(
    retrieval: TwoTowerModel | Tensor,
    teacher: Teacher,
    light: RunRanker | None,
    config: FunnelConfig,
    users: Tensor | None = None,
) -> FunnelLists:
    """Serve ``users`` (all by default). ``retrieval`` is a model, or a precomputed candidate list
    ``[U, >= retrieve_n]`` (e.g. an oracle's)."""
    users = torch.arange(len(teacher.user_emb)) if users is None else users
    fetch, light_keep = stage_sizes(config.k, config.retrieve_n, config.light_n, light is not None, True)
    if isinstance(retrieval, TwoTowerModel):
        retrieval.eval()
        query = retrieval.user_embeddings(users) / retrieval.config.temperature
        items = retrieval.item_embeddings()
        n = min(fetch, len(items))
        top = [torch.topk(q @ items.T, n, dim=1) for q in query.split(1024)]
        retrieved = torch.cat([t.indices for t in top])
        scores = torch.cat([t.values for t in top])
    else:
        retrieved = retrieval[:, :fetch]
        scores = torch.full(retrieved.shape, float("nan"))
    shortlist = None if light is None else _reorder(light, teacher, users, retrieved, light_keep)
    served = _reorder(teacher.ranker, teacher, users, retrieved if shortlist is None else shortlist, config.k)
    return FunnelLists(retrieved, scores, shortlist, served)


def _ndcg(lists: Tensor, users: Tensor, relevance: Relevance, k: int) -> float:
    return served_ndcg(lists.numpy(), lambda rows: relevance(users.numpy()[rows]), k=k)


@torch.no_grad()
def evaluate_funnel(
    lists: FunnelLists,
    teacher: Teacher,
    relevance: Relevance | None,
    config: FunnelConfig,
    users: Tensor | None = None,
    ranker_top: Tensor | None = None,
) -> dict[str, float]:
    """Agreement with the main ranker and nDCG@k against the truth (when ``relevance`` is given).

    ``ranker_top [U, k]`` (the ranker's own top k over the catalogue) may be passed in when several
    retrieval models are compared against the same ranker: it is the slow part."""
    users = torch.arange(len(teacher.user_emb)) if users is None else users
    k = config.k
    top = teacher.top(users, k) if ranker_top is None else ranker_top
    # Spearman between retrieval's scores and the ranker's over each user's retrieved candidates.
    ranker_scores = teacher.logits(users, lists.retrieved)
    n = lists.retrieved.shape[1]
    metrics = {
        f"ranker_top{k}_recall@{m}": ranker_topk_recall(lists.retrieved[:, :m].numpy(), top.numpy())
        for m in sorted({*(m for m in config.recall_at if m < n), n})
    }
    if lists.light is not None:  # without a light ranker it would repeat retrieval's recall under its name
        metrics[f"light_ranker_top{k}_recall@{lists.light.shape[1]}"] = ranker_topk_recall(
            lists.light.numpy(), top.numpy()
        )
    if not torch.isnan(lists.retrieval_scores).all():
        metrics["spearman_retrieval_ranker"] = rank_correlation(
            lists.retrieval_scores.numpy(), ranker_scores.numpy(), method="spearman"
        )
    if relevance is not None:
        metrics[f"retrieval_ndcg@{k}"] = _ndcg(lists.retrieved[:, :k], users, relevance, k)
        metrics[f"served_ndcg@{k}"] = _ndcg(lists.served, users, relevance, k)
    return metrics


@torch.no_grad()
def oracle_rows(
    lists: FunnelLists,
    teacher: Teacher,
    light: RunRanker | None,
    relevance: Relevance,
    config: FunnelConfig,
    users: Tensor | None = None,
) -> dict[str, dict[str, float]]:
    """nDCG@k of funnels with stages replaced by the truth (see the module docstring)."""
    users = torch.arange(len(teacher.user_emb)) if users is None else users
    k, n = config.k, lists.retrieved.shape[1]
    rel = torch.cat([torch.from_numpy(relevance(u.numpy())) for u in users.split(1024)])
    # Cut at the catalogue and at what was retrieved: topk past a row's length raises (k > retrieve_n,
    # or k > the catalogue, used to crash here although run_funnel and evaluate_funnel accept them).
    best = torch.topk(rel, min(max(k, n), rel.shape[1]), dim=1).indices
    within = torch.gather(rel, 1, lists.retrieved)
    best_retrieved = torch.gather(lists.retrieved, 1, torch.topk(within, min(k, n), dim=1).indices)
    learned_on_best = run_funnel(best, teacher, light, config, users).served
    return {
        "oracle funnel (true top k)": {f"served_ndcg@{k}": _ndcg(best[:, :k], users, relevance, k)},
        "learned retrieval + oracle rankers": {
            f"served_ndcg@{k}": _ndcg(best_retrieved, users, relevance, k)
        },
        "oracle retrieval + learned rankers": {
            f"served_ndcg@{k}": _ndcg(learned_on_best, users, relevance, k)
        },
    }
