import math

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import tiny_config
from twotower.config import parse_config
from twotower.data.dataset import build_retrieval_data
from twotower.demo import popularity_metrics
from twotower.experiment import train_run
from twotower.frequency import CountFrequency, StreamingFrequencyEstimator
from twotower.losses import listwise_softmax
from twotower.negatives import ImpressionSampler, PopularitySampler, UniformSampler
from twotower.recommender import Retriever
from twotower.tasks import RetrievalTask

Q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
C = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
IDS = torch.tensor([0, 1])
# Scores q_i . c_j = [[1, 1], [0, 1]]: positives (diagonal) 1 and 1; in-batch negatives 1 (row 0), 0 (row 1).


def sp(x):
    return math.log1p(math.exp(x))


@pytest.mark.parametrize(
    ("objective", "expected"),
    [
        ("hinge", (max(0, 1 + 0.5 - 1) + max(0, 0 + 0.5 - 1)) / 2),
        ("logistic", (sp((1 - 1) / 0.5) + sp((0 - 1) / 0.5)) / 2),
        ("pointwise_bce", ((sp(-2) + sp(2)) + (sp(-2) + sp(0))) / 2),
        ("pointwise_mse", ((1 - 1) ** 2 + (1 + 1) ** 2 + (1 - 1) ** 2 + (0 + 1) ** 2) / 2),
        ("softmax", (math.log(2) + math.log(1 + math.exp(-2))) / 2),
    ],
)
def test_every_objective_on_in_batch_negatives_by_hand(objective, expected):
    task = RetrievalTask(temperature=0.5, objective=objective, margin=0.5)
    assert task(Q, C, IDS).item() == pytest.approx(expected, rel=1e-6)


def test_hinge_margin_behaviour():
    # Row 0's gap s+ - s- is 0 and row 1's is 1: with a margin of 1 row 1 sits exactly on the boundary.
    assert RetrievalTask(objective="hinge", margin=1.0)(Q, C, IDS).item() == pytest.approx((1 + 0) / 2)
    assert RetrievalTask(objective="hinge", margin=0.0)(Q, C, IDS).item() == 0.0


def _negatives(task, pos_ids, n_rows=6, dim=4):
    gen = torch.Generator().manual_seed(0)
    query, cand = torch.randn(n_rows, dim, generator=gen), torch.randn(n_rows, dim, generator=gen)

    def embed(ids):
        return torch.nn.functional.embedding(
            ids, torch.randn(10, dim, generator=torch.Generator().manual_seed(1))
        )

    out = task._negatives(
        query, cand, pos_ids, {"item_idx": pos_ids, "user_idx": torch.arange(n_rows)}, embed
    )
    return out, (query, cand, embed)


@pytest.mark.parametrize("shared", [True, False])
def test_no_valid_negative_equals_its_own_positive(shared):
    torch.manual_seed(0)
    pos_ids = torch.tensor([0, 1, 1, 2, 0, 2])  # duplicates in the batch and a 3-item sampler: many hits
    task = RetrievalTask(temperature=0.1, sampler=UniformSampler(3), num_sampled=8, shared=shared)
    (sims, ids, _, mask, _), _ = _negatives(task, pos_ids)
    mask = mask & (ids != pos_ids[:, None])  # what forward applies with remove_accidental_hits
    assert ids.shape == (6, 6 + 8)  # in-batch columns, then the shared or per-row sampled ones
    assert not bool((ids == pos_ids[:, None])[mask].any())
    loss = task(torch.randn(6, 4), torch.randn(6, 4), pos_ids, embed_items=lambda i: torch.randn(len(i), 4))
    assert torch.isfinite(loss)


