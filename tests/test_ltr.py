import numpy as np
import pytest

from twotower.data.ltr import RankingData, from_movielens, from_synthetic_world
from twotower.data.synthetic import SyntheticWorld, WorldConfig


def _small() -> RankingData:
    features = np.arange(12, dtype=np.float32).reshape(6, 2)
    return RankingData("t", features, np.array([0, 1, 2, 0, 4, 3]), np.array([0, 2, 3, 6]), 4, ["a", "b"],
                       item_index=np.array([5, 6, 7, 5, 8, 9]), num_items=10)  # fmt: skip


def test_ranking_data_checks_its_shapes():
    with pytest.raises(ValueError, match="disagree"):
        RankingData("t", np.zeros((3, 1), np.float32), np.zeros(3, np.int64), np.array([0, 2]), 4, ["x"])
    with pytest.raises(ValueError, match="at least one document"):
        RankingData("t", np.zeros((2, 1), np.float32), np.zeros(2, np.int64), np.array([0, 2, 2]), 4, ["x"])
    with pytest.raises(ValueError, match="labels must lie"):
        RankingData("t", np.zeros((2, 1), np.float32), np.array([0, 5]), np.array([0, 2]), 4, ["x"])


def test_subset_split_and_standardisation():
    data = _small()
    assert data.doc_query.tolist() == [0, 0, 1, 2, 2, 2]
    sub = data.subset(np.array([2, 0]))
    assert sub.labels.tolist() == [0, 4, 3, 0, 1]
    assert sub.query_offsets.tolist() == [0, 3, 5]
    assert sub.item_index.tolist() == [5, 8, 9, 5, 6]
    train, test = data.split(test_share=1 / 3, seed=0)
    assert train.num_queries == 2 and test.num_queries == 1
    assert sorted(train.labels.tolist() + test.labels.tolist()) == sorted(data.labels.tolist())
    mean, std = train.feature_stats()
    scaled = test.standardized(mean, std)
    assert scaled.features == pytest.approx((test.features - mean) / std)
    # A constant feature keeps std 1 (no division by zero).
    const = RankingData("c", np.ones((2, 1), np.float32), np.array([0, 1]), np.array([0, 2]), 1, ["k"])
    assert const.feature_stats()[1].tolist() == [1.0]


def test_synthetic_world_queries_follow_the_truth():
    world = SyntheticWorld.generate(WorldConfig(num_users=200, num_items=150, seed=4))
    data = from_synthetic_world(world, candidates=20)
    assert data.num_queries == 200 and data.query_offsets[-1] == 4000
    assert data.features.shape == (4000, len(data.feature_names))
    shares = np.bincount(data.labels, minlength=5) / len(data.labels)
    assert shares == pytest.approx([0.50, 0.25, 0.15, 0.07, 0.03], abs=0.002)
    truth = world.affinity(data.doc_query, data.item_index)
    # Labels are cuts of the true logit: a higher label never has a lower logit.
    for y in range(4):
        assert truth[data.labels == y].max() <= truth[data.labels == y + 1].min()
    for q in range(3):  # distinct candidates per query
        docs = data.item_index[data.query_offsets[q] : data.query_offsets[q + 1]]
        assert len(set(docs.tolist())) == 20
    segment = np.array([int(s[1:]) for s in world.users["segment"]])[data.doc_query]
    one_hot = data.features[:, : world.config.num_segments]
    assert (one_hot.argmax(axis=1) == segment).all()
    with pytest.raises(ValueError, match="exceeds the catalogue"):
        from_synthetic_world(world, candidates=151)


def test_movielens_users_are_queries_and_ratings_are_labels(ml100k):
    from twotower.data.movielens import load_movielens

    raw = load_movielens("ml-100k", path=ml100k)
    data = from_movielens(raw)
    assert data.num_queries == 943 and len(data.labels) == 100_000
    assert (
        np.bincount(data.labels).tolist() == np.bincount(raw.interactions["rating"].astype(int) - 1).tolist()
    )
    assert data.num_items == 1682 and data.max_label == 4
    assert not np.isnan(data.features).any()
    sizes = np.diff(data.query_offsets)
    assert sizes.min() >= 20  # every ML-100K user rated at least 20 movies


