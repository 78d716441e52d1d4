"""Known-answer tests for twotower.evaluate on tiny hand-built embeddings."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from twotower.data.splits import random_split, stratified_split, temporal_split
from twotower.evaluate import PROTOCOLS, Protocol, evaluate_embeddings, split_for
from twotower.metrics import compute_metrics
from twotower.topk import CSR

# s(u, i) = user . item. User 0 scores the x coordinate, user 1 the y coordinate:
#   item:     0       1       2       3       4       5
#   (x, y): (5, 1)  (4, 2)  (3, 5)  (2, 4)  (1, 3)  (0, 0)
# user 0 ranks 0, 1, 2, 3, 4, 5; user 1 ranks 2, 3, 4, 1, 0, 5. User 2 (1, 1) only has training data.
USER_EMB = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
ITEM_EMB = torch.tensor([[5.0, 1.0], [4.0, 2.0], [3.0, 5.0], [2.0, 4.0], [1.0, 3.0], [0.0, 0.0]])

# msrec case. Train: user 0 {0}, user 1 {2, 4}, user 2 {1, 3}. Test: user 0 {1, 3}, user 1 {0}.
# After exclusion: user 0 ranks 1, 2, 3, 4, 5 -> hits at ranks 1 and 3 (R = 2);
#                  user 1 ranks 3, 1, 0, 5    -> hit at rank 3 (R = 1).
MS_TRAIN = (torch.tensor([0, 1, 1, 2, 2]), torch.tensor([0, 2, 4, 1, 3]))
MS_TEST = (torch.tensor([0, 0, 1]), torch.tensor([1, 3, 0]))


@pytest.mark.parametrize("item_chunk", [1, 4, 65536])
def test_msrec_excludes_train_items_hand_values(item_chunk: int):
    out = evaluate_embeddings(
        PROTOCOLS["msrec"], USER_EMB, ITEM_EMB, *MS_TEST, *MS_TRAIN, item_chunk=item_chunk
    )
    expected = {
        "ndcg@10": ((1 / 1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)) + (1 / math.log2(4)) / 1) / 2,
        "recall@10": (2 / 2 + 1 / 1) / 2,
        "precision@10": (2 / 10 + 1 / 10) / 2,
        "map@10": ((1 / 1 + 2 / 3) / 2 + (1 / 3) / 1) / 2,
        "mrr@10": (1 / 1 + 1 / 3) / 2,
        "hit@10": (1 + 1) / 2,
    }
    assert set(out) == set(expected) | {"protocol", "n_queries"}
    assert out["protocol"] == "msrec" and out["n_queries"] == 2
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key


def test_msrec_custom_ks():
    out = evaluate_embeddings(PROTOCOLS["msrec"], USER_EMB, ITEM_EMB, *MS_TEST, *MS_TRAIN, ks=(1, 3))
    expected = {
        "ndcg@1": (1 + 0) / 2,
        "ndcg@3": ((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)) + (1 / math.log2(4)) / 1) / 2,
        "recall@1": (1 / 2 + 0) / 2,
        "recall@3": (2 / 2 + 1 / 1) / 2,
        "precision@1": (1 / 1 + 0) / 2,
        "precision@3": (2 / 3 + 1 / 3) / 2,
        "map@1": ((1 / 1) / 2 + 0) / 2,
        "map@3": ((1 / 1 + 2 / 3) / 2 + (1 / 3) / 1) / 2,
        "mrr@1": (1 + 0) / 2,
        "mrr@3": (1 + 1 / 3) / 2,
        "hit@1": (1 + 0) / 2,
        "hit@3": (1 + 1) / 2,
    }
    assert set(out) == set(expected) | {"protocol", "n_queries"}
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key


# tfrs case: every test rating is a query, nothing is excluded (user 0's training item 0 stays).
# user 0 rated 1, 3, 5 (positions 2, 4, 6 in 0, 1, 2, 3, 4, 5); user 1 rated 2 (position 1).
TF_TEST = (torch.tensor([0, 0, 0, 1]), torch.tensor([1, 3, 5, 2]))
TF_TRAIN = (torch.tensor([0]), torch.tensor([0]))


@pytest.mark.parametrize("train", [TF_TRAIN, (None, None)])
def test_tfrs_per_rating_queries_nothing_excluded(train):
    out = evaluate_embeddings(PROTOCOLS["tfrs"], USER_EMB, ITEM_EMB, *TF_TEST, *train, item_chunk=4)
    assert out["protocol"] == "tfrs" and out["n_queries"] == 4
    assert out["top1_accuracy"] == pytest.approx((0 + 0 + 0 + 1) / 4)  # excluding item 0 would give 2/4
    assert out["top5_accuracy"] == pytest.approx((1 + 1 + 0 + 1) / 4)
    for k in (10, 50, 100):  # deeper than the 6-item catalogue: every target is found
        assert out[f"top{k}_accuracy"] == pytest.approx((1 + 1 + 1 + 1) / 4)


def test_tfrs_custom_ks():
    out = evaluate_embeddings(PROTOCOLS["tfrs"], USER_EMB, ITEM_EMB, *TF_TEST, None, None, ks=(2, 4))
    assert set(out) == {"top2_accuracy", "top4_accuracy", "protocol", "n_queries"}
    assert out["top2_accuracy"] == pytest.approx((1 + 0 + 0 + 1) / 4)
    assert out["top4_accuracy"] == pytest.approx((1 + 1 + 0 + 1) / 4)


def test_per_rating_target_excluded_is_a_miss_even_beyond_the_catalogue():
    # A custom per-rating protocol WITH exclusion, cut-off 5 > 3 items: user 0 ranks 1, 2 after
    # excluding item 0, so target 0 is absent (a miss at every k) and target 1 is first.
    proto = Protocol(
        "x", k=5, exclude_train=True, per_rating_queries=True, metrics=("top1_accuracy", "top5_accuracy")
    )
    out = evaluate_embeddings(
        proto,
        USER_EMB[:1],
        ITEM_EMB[:3],
        torch.tensor([0, 0]),
        torch.tensor([0, 1]),
        torch.tensor([0]),
        torch.tensor([0]),
    )
    assert out["top1_accuracy"] == pytest.approx((0 + 1) / 2)
    assert out["top5_accuracy"] == pytest.approx((0 + 1) / 2)


def temporal_frame() -> pd.DataFrame:
    # user 0: items 0, 1, 3 at t = 1, 2, 3 -> train {0}, valid {1}, test {3}
    # user 1: items 2, 0, 3 at t = 1, 2, 3 -> train {2}, valid {0}, test {3}
    # user 2: two interactions -> all train, no query
    return pd.DataFrame(
        {
            "user_id": [0, 1, 0, 1, 2, 0, 1, 2],
            "item_id": [0, 2, 1, 0, 1, 3, 3, 3],
            "timestamp": [1, 1, 2, 2, 1, 3, 3, 2],
        }
    )


def as_index(df: pd.DataFrame) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(df["user_id"].to_numpy()), torch.tensor(df["item_id"].to_numpy())


def test_temporal_protocol_hand_values():
    train, valid, test = split_for("temporal", temporal_frame())
    assert valid is not None
    # user 0 excludes {0}: ranks 1, 2, 3, ... -> test item 3 at rank 3 (valid item 1 stays rankable)
    # user 1 excludes {2}: ranks 3, 4, 1, 0, 5 -> test item 3 at rank 1
    out = evaluate_embeddings(PROTOCOLS["temporal"], USER_EMB, ITEM_EMB, *as_index(test), *as_index(train))
    assert out["protocol"] == "temporal" and out["n_queries"] == 2
    assert out["ndcg@10"] == pytest.approx((1 / math.log2(4) + 1 / 1) / 2)
    assert out["recall@10"] == pytest.approx((1 + 1) / 2)
    assert out["precision@10"] == pytest.approx((1 / 10 + 1 / 10) / 2)
    assert out["map@10"] == pytest.approx((1 / 3 + 1 / 1) / 2)
    assert out["mrr@10"] == pytest.approx((1 / 3 + 1 / 1) / 2)
    assert out["hit@10"] == pytest.approx((1 + 1) / 2)
    # Passing train + valid as "train" also removes the validation items: user 0 now ranks 2, 3, ...
    seen = pd.concat([train, valid])
    out = evaluate_embeddings(PROTOCOLS["temporal"], USER_EMB, ITEM_EMB, *as_index(test), *as_index(seen))
    assert out["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1 / 1) / 2)
    assert out["mrr@10"] == pytest.approx((1 / 2 + 1 / 1) / 2)


def random_case():
    gen = torch.Generator().manual_seed(3)
    users = torch.randint(-2, 3, (9, 3), generator=gen).float()  # small integers: many exact ties
    items = torch.randint(-2, 3, (23, 3), generator=gen).float()
    tr_u, tr_i = torch.randint(0, 9, (60,), generator=gen), torch.randint(0, 23, (60,), generator=gen)
    te_u, te_i = torch.randint(0, 8, (30,), generator=gen), torch.randint(0, 23, (30,), generator=gen)
    return users, items, te_u, te_i, tr_u, tr_i


@pytest.mark.parametrize("name", ["msrec", "temporal", "tfrs"])
def test_chunked_equals_unchunked(name: str):
    users, items, te_u, te_i, tr_u, tr_i = random_case()
    ks = (1, 5, 20, 30)
    full = evaluate_embeddings(PROTOCOLS[name], users, items, te_u, te_i, tr_u, tr_i, ks=ks, item_chunk=10**6)
    for chunk in (1, 2, 5, 22):
        part = evaluate_embeddings(
            PROTOCOLS[name], users, items, te_u, te_i, tr_u, tr_i, ks=ks, item_chunk=chunk
        )
        assert part == full, chunk


def test_exclusion_matches_bruteforce_reference():
    users, items, te_u, te_i, tr_u, tr_i = random_case()
    out = evaluate_embeddings(
        PROTOCOLS["msrec"], users, items, te_u, te_i, tr_u, tr_i, ks=(5, 20), item_chunk=4
    )
    # Reference: full score matrix, training pairs set to -inf, lexsort by (score desc, index asc).
    q_users = np.unique(te_u.numpy())
    scores = (users @ items.T).numpy().astype(np.float64)
    scores[tr_u.numpy(), tr_i.numpy()] = -np.inf
    lists = []
    for u in q_users:
        order = np.lexsort((np.arange(23), -scores[u]))[:20]
        lists.append(np.where(np.isfinite(scores[u][order]), order, -1))
    row = {u: r for r, u in enumerate(q_users)}
    rel = CSR.from_pairs(torch.tensor([row[u] for u in te_u.tolist()]), te_i, len(q_users))
    ref = compute_metrics(torch.tensor(np.array(lists)), rel, ks=(5, 20))
    assert out["n_queries"] == len(q_users)
    for key, value in ref.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key


def test_out_of_range_and_bad_arguments_raise():
    msrec = PROTOCOLS["msrec"]
    te_u, te_i = MS_TEST
    tr_u, tr_i = MS_TRAIN
    bad_calls = [
        (torch.tensor([0, 3]), torch.tensor([1, 1]), tr_u, tr_i),  # user 3 of 3
        (te_u, torch.tensor([1, -1, 0]), tr_u, tr_i),  # negative item
        (te_u, torch.tensor([1, 6, 0]), tr_u, tr_i),  # item 6 of 6
        (te_u, te_i, torch.tensor([0, 1, 1, 2, 5]), tr_i),  # train user out of range
        (te_u, te_i, tr_u, torch.tensor([0, 2, 4, 1, 6])),  # train item out of range
        (te_u, te_i, tr_u, torch.tensor([0, 2, 4, 1, -1])),  # negative train item
        (te_u, te_i[:2], tr_u, tr_i),  # length mismatch
        (te_u, te_i, tr_u, tr_i[:4]),  # train length mismatch
        (te_u, te_i, None, None),  # msrec excludes training items: they are required
    ]
    for args in bad_calls:
        with pytest.raises(ValueError):
            evaluate_embeddings(msrec, USER_EMB, ITEM_EMB, *args)
    for ks in [(), (0, 10)]:
        with pytest.raises(ValueError):
            evaluate_embeddings(msrec, USER_EMB, ITEM_EMB, te_u, te_i, tr_u, tr_i, ks=ks)
    with pytest.raises(ValueError):
        evaluate_embeddings(
            PROTOCOLS["tfrs"], USER_EMB, ITEM_EMB, torch.tensor([3]), torch.tensor([0]), None, None
        )
    with pytest.raises(ValueError):
        Protocol("bad", k=5, exclude_train=True, per_rating_queries=False, metrics=("ndcg@10",))
    with pytest.raises(ValueError):
        Protocol("bad", k=10, exclude_train=True, per_rating_queries=False, metrics=("auc@10",))


def test_split_for_names():
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "user_id": np.repeat(np.arange(8), 5),
            "item_id": rng.integers(0, 12, 40),
            "timestamp": rng.integers(0, 1000, 40),
        }
    )
    assert set(PROTOCOLS) == {"msrec", "tfrs", "temporal"}
    train, valid, test = split_for("msrec", df)
    ref_train, ref_test = stratified_split(df, ratio=0.75, filter_by="item", seed=42)
    assert valid is None
    pd.testing.assert_frame_equal(train, ref_train)
    pd.testing.assert_frame_equal(test, ref_test)
    train, valid, test = split_for("tfrs", df)
    ref_train, ref_test = random_split(df, test_fraction=0.2, seed=42)
    assert valid is None and (len(train), len(test)) == (32, 8)
    pd.testing.assert_frame_equal(train, ref_train)
    pd.testing.assert_frame_equal(test, ref_test)
    parts = split_for("temporal", df)
    for got, ref in zip(parts, temporal_split(df), strict=True):
        pd.testing.assert_frame_equal(got, ref)
    assert [len(p) for p in parts] == [40 - 8 - 8, 8, 8]  # 8 users with 5 rows each: 3 / 1 / 1
    with pytest.raises(KeyError):
        split_for("movielens", df)


# Repeat consumption: user 0 trained on items 0 and 2 and is tested on 0 (a repeat) and 1; user 1 trained
# on item 1 (user 0's test item) and is tested on 2.
REPEAT_TRAIN = (torch.tensor([0, 0, 1]), torch.tensor([0, 2, 1]))
REPEAT_TEST = (torch.tensor([0, 0, 1]), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("name", ["msrec", "temporal"])
def test_repeated_test_item_is_excluded_but_still_relevant_and_exclusion_is_per_user(name: str):
    # Module docstring: a relevant item that is also a training pair of the same user can never be
    # retrieved (Microsoft's remove_seen), yet it still counts in R. Exclusion is per user: user 1's
    # training item 1 stays rankable for user 0.
    #   user 0 ranks 0..5, minus {0, 2} -> 1, 3, 4, 5: item 1 at rank 1, item 0 absent, R = 2
    #   user 1 ranks 2, 3, 4, 1, 0, 5, minus {1} -> 2, 3, 4, 0, 5: item 2 at rank 1, R = 1
    out = evaluate_embeddings(PROTOCOLS[name], USER_EMB, ITEM_EMB, *REPEAT_TEST, *REPEAT_TRAIN)
    assert out["n_queries"] == 2
    expected = {
        "ndcg@10": (1 / (1 + 1 / math.log2(3)) + 1 / 1) / 2,  # user 0: DCG 1, IDCG over min(2, 10) = 2
        "recall@10": (1 / 2 + 1 / 1) / 2,
        "precision@10": (1 / 10 + 1 / 10) / 2,
        "map@10": ((1 / 1) / 2 + (1 / 1) / 1) / 2,
        "mrr@10": (1 / 1 + 1 / 1) / 2,
        "hit@10": (1 + 1) / 2,
    }
    for key, value in expected.items():
        assert out[key] == pytest.approx(value, abs=1e-12), key


def test_tfrs_keeps_repeated_items_and_counts_every_test_rating():
    # Nothing is excluded: user 0's repeat item 0 is first, item 1 second; user 1's item 2 first.
    # A duplicated test rating (user 1, item 2 twice) is two queries.
    te_u, te_i = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 2, 2])
    out = evaluate_embeddings(PROTOCOLS["tfrs"], USER_EMB, ITEM_EMB, te_u, te_i, *REPEAT_TRAIN, ks=(1, 2))
    assert out["n_queries"] == 4
    assert out["top1_accuracy"] == pytest.approx((1 + 0 + 1 + 1) / 4)
    assert out["top2_accuracy"] == pytest.approx((1 + 1 + 1 + 1) / 4)


def test_tied_scores_rank_the_lower_item_index_first_after_exclusion():
    # User (1, 0) scores items x: 2, 2, 2, 1 -> a three-way tie at 2. Item 0 is a training item, so
    # the list is 1, 2, 3 (lower index first within the tie). Test item 2 sits at rank 2.
    items = torch.tensor([[2.0, 0.0], [2.0, 9.0], [2.0, -9.0], [1.0, 0.0]])
    users = torch.tensor([[1.0, 0.0]])
    out = evaluate_embeddings(
        PROTOCOLS["msrec"],
        users,
        items,
        torch.tensor([0]),
        torch.tensor([2]),
        torch.tensor([0]),
        torch.tensor([0]),
        ks=(1, 2),
    )
    assert out["mrr@2"] == pytest.approx(1 / 2) and out["hit@1"] == 0.0 and out["hit@2"] == 1.0
    assert out["ndcg@2"] == pytest.approx((1 / math.log2(3)) / 1)


def test_nan_item_embedding_raises_instead_of_ranking_first():
    # User (1) scores items 1.0, NaN, 3.0. Test item 1 has a NaN embedding. Before the fix torch.topk
    # ranked the NaN score above 3.0, so item 1 was retrieved at rank 1: hit@1 = mrr@1 = ndcg@1 = 1.0,
    # a perfect score for a broken model. NaN has no rank: evaluation must refuse it.
    items = torch.tensor([[1.0], [float("nan")], [3.0]])
    users = torch.tensor([[1.0]])
    for name in ("msrec", "tfrs"):
        with pytest.raises(ValueError, match="NaN"):
            evaluate_embeddings(
                PROTOCOLS[name],
                users,
                items,
                torch.tensor([0]),
                torch.tensor([1]),
                torch.tensor([0]),
                torch.tensor([0]),
                ks=(1,),
            )