def test_mixed_negatives_use_the_mixture_probability():
    counts = torch.tensor([6.0, 3.0, 1.0, 0.0])
    task = RetrievalTask(
        temperature=0.5, sampling_probability=CountFrequency(counts), sampler=UniformSampler(4), num_sampled=2
    )
    torch.manual_seed(5)
    pos_ids = torch.tensor([0, 1])
    query, cand = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.6, 0.8], [0.0, 1.0]])
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.8, 0.6]])
    loss = task(query, cand, pos_ids, embed_items=lambda ids: table[ids])
    torch.manual_seed(5)
    extra = torch.randint(0, 4, (2,))  # the same draws the uniform sampler made
    pool = torch.cat([pos_ids, extra])
    # q(y) = (B p_batch(y) + B' p_uniform(y)) / (B + B'); p_batch = count / 10, zero counts floored to 1.
    p_batch = counts.clamp_min(1)[pool] / 10
    q = (2 * p_batch + 2 * 0.25) / 4
    sims = query @ torch.cat([cand, table[extra]]).T / 0.5
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[0, 0] = mask[1, 1] = False
    mask &= pool[None, :] != pos_ids[:, None]
    expected = listwise_softmax(
        sims.diagonal(), sims, mask, None, q.log()[:2].double(), q.log().double().expand(2, 4)
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


SCHEMES = {
    "pointwise 1:3": {
        "objective": "pointwise_bce",
        "negatives": {"in_batch": False, "sampler": "uniform", "num_sampled": 3, "shared": False},
    },
    "hinge in-batch": {"objective": "hinge", "margin": 0.3},
    "bpr popularity": {
        "objective": "logistic",
        "negatives": {"in_batch": False, "sampler": "popularity", "num_sampled": 4, "shared": False},
    },
    "listwise uniform": {
        "objective": "softmax",
        "logq": "counts",
        "negatives": {"in_batch": False, "sampler": "uniform", "num_sampled": 32},
    },
    "mixed + hard": {
        "objective": "softmax",
        "logq": "counts",
        "negatives": {
            "sampler": "uniform",
            "num_sampled": 64,
            "hard": {"num": 2, "pool": 10, "refresh_every": 5},
        },
    },
}


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_every_scheme_learns_the_planted_structure(scheme, tmp_path):
    raw = tiny_config(epochs=4).model_dump()
    raw["task"] = SCHEMES[scheme]
    raw["model"]["user_tower"]["dropout"] = raw["model"]["item_tower"]["dropout"] = 0.0
    cfg = parse_config(raw)
    data = build_retrieval_data(cfg)
    metrics = train_run(cfg, tmp_path, progress=False, data=data)
    popular = popularity_metrics(data, "temporal")
    assert metrics["recall@10"] > 1.3 * popular["recall@10"], (scheme, metrics["recall@10"], popular)
    retriever = Retriever.load(tmp_path)  # every scheme's state (samplers, miner) loads back strictly
    if "hard" in scheme:
        assert int(retriever.model.task.miner.last_refresh) > 0


def test_impressed_not_clicked_negatives_from_a_clicked_column(tmp_path):
    from twotower.data.synthetic import SyntheticWorld, WorldConfig

    world = SyntheticWorld.generate(WorldConfig(num_users=200, num_items=100, seed=2))
    clicks = world.sample_interactions().assign(clicked=1)
    # Impressions: items the user was shown and skipped, the least liked ones (a known answer).
    worst = world.affinity_matrix().argsort(axis=1)[:, :5]
    shown = pd.DataFrame(
        {
            "user_id": np.repeat(np.arange(200), 5),
            "item_id": worst.ravel(),
            "timestamp": clicks.groupby("user_id")["timestamp"].min().repeat(5).to_numpy() - 1,
            "rating": 1.0,
            "clicked": 0,
        }
    )
    log = pd.concat([clicks, shown]).sample(frac=1.0, random_state=0)
    log["clicked"] = log["clicked"].map({1: "yes", 0: "no"})
    path = tmp_path / "log.csv"
    log.to_csv(path, index=False)
    raw = tiny_config(epochs=2).model_dump()
    raw["data"] = {
        "source": "files",
        "interactions": str(path),
        "columns": {"timestamp": "timestamp", "clicked": "clicked"},
    }
    raw["features"] = {
        "user": [{"type": "id", "name": "user_id"}],
        "item": [{"type": "id", "name": "item_id"}],
    }
    raw["model"]["user_tower"]["layers"] = raw["model"]["item_tower"]["layers"] = []
    raw["task"] = {"logq": "counts", "negatives": {"impressions": 3}}
    cfg = parse_config(raw)
    data = build_retrieval_data(cfg)
    assert len(data.impressions) == 1000 and len(data.raw.interactions) == len(clicks)
    imp_pairs = set(zip(data.impressions.user_idx.tolist(), data.impressions.item_idx.tolist(), strict=True))
    model_dir = tmp_path / "run"
    train_run(cfg, model_dir, progress=False, data=data)
    task = Retriever.load(model_dir).model.task
    drawn = task.impressions.sample({"user_idx": torch.arange(200)}, 4)
    for user, items, valid in zip(range(200), drawn.ids.tolist(), drawn.mask.tolist(), strict=True):
        assert all((user, item) in imp_pairs for item, ok in zip(items, valid, strict=True) if ok)
    no_impressions = tiny_config().model_dump()
    no_impressions["task"] = {"negatives": {"impressions": 2}}
    with pytest.raises(ValueError, match="clicked"):
        train_run(parse_config(no_impressions), tmp_path / "x", progress=False)


def test_pointwise_bce_one_to_two_with_per_row_negatives_by_hand():
    table = torch.nn.functional.normalize(
        torch.randn(5, 3, generator=torch.Generator().manual_seed(0)), dim=1
    )
    query, pos_ids = table[[1, 2, 3]], torch.tensor([0, 1, 2])
    task = RetrievalTask(
        temperature=0.5,
        objective="pointwise_bce",
        in_batch=False,
        sampler=UniformSampler(5),
        num_sampled=2,
        shared=False,
    )
    torch.manual_seed(3)
    loss = task(query, table[pos_ids], pos_ids, embed_items=lambda ids: table[ids])
    torch.manual_seed(3)
    drawn = torch.randint(0, 5, (6,)).view(3, 2)  # the uniform sampler's draws, two per row
    expected = 0.0
    for row in range(3):
        z_pos = float(query[row] @ table[pos_ids[row]]) / 0.5
        z_negs = [float(query[row] @ table[j]) / 0.5 for j in drawn[row] if j != pos_ids[row]]
        expected += sp(-z_pos) + sum(sp(z) for z in z_negs)  # 1 : 2 (accidental hits removed)
    assert loss.item() == pytest.approx(expected / 3, rel=1e-5)


@pytest.mark.parametrize("objective", ["softmax", "pointwise_bce", "pointwise_mse", "hinge", "logistic"])
def test_a_repeated_positive_is_never_its_own_negative(objective):
    # Rows 0 and 1 share item 5: each row's only in-batch negative is then the other row's item 9.
    q, c = (
        torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]),
        torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]),
    )
    ids = torch.tensor([5, 5, 9])
    task = RetrievalTask(temperature=0.5, objective=objective, margin=0.5)
    got = task(q, c, ids).item()
    sims = q @ c.T
    keep = torch.tensor([[False, False, True], [False, False, True], [True, True, False]])
    from twotower import losses

    neg = sims.masked_fill(~keep, 0.0)
    scale = 1.0 if objective in ("hinge", "pointwise_mse") else 0.5
    kwargs = {"margin": 0.5} if objective == "hinge" else {}
    want = losses.LOSSES[objective](sims.diagonal() / scale, neg / scale, neg_mask=keep, **kwargs)
    assert got == pytest.approx(want.item(), rel=1e-6)
    assert RetrievalTask(temperature=0.5, objective=objective, margin=0.5, fused=False)(q, c, ids).item() == (
        pytest.approx(got, rel=1e-6)
    )