def _letor(tmp_path, text):
    from twotower.data.letor import read_letor

    path = tmp_path / "f.txt"
    path.write_text(text)
    return read_letor(path)


def test_from_letor_all_zero_labels_keep_a_usable_label_scale(tmp_path):
    from twotower.data.click_models import relevance_click_probability
    from twotower.data.ltr import from_letor

    data = from_letor(_letor(tmp_path, "0 qid:1 1:1\n0 qid:1 1:2\n0 qid:2 1:3\n"))
    assert data.max_label == 1  # was 0: the click mapping divided 0 by 0
    assert relevance_click_probability(data.labels, data.max_label) == pytest.approx([0.1, 0.1, 0.1])


def test_from_letor_shuffles_documents_within_queries(tmp_path):
    from twotower.data.ltr import from_letor

    # A file sorted by label, as LETOR files often are: file order must not survive, because ties
    # in score are broken by document order (evaluation and the logging policy's top N).
    lines = [f"{4 - j // 8} qid:{q} 1:{q * 100 + j}\n" for q in (1, 2) for j in range(40)]
    raw = _letor(tmp_path, "".join(lines))
    data = from_letor(raw, log_transform=False)
    assert data.query_offsets.tolist() == [0, 40, 80]
    for q in range(2):
        rows = slice(40 * q, 40 * (q + 1))
        # the same (feature, label) pairs per query, in another order
        pairs = sorted(zip(data.features[rows, 0].tolist(), data.labels[rows].tolist(), strict=True))
        assert pairs == sorted(zip(raw.features[rows, 0].tolist(), raw.labels[rows].tolist(), strict=True))
        assert not (np.diff(data.labels[rows]) <= 0).all()
    again = from_letor(raw, log_transform=False)
    assert np.array_equal(again.features, data.features)  # seeded


def test_no_documents_is_a_clear_error(tmp_path):
    from twotower.data.ltr import from_letor

    # Both used to fail with numpy's "zero-size array to reduction operation" message.
    with pytest.raises(ValueError, match="no documents"):
        RankingData("t", np.zeros((0, 1), np.float32), np.zeros(0, np.int64), np.array([0]), 4, ["x"])
    with pytest.raises(ValueError, match="no documents"):
        from_letor(_letor(tmp_path, "# only a comment\n"))


def test_label_shares_must_be_positive_and_sum_to_one():
    world = SyntheticWorld.generate(WorldConfig(num_users=20, num_items=50, seed=0))
    # (.6, .3, .2) used to give labels 0/1/2 60/30/10 %; percentages failed inside np.quantile.
    for shares in ((0.6, 0.3, 0.2), (50.0, 25.0, 15.0, 7.0, 3.0), (0.5, 0.5, 0.0)):
        with pytest.raises(ValueError, match="label_shares must be positive and sum to 1"):
            from_synthetic_world(world, candidates=20, label_shares=shares)
    data = from_synthetic_world(world, candidates=20, label_shares=(0.6, 0.3, 0.1))
    assert np.bincount(data.labels).tolist() == [240, 120, 40] and data.max_label == 2


def test_a_split_needs_two_queries_and_a_share_strictly_between_0_and_1():
    x = np.zeros((4, 1), np.float32)
    one = RankingData("one", x, np.array([0, 1, 0, 1]), np.array([0, 4]), 1, ["x"])
    with pytest.raises(ValueError, match="needs >= 2 queries"):
        one.split(0.2, seed=0)  # used to fail inside np.concatenate
    two = RankingData("two", x, np.array([0, 1, 0, 1]), np.array([0, 2, 4]), 1, ["x"])
    with pytest.raises(ValueError, match="0 < test_share < 1"):
        two.split(1.0, seed=0)
    train, test = two.split(0.9, seed=0)  # rounds to both queries: one is kept for training
    assert (train.num_queries, test.num_queries) == (1, 1)
