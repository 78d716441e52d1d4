"""The aligned funnel on a synthetic world, stage by stage: what `twotower demo` and bench/funnel.py run.

1. **Logs**: the world's interaction log, split leave-last-out (temporal) as in the retrieval demo.
2. **Retrieval**: a two-tower trained on it (``run_dir``, a normal run).
3. **Impressions**: position-biased clicks simulated over the retrieval's own candidates
   (:func:`~twotower.data.impression_sim.simulate_impressions`, two devices with different
   examination curves), ``relevance="taste"``: a click on a seen item reflects taste alone, while the
   interaction log also carries popularity. Retrieval learned popularity; the ranker can unlearn it.
4. **Rankers**: the debiased main ranker (PAL) and a light one, trained on the clicks
   (``run_dir/ranker``, ``run_dir/light_ranker``).
5. **Alignment** variants, each a copy of the retrieval fine-tuned for the same steps
   (:func:`~twotower.align.align_retrieval`): ``control`` (its own loss only: what extra training alone
   gives), ``+raw-clicks`` and ``+debiased-labels`` (clicked impressions added as positives, weighted
   1 or by inverse examination propensity from the ranker's bias tower), ``+distillation`` (KL to the
   ranker on candidate lists), ``+reward`` (REINFORCE with the ranker's logits as rewards), ``+all``.
   The light ranker is also distilled from the main one.
6. **Evaluation** of every variant against the main ranker and the world's truth
   (:func:`~twotower.funnel.evaluate_funnel`), plus the oracle funnels.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field, field_validator

from twotower.align import (
    AlignConfig,
    Teacher,
    align_retrieval,
    alignment_lists,
    candidate_lists,
    click_positives,
    concat_positives,
    distill_light_ranker,
)
from twotower.config import RunConfig, SectionDefaults
from twotower.data.dataset import RetrievalData, build_retrieval_data
from twotower.data.impression_sim import DEFAULT_ETA, examination, simulate_impressions
from twotower.debiased_labels import DebiasConfig, debiased_labels
from twotower.demo import demo_config
from twotower.distillation import AlignmentConfig
from twotower.experiment import train_run
from twotower.funnel import PROTOCOL, FunnelConfig, evaluate_funnel, oracle_rows, run_funnel
from twotower.recommender import Retriever
from twotower.reranker import RunRanker, RunRankerConfig, train_run_ranker

__all__ = ["FunnelExperimentConfig", "VARIANTS", "retrieval_config", "run_funnel_experiment"]

Echo = Callable[[str], Any]
# name -> (click positives: None | "raw" | "debiased", alignment terms)
VARIANTS: dict[str, tuple[str | None, AlignmentConfig]] = {
    "control": (None, AlignmentConfig()),
    "+raw-clicks": ("raw", AlignmentConfig()),
    "+debiased-labels": ("debiased", AlignmentConfig()),
    "+distillation": (None, AlignmentConfig(distill_weight=1.0)),
    "+reward": (None, AlignmentConfig(reward_weight=1.0, reward_form="reinforce")),
    "+all": ("debiased", AlignmentConfig(distill_weight=1.0, reward_weight=1.0, reward_form="reinforce")),
}


class FunnelExperimentConfig(SectionDefaults):
    quick: bool = Field(False, description="the small world and fewer epochs (tests, smoke runs)")
    seed: int = 0
    requests: int = Field(8000, ge=10, description="simulated impression requests")
    shown: int = Field(10, ge=1)
    candidates: int = Field(100, ge=1, description="retrieved items each logged request is drawn from")
    click_offset: float = Field(2.0, description="p(click | seen) = sigmoid(taste - offset)")
    section_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "funnel": {"retrieve_n": 50, "light_n": 20, "k": 10}
    }
    funnel: FunnelConfig
    align: AlignConfig = Field(default_factory=AlignConfig)
    ranker_epochs: int = Field(5, ge=1)
    variants: list[str] = Field(default_factory=lambda: list(VARIANTS))

    @field_validator("variants")
    @classmethod
    def _known_variants(cls, variants: list[str]) -> list[str]:
        # Checked here, not in stage 5: an unknown name would otherwise fail after minutes of training.
        unknown = [v for v in variants if v not in VARIANTS]
        if unknown:
            raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
        return variants


def _ranker_config(config: FunnelExperimentConfig, light: bool) -> RunRankerConfig:
    # The rest of the ranker section (PAL, clicks, no bias dropouts) is RunRankerConfig's defaults.
    ranker: dict[str, Any] = {}
    if light:  # a small pointwise model: one hidden layer, no item embedding
        ranker = {"layers": [32], "item_embedding_dim": 0, "dropout": 0.0}
    return RunRankerConfig.model_validate(
        {
            "columns": {"user": "user_id", "context": ["device"]},
            "ranker": ranker,
            "train": {"epochs": config.ranker_epochs, "batch_size": 256, "lr": 3e-3, "seed": config.seed},
        }
    )


def retrieval_config(config: FunnelExperimentConfig) -> RunConfig:
    """The retrieval run of the experiment: the demo's, with the experiment's seed for world and training."""
    run = demo_config(config.quick).model_copy(deep=True)
    run.train.seed = config.seed
    run.data.world.seed = config.seed  # type: ignore[union-attr]
    return run


def run_funnel_experiment(
    config: FunnelExperimentConfig,
    run_dir: str | Path,
    echo: Echo = print,
    progress: bool = False,
    data: RetrievalData | None = None,
) -> dict[str, Any]:
    """Run every stage (see the module docstring) into ``run_dir``; returns the results, including
    ``funnel`` ``{row: {metric: value}}`` and what the report needs. ``data`` is
    ``build_retrieval_data(retrieval_config(config))`` when the caller already has it."""
    run_dir, started = Path(run_dir), time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 2)
        return now

    run_config = retrieval_config(config)
    data = data or build_retrieval_data(run_config)
    world = data.raw.world
    assert world is not None
    echo(f"[1/6] world: {data.num_users:,} users, {data.num_items:,} items, {len(data.train):,} interactions")
    t = time.perf_counter()
    metrics = train_run(run_config, run_dir, progress=progress, data=data)
    t = lap("retrieval", t)
    echo(f"[2/6] retrieval trained: recall@10 {metrics['recall@10']:.4f} (leave-last-out)")

    retriever = Retriever.load(run_dir)
    log = simulate_impressions(
        retriever, world, config.requests, seed=config.seed, shown=config.shown,
        candidates=config.candidates, offset=config.click_offset, relevance="taste",
    )  # fmt: skip
    log.drop(columns="true_affinity").to_parquet(run_dir / "impressions.parquet", index=False)
    t = lap("impressions", t)
    echo(f"[3/6] {config.requests:,} logged requests, click rate {log['click'].mean():.3f}")

    for stage, light in (("ranker", False), ("light_ranker", True)):
        ranker_config = _ranker_config(config, light)
        # A minute of the full demo: silent between [3/6] and [4/6] it looked like a hang.
        train_run_ranker(
            run_dir, run_dir / "impressions.parquet", ranker_config, progress=progress, stage=stage
        )
    ranker, light = RunRanker.load(run_dir, "ranker"), RunRanker.load(run_dir, "light_ranker")
    assert ranker is not None and light is not None
    t = lap("rankers", t)
    echo("[4/6] rankers trained; learned examination (mobile): "
         + " ".join(f"{v:.2f}" for v in (ranker.examination_curve or {}).get("mobile", [])[:5]))  # fmt: skip

    model = retriever.model
    model.eval()
    teacher = Teacher(ranker, model.user_embeddings(), model.item_embeddings())
    uid, iid = data.user_ids.astype(np.int64), data.item_ids.astype(np.int64)

    def relevance(rows: np.ndarray) -> np.ndarray:  # true p(click | seen)
        return 1.0 / (1.0 + np.exp(-(world.taste(uid[rows][:, None], iid[None, :]) - config.click_offset)))

    users = torch.arange(data.num_users)
    ranker_top = teacher.top(users, config.funnel.k)
    labels = debiased_labels(log, ranker, DebiasConfig(method="ipw"))
    clicks = {
        "raw": click_positives(labels.assign(weight=1.0), data.user_ids, data.item_ids),
        "debiased": click_positives(labels, data.user_ids, data.item_ids),
    }

    fc = config.funnel
    rows: dict[str, dict[str, float]] = {}
    base_lists = run_funnel(model, teacher, light, fc)
    rows["retrieval"] = evaluate_funnel(base_lists, teacher, relevance, fc, ranker_top=ranker_top)
    curves: dict[str, list[dict[str, Any]]] = {}
    align_config = config.align.model_copy(update={"seed": config.seed})
    shared = alignment_lists(model, teacher, align_config)  # every variant starts from the same model
    for name in config.variants:
        source, terms = VARIANTS[name]
        student = copy.deepcopy(model)
        positives = data.train if source is None else concat_positives(data.train, clicks[source])
        align = align_config.model_copy(update={"alignment": terms})
        curves[name] = align_retrieval(
            student, teacher, positives, align, run_config.train.batch_size, progress, lists=shared
        )
        lists = run_funnel(student, teacher, light, fc)
        rows[name] = evaluate_funnel(lists, teacher, relevance, fc, ranker_top=ranker_top)
    t = lap("alignment", t)
    echo(f"[5/6] {len(config.variants)} alignment variants trained")

    # The light ranker distilled on what it sees in serving: base retrieval's top retrieve_n.
    distilled = copy.deepcopy(light)
    items, mask = candidate_lists(teacher.user_emb, teacher.item_emb, fc.retrieve_n, 0)
    distill_light_ranker(distilled, teacher, items, mask, align_config)
    rows["retrieval, light ranker distilled"] = evaluate_funnel(
        run_funnel(model, teacher, distilled, fc), teacher, relevance, fc, ranker_top=ranker_top
    )
    distilled.save(run_dir, "light_ranker")  # the served light ranker is the distilled one
    rows.update(oracle_rows(base_lists, teacher, light, relevance, fc))
    lap("evaluation", t)
    echo(f"[6/6] funnel evaluated ({PROTOCOL}, {data.num_users:,} users)")
    timings["total"] = round(time.perf_counter() - started, 2)
    true_curves = {
        d: examination(np.arange(1, config.shown + 1), eta).tolist() for d, eta in DEFAULT_ETA.items()
    }
    return {
        "protocol": PROTOCOL,
        "seed": config.seed,
        "funnel": rows,
        "retrieval_metrics": {k: v for k, v in metrics.items() if "@" in k},
        "true_examination": true_curves,
        "learned_examination": ranker.examination_curve,
        "alignment_history": curves,
        "seconds": timings,
    }