@pytest.mark.parametrize("objective", ["softmax", "pointwise_bce", "pointwise_mse", "hinge", "logistic"])
def test_a_batch_of_one_has_no_in_batch_negative(objective):
    q, c = torch.tensor([[0.6, 0.8]]), torch.tensor([[1.0, 0.0]])
    loss = RetrievalTask(temperature=0.5, objective=objective)(q, c, torch.tensor([3]))
    only_positive = {"pointwise_bce": sp(-0.6 / 0.5), "pointwise_mse": (0.6 - 1) ** 2}
    assert loss.item() == pytest.approx(only_positive.get(objective, 0.0), rel=1e-6, abs=1e-7)


def test_hinge_is_on_the_similarity_scale_and_logistic_on_the_logits():
    hinge = [
        RetrievalTask(temperature=t, objective="hinge", margin=0.5)(Q, C, IDS).item() for t in (0.1, 1.0)
    ]
    assert hinge[0] == hinge[1]
    logistic = [RetrievalTask(temperature=t, objective="logistic")(Q, C, IDS).item() for t in (0.1, 1.0)]
    assert logistic[0] != pytest.approx(logistic[1])


def test_per_row_draws_mixed_with_in_batch_negatives_use_the_mixture_probability():
    # Mixed negatives with per-row draws (shared=False): B = 2 in-batch candidates with
    # p_batch = count / 10 (counts 6, 3, 1, 0 -> floored to 1) plus n = 1 uniform draw per row over
    # I = 4 items. Row i's candidates come from a pool in which item y is expected
    # B p_batch(y) + n / I times, so every candidate of the row, in-batch or drawn, is corrected by
    #   q(y) = (2 p_batch(y) + 1/4) / 3:
    #   item 0: (1.2 + .25) / 3 = 1.45 / 3;  item 1: (.6 + .25) / 3 = .85 / 3;  items 2, 3: .45 / 3.
    # All similarities are 0, so z(y) = -log q(y) = log 3 - log(3 q(y)); the log 3 cancels:
    #   row 0 (positive 0; negatives: item 1 in-batch, its draw 3):
    #       l0 = log(1/1.45 + 1/.85 + 1/.45) + log 1.45 = log(5.9281) = 1.7797
    #   row 1 (positive 1; negatives: item 0 in-batch, its draw 2):
    #       l1 = log(1/.85 + 1/1.45 + 1/.45) + log .85 = log(3.4751) = 1.2456
    # mean 1.5127. (Per-part corrections, log p_batch for in-batch columns and log 1/4 for the draws,
    # give log 5.4 and log 2.7 instead.)
    counts = torch.tensor([6.0, 3.0, 1.0, 0.0])
    task = RetrievalTask(
        temperature=1.0,
        sampling_probability=CountFrequency(counts),
        sampler=UniformSampler(4),
        num_sampled=1,
        shared=False,
    )
    pos_ids = torch.tensor([0, 1])
    torch.manual_seed(5)
    assert torch.randint(0, 4, (2,)).tolist() == [3, 2]  # the draws the sampler makes under seed 5
    torch.manual_seed(5)
    zeros = torch.zeros(2, 2)
    loss = task(zeros, zeros, pos_ids, embed_items=lambda ids: torch.zeros(len(ids), 2))
    total = 1 / 1.45 + 1 / 0.85 + 1 / 0.45
    expected = (math.log(total * 1.45) + math.log(total * 0.85)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(1.5127, abs=1e-4)


@pytest.mark.parametrize("estimator", ["counts", "streaming"])
def test_an_item_gets_one_log_q_whether_in_batch_or_drawn_per_row(estimator):
    # Whatever the estimator's scale (probability per example, or occurrences per step), one row's
    # candidates share one sampling distribution: the same item has the same log q in both parts.
    from twotower.frequency import StreamingFrequencyEstimator

    counts = torch.tensor([5.0, 1.0, 1.0, 3.0, 2.0, 0.0, 1.0, 4.0, 2.0, 1.0])
    frequency = CountFrequency(counts) if estimator == "counts" else StreamingFrequencyEstimator(64, 2)
    task = RetrievalTask(
        temperature=0.5,
        sampling_probability=frequency,
        sampler=UniformSampler(10),
        num_sampled=40,
        shared=False,
    )
    pos_ids = torch.tensor([0, 3, 7, 0, 4, 8])
    frequency.update(pos_ids)
    torch.manual_seed(0)
    (_, ids, log_q, _, log_q_pos), _ = _negatives(task, pos_ids)
    for item in pos_ids.unique().tolist():
        values = log_q[ids == item]
        assert values.numel() > 1 and torch.allclose(values, values[0]), (item, values)
        assert torch.allclose(log_q_pos[pos_ids == item], values[0])


class _ExactRate(StreamingFrequencyEstimator):
    """A streaming estimator (occurrences per batch) that knows the true rates B p(y) of a batch of 2."""

    def log_probability(self, ids):
        return torch.log(2 * torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)[ids])


