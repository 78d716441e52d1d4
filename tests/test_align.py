"""Alignment training: candidate lists by hand, and students that learn a planted teacher's taste."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from conftest import train_small_run
from twotower.align import AlignConfig, Teacher, align_retrieval, candidate_lists, distill_light_ranker
from twotower.data.impression_sim import simulate_impressions
from twotower.distillation import AlignmentConfig
from twotower.funnel_metrics import rank_correlation, ranker_topk_recall
from twotower.recommender import Retriever
from twotower.reranker import RunRankerConfig, fit_run_ranker

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class LowIndexRanker:
    """A planted teacher: every user prefers items with a lower catalogue index, whatever the features."""

    def score(self, user_emb: torch.Tensor, item_idx: torch.Tensor, item_emb: torch.Tensor) -> torch.Tensor:
        return -item_idx.float() / 10.0


def test_candidate_lists_by_hand() -> None:
    users = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    items = torch.tensor([[3.0, 0.0], [2.0, 0.0], [0.0, 3.0], [0.0, 2.0], [1.0, 1.0]])
    top, mask = candidate_lists(users, items, top=2, random=0)
    assert top.tolist() == [[0, 1], [2, 3]] and mask.all()
    lists, mask = candidate_lists(users, items, top=2, random=6, seed=3)
    assert lists.shape == (2, 8) and lists[:, :2].tolist() == [[0, 1], [2, 3]]
    for row, valid in zip(lists.tolist(), mask.tolist(), strict=True):
        kept = [item for item, ok in zip(row, valid, strict=True) if ok]
        # Every distinct item of the row is kept exactly once, the top ones in their slots.
        assert sorted(kept) == sorted(set(row)) and valid[:2] == [True, True]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("align") / "run"
    train_small_run(out, world_seed=1)
    return out


def test_distillation_pulls_the_teachers_favourites_into_retrieval(run) -> None:
    retriever = Retriever.load(run)
    model = retriever.model.eval()
    teacher = Teacher(LowIndexRanker(), model.user_embeddings(), model.item_embeddings())  # type: ignore[arg-type]
    users = torch.arange(model.num_users)
    favourites = teacher.top(users, 10)
    assert favourites[0].tolist() == list(range(10))  # the planted order, over the whole catalogue
    config = AlignConfig(epochs=4, lr=3e-3, candidates=30, random=30, users_per_step=50)
    students = {}
    for name, terms in (("control", AlignmentConfig()), ("distill", AlignmentConfig(distill_weight=2.0))):
        students[name] = copy.deepcopy(model)
        history = align_retrieval(
            students[name], teacher, retriever_positives(run), config.model_copy(update={"alignment": terms})
        )
        assert len(history) == 4 and ("distill" in history[-1]) == (name == "distill")
    recall = {
        name: ranker_topk_recall(student.recommend(users, k=30)[0].numpy(), favourites.numpy())
        for name, student in students.items()
    }
    # The control only trains on interactions: the planted order is unrelated to them.
    assert recall["distill"] > recall["control"] + 0.25, recall


def retriever_positives(run):
    from twotower.data.dataset import Interactions
    from twotower.storage import load_tensors

    pairs = load_tensors(run / "train_pairs.safetensors")
    return Interactions(pairs["user_idx"].long(), pairs["item_idx"].long())


def test_distilled_light_ranker_agrees_with_the_teacher(run, tmp_path) -> None:
    retriever = Retriever.load(run)
    world = retriever_world(run)
    log = simulate_impressions(retriever, world, 400, seed=0, candidates=30)
    log.drop(columns="true_affinity").to_parquet(tmp_path / "log.parquet")
    config = RunRankerConfig.model_validate(
        {"columns": {"user": "user_id", "context": ["device"]},
         "ranker": {"combination": "pal", "layers": [16], "item_embedding_dim": 0},
         "train": {"epochs": 1, "batch_size": 128}}
    )  # fmt: skip
    light, _ = fit_run_ranker(run, tmp_path / "log.parquet", config)
    model = retriever.model.eval()
    teacher = Teacher(LowIndexRanker(), model.user_embeddings(), model.item_embeddings())  # type: ignore[arg-type]
    items, mask = candidate_lists(teacher.user_emb, teacher.item_emb, 20, 0)
    users = torch.arange(len(items))

    def agreement() -> float:
        own = light.score(teacher.user_emb, items, teacher.item_emb[items])
        return rank_correlation(own.numpy(), teacher.logits(users, items).numpy())

    before = agreement()
    history = distill_light_ranker(
        light, teacher, items, mask, AlignConfig(epochs=15, lr=1e-2, users_per_step=50)
    )
    assert len(history) == 15 and history[-1]["alignment"] < history[0]["alignment"]
    assert agreement() > max(before, 0.0) + 0.3
    with pytest.raises(ValueError, match="distill_weight"):
        distill_light_ranker(light, teacher, items, mask, AlignConfig(alignment=AlignmentConfig()))


def retriever_world(run):
    from twotower.config import load_config
    from twotower.data.synthetic import SyntheticWorld

    config = load_config(run / "config.yaml")
    return SyntheticWorld.generate(config.data.world)


def test_teacher_top_matches_a_full_sort() -> None:
    scores = np.random.default_rng(0).normal(size=(5, 40))

    class Lookup:
        def score(self, user_emb, item_idx, item_emb):
            return torch.gather(torch.as_tensor(scores, dtype=torch.float32)[user_emb.argmax(1)], 1, item_idx)

    teacher = Teacher(Lookup(), torch.eye(5), torch.eye(40))  # type: ignore[arg-type]
    top = teacher.top(torch.arange(5), 7, chunk=2)
    assert top.tolist() == np.argsort(-scores, axis=1)[:, :7].tolist()


def test_aligning_a_copy_leaves_the_base_model_alone_and_counts_steps(run, monkeypatch) -> None:
    # 150 users in lists of 40 per step: ceil(150 / 40) = 4 optimizer steps per epoch, for the control
    # and the aligned variant alike, and the epoch records average the terms over those steps.
    model = Retriever.load(run).model.eval()
    teacher = Teacher(LowIndexRanker(), model.user_embeddings(), model.item_embeddings())  # type: ignore[arg-type]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    steps: list[int] = []
    original = torch.optim.Adam.step

    def counting(self, *args, **kwargs):
        steps.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counting)
    config = AlignConfig(epochs=2, lr=1e-2, candidates=10, random=5, users_per_step=40)
    for terms in (AlignmentConfig(), AlignmentConfig(distill_weight=1.0, reward_weight=0.5)):
        steps.clear()
        student = copy.deepcopy(model)
        shared = {id(p) for p in model.parameters()} & {id(p) for p in student.parameters()}
        assert not shared
        history = align_retrieval(student, teacher, retriever_positives(run), config.model_copy(
            update={"alignment": terms}))  # fmt: skip
        assert len(steps) == 2 * 4 and [h["epoch"] for h in history] == [1, 2]
        assert all(np.isfinite(v) for h in history for v in h.values())
        moved = any(not torch.equal(v, student.state_dict()[k]) for k, v in before.items())
        assert moved and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert set(history[-1]) == {"epoch", "retrieval", "distill", "reward", "alignment"}
    # The alignment term is the weighted sum of its parts, step by step, so also in the means.
    last = history[-1]
    assert last["alignment"] == pytest.approx(last["distill"] + 0.5 * last["reward"], rel=1e-5)


def test_teacher_top_breaks_ties_towards_the_lower_catalogue_index() -> None:
    class Tied:
        def score(self, user_emb, item_idx, item_emb):
            return (item_idx % 3 == 2).float()  # items 2, 5, 8, ... best, the rest tied

    teacher = Teacher(Tied(), torch.eye(2), torch.eye(40))  # type: ignore[arg-type]
    top = teacher.top(torch.arange(2), 16)
    best = list(range(2, 40, 3))
    rest = [i for i in range(40) if i % 3 != 2]
    assert top.tolist() == [best + rest[:3]] * 2