@pytest.mark.parametrize("estimator", ["counts", "streaming"])
def test_chosen_negatives_weigh_like_a_candidate_expected_once_per_batch(estimator):
    # p = counts / 4 = (.5, .25, .25); a batch of B = 2 positives (items 0, 1) expects item y
    # B p(y) times: 1 and .5. Each user's one impression (item 2) is a chosen negative, present once:
    # correction log 1 = 0. All similarities 0 at temperature 1, so z = -log E[n]: 0, log 2, 0.
    #   row 0 (positive item 0, z 0; item 1 z log 2, impression z 0): log(1 + 2 + 1) = log 4
    #   row 1 (positive item 1, z log 2; item 0 z 0, impression z 0): log(2 + 1 + 1) - log 2 = log 2
    # mean 1.5 log 2. The old correction, -log p for drawn candidates and nothing for chosen ones,
    # gave (log 3.5 + log 1.75) / 2 with counts and another value per estimator.
    counts = torch.tensor([2.0, 1.0, 1.0])
    frequency = CountFrequency(counts) if estimator == "counts" else _ExactRate()
    impressions = ImpressionSampler.from_pairs(torch.tensor([0, 1]), torch.tensor([2, 2]), num_users=2)
    task = RetrievalTask(
        temperature=1.0, sampling_probability=frequency, impressions=impressions, impressions_num=1
    )
    task.eval()  # the streaming estimator learns nothing from this batch
    zeros = torch.zeros(2, 2)
    batch = {"user_idx": torch.tensor([0, 1]), "item_idx": torch.tensor([0, 1])}
    loss = task(
        zeros, zeros, torch.tensor([0, 1]), batch=batch, embed_items=lambda ids: torch.zeros(len(ids), 2)
    )
    assert loss.item() == pytest.approx(1.5 * math.log(2), rel=1e-6)


def test_a_positive_the_sampler_almost_never_draws_keeps_a_finite_loss():
    # popularity^100 over counts (1e4, 1): item 1's probability underflows to 0.0, so log(n q) was -inf
    # for a positive on item 1 and the logQ-corrected softmax gave NaN.
    counts = torch.tensor([1e4, 1.0])
    task = RetrievalTask(
        temperature=1.0,
        sampling_probability=CountFrequency(counts),
        sampler=PopularitySampler(counts, alpha=100.0),
        num_sampled=3,
        in_batch=False,
        shared=False,
    )
    query = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    loss = task(query, query, torch.tensor([0, 1]), embed_items=lambda ids: torch.eye(2)[ids])
    assert torch.isfinite(loss)
