"""The retrieve -> rank pipeline: known users, cold start, history, exclusions, filters, errors."""

import numpy as np
import pytest
import torch

from conftest import tiny_config
from twotower.experiment import train_run
from twotower.export import export_run, load_export
from twotower.index import IndexConfig
from twotower.pipeline import MAX_K, Pipeline, RecommendRequest, RequestError
from twotower.recommender import Retriever


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    train_run(tiny_config(epochs=2), path, progress=False)
    return path


@pytest.fixture(scope="module")
def pipeline(run_dir):
    return Pipeline(load_export(export_run(run_dir)))


def _ids(answer):
    return [item.item_id for item in answer.items]


def test_known_user_matches_the_trained_model(pipeline, run_dir):
    retriever = Retriever.load(run_dir)
    for user in [7, "42"]:  # ids typed as text reach integer catalogues too
        # one user at a time on both sides: BLAS rounds differently for other batch sizes
        want_ids, want_scores = retriever.recommend([int(user)], k=10)
        answer = pipeline.recommend(RecommendRequest(user_id=user, k=10))
        assert answer.path == "known" and not answer.reranked
        assert _ids(answer) == want_ids[0].tolist()
        np.testing.assert_array_equal([i.score for i in answer.items], want_scores[0])
        assert all(i.retrieval_score == i.score and i.rank_score is None for i in answer.items)
        assert answer.items[0].metadata["title"].startswith("Item ")


def test_seen_items_are_excluded_unless_asked(pipeline):
    seen = set(pipeline.exported.item_ids[pipeline.exported.seen.row(7).numpy()].tolist())
    answer = pipeline.recommend(RecommendRequest(user_id=7, k=150))
    assert seen and not seen & set(_ids(answer))
    assert len(answer.items) == 150 - len(seen)  # the rest of the catalogue, nothing padded
    everything = pipeline.recommend(RecommendRequest(user_id=7, k=150, exclude_seen=False))
    assert set(_ids(everything)) == set(pipeline.exported.item_ids.tolist())
    extra = _ids(answer)[:3]
    fewer = pipeline.recommend(RecommendRequest(user_id=7, k=5, exclude_items=extra))
    assert not set(extra) & set(_ids(fewer))


def test_cold_start_from_features_follows_the_segment(pipeline):
    """An unknown user is served from features; different segments get different lists."""
    by_segment = {}
    for segment in ["s0", "s1", "s2"]:
        answer = pipeline.recommend(RecommendRequest(user_id="new-user", features={"segment": segment}, k=10))
        assert answer.path == "cold_start" and len(answer.items) == 10
        by_segment[segment] = _ids(answer)
    assert by_segment["s0"] != by_segment["s1"] or by_segment["s1"] != by_segment["s2"]
    # no id, no features: still an answer (out-of-vocabulary everything), never an error
    answer = pipeline.recommend(RecommendRequest(user_id=10**9))
    assert answer.path == "cold_start" and len(answer.items) == 10


def test_history_items_are_excluded_and_unknown_ones_reported(pipeline):
    answer = pipeline.recommend(RecommendRequest(user_id="nobody", history=[3, 5, "not-an-item"], k=148))
    assert {3, 5}.isdisjoint(_ids(answer)) and len(answer.items) == 148
    assert answer.ignored_history == ["not-an-item"]


def test_filters_restrict_to_matching_items(pipeline):
    answer = pipeline.recommend(RecommendRequest(user_id=7, k=20, filters={"genres": ["g2"]}))
    assert answer.items and all("g2" in i.metadata["genres"].split("|") for i in answer.items)
    table = pipeline.exported.items
    n_g2 = table["genres"].str.split("|").map(lambda t: "g2" in t).sum()
    full = pipeline.recommend(
        RecommendRequest(user_id=7, k=1000, filters={"genres": ["g2"]}, exclude_seen=False)
    )
    assert len(full.items) == n_g2
    both = pipeline.recommend(
        RecommendRequest(user_id=7, k=1000, exclude_seen=False, filters={"genres": ["g2"], "year": [1974]})
    )
    assert all(i.metadata["year"] == 1974 and "g2" in i.metadata["genres"] for i in both.items)


def test_faiss_backends_give_the_exact_answer_on_a_small_catalogue(run_dir, tmp_path, pipeline):
    flat = Pipeline(load_export(export_run(run_dir, tmp_path / "flat", IndexConfig(backend="faiss-flat"))))
    for request in [RecommendRequest(user_id=7), RecommendRequest(user_id=9, filters={"genres": ["g1"]})]:
        want = pipeline.recommend(request)
        got = flat.recommend(request)
        assert _ids(got) == _ids(want)
        np.testing.assert_allclose([i.score for i in got.items], [i.score for i in want.items], rtol=1e-5)


@pytest.mark.parametrize(
    "request_kwargs, message",
    [
        ({"features": {"segmnt": "s1"}}, "segmnt"),
        ({"filters": {"colour": ["red"]}}, "colour"),
        ({"history": [1, 2], "history_actions": [1]}, "history_actions"),
        ({"history": [1], "history_actions": [0]}, "no actions"),
    ],
)
def test_bad_requests_raise_request_errors(pipeline, request_kwargs, message):
    with pytest.raises(RequestError, match=message):
        pipeline.recommend(RecommendRequest(user_id="x", **request_kwargs))


def test_request_validation():
    with pytest.raises(ValueError, match="k"):
        RecommendRequest(k=0)
    with pytest.raises(ValueError, match="extra"):
        RecommendRequest(user=3)


def test_rerank_with_the_runs_relevance_tower(tmp_path):
    """A run with a ranker: the service re-ranks its candidates by the relevance tower alone."""
    from typer.testing import CliRunner

    from twotower.cli import app
    from twotower.data.impression_sim import simulate_impressions
    from twotower.data.synthetic import SyntheticWorld
    from twotower.reranker import RunRanker

    config = tiny_config(epochs=1)
    run_dir = tmp_path / "run"
    train_run(config, run_dir, progress=False)
    log = simulate_impressions(
        Retriever.load(run_dir), SyntheticWorld.generate(config.data.world), 600, seed=1
    )
    log.drop(columns="true_affinity").to_csv(tmp_path / "log.csv", index=False)
    (tmp_path / "ranker.yaml").write_text("columns: {user: user_id, context: [device]}\ntrain: {epochs: 2}\n")
    cfg = str(tmp_path / "ranker.yaml")
    result = CliRunner().invoke(
        app, ["train-ranker", str(run_dir), str(tmp_path / "log.csv"), "--config", cfg, "--quiet",
              "--set", "train.batch_size=64"]
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "desktop" in result.output and "mobile" in result.output  # the learned curves are shown
    bad = CliRunner().invoke(
        app, ["train-ranker", str(run_dir), str(tmp_path / "log.csv"), "--set", "train.epoks=2"]
    )
    assert bad.exit_code == 2 and "epoks" in bad.output

    exported = load_export(export_run(run_dir))
    assert exported.ranker is not None and exported.manifest["ranker"]
    pipe = Pipeline(exported, retrieve_n=40)
    answer = pipe.recommend(RecommendRequest(user_id=3, k=10))
    assert answer.reranked and len(answer.items) == 10
    ranks = [i.rank_score for i in answer.items]
    assert ranks == sorted(ranks, reverse=True) and all(i.score == i.rank_score for i in answer.items)
    # the re-ranked list is the top 10 by relevance among the 40 retrieved candidates
    plain = pipe.recommend(RecommendRequest(user_id=3, k=40, rerank=False))
    ranker = RunRanker.load(run_dir)
    idx = torch.as_tensor([pipe.item_indices([i.item_id])[0][0] for i in plain.items])[None]
    query = exported.query.known(torch.tensor([pipe.users.position(3)]))
    logits = ranker.score(query, idx, exported.item_embeddings[idx])[0]
    best = [plain.items[j].item_id for j in torch.argsort(-logits)[:10].tolist()]
    assert [i.item_id for i in answer.items] == best
    # a light ranker in front: retrieval 60 -> light ranker keeps 20 -> main ranker -> 10
    light_cfg = tmp_path / "light.yaml"
    light_cfg.write_text(
        "columns: {user: user_id, context: [device]}\nranker: {layers: [16]}\ntrain: {epochs: 1}\n"
    )
    result = CliRunner().invoke(
        app,
        [
            "train-ranker",
            str(run_dir),
            str(tmp_path / "log.csv"),
            "--config",
            str(light_cfg),
            "--light",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    exported = load_export(export_run(run_dir))
    assert exported.light_ranker is not None and exported.manifest["light_ranker"]
    funnel = Pipeline(exported, retrieve_n=60, light_n=20)
    answer = funnel.recommend(RecommendRequest(user_id=3, k=10))
    assert answer.reranked and all(
        i.light_score is not None and i.rank_score is not None for i in answer.items
    )
    retrieved = funnel.recommend(RecommendRequest(user_id=3, k=60, rerank=False))
    idx = torch.as_tensor([funnel.item_indices([i.item_id])[0][0] for i in retrieved.items])[None]
    light_logits = exported.light_ranker.score(query, idx, exported.item_embeddings[idx])[0]
    shortlist = idx[0, torch.argsort(-light_logits)[:20]][None]
    main_logits = ranker.score(query, shortlist, exported.item_embeddings[shortlist])[0]
    want = exported.item_ids[shortlist[0, torch.argsort(-main_logits)[:10]].numpy()].tolist()
    assert [i.item_id for i in answer.items] == want
    # a ranker trained on other retrieval weights is refused, not silently used
    train_run(tiny_config(epochs=1, seed=9), run_dir, progress=False)
    with pytest.raises(ValueError, match="other retrieval weights"):
        export_run(run_dir)


def test_inverted_filter_index_equals_a_scan():
    import pandas as pd

    from twotower.pipeline import _inverted, _matching

    rng = np.random.default_rng(0)
    tokens = ["a", "b", "c", "d"]
    cells = ["|".join(rng.choice(tokens, rng.integers(1, 4), replace=False)) for _ in range(300)]
    cells += [None, float("nan"), 7, "7", "a|a"]
    inverted = _inverted(cells)
    for values in (["a"], ["b", "d"], ["7"], [7], ["a|b"], ["zz"]):
        want = _matching(pd.Series(cells, dtype=object), values)
        hits = [inverted[str(v)] for v in values if str(v) in inverted]
        got = np.unique(np.concatenate(hits)) if hits else np.zeros(0, dtype=np.int64)
        np.testing.assert_array_equal(got, want)


# --- edge cases of the serving path --------------------------------------------------------------


def _brute_force(pipeline, query):
    """Every catalogue item's retrieval score, recomputed from the exported model."""
    exported = pipeline.exported
    with torch.inference_mode():
        return ((query / exported.temperature) @ exported.item_embeddings.T)[0].numpy()


def test_scores_are_sorted_and_equal_a_brute_force_recomputation(pipeline):
    exported = pipeline.exported
    with torch.inference_mode():
        known = exported.query.known(torch.tensor([pipeline.users.position(7)]))
        cold = exported.query.from_features(exported.user_encoder.transform_record({"segment": "s1"}))
    for request, query in [
        (RecommendRequest(user_id=7, k=1000, exclude_seen=False), known),
        (RecommendRequest(features={"segment": "s1"}, k=1000), cold),
    ]:
        answer = pipeline.recommend(request)
        want = _brute_force(pipeline, query)
        scores = np.array([i.score for i in answer.items])
        assert len(answer.items) == len(exported.item_ids)  # k beyond the catalogue: all of it, once
        assert len(set(_ids(answer))) == len(answer.items)
        assert np.all(np.diff(scores) <= 0)
        np.testing.assert_allclose(scores, want[pipeline.item_positions(_ids(answer))], rtol=1e-5, atol=1e-5)
        assert np.all(np.abs(scores) <= 1 / exported.temperature + 1e-4)  # cosine / temperature


def test_exclusions_can_leave_a_short_or_empty_list_never_padding(pipeline):
    all_ids = pipeline.exported.item_ids.tolist()
    seen = set(pipeline.exported.item_ids[pipeline.exported.seen.row(7).numpy()].tolist())
    history = all_ids[:140]
    answer = pipeline.recommend(RecommendRequest(user_id=7, history=history, k=50))
    assert set(_ids(answer)) == set(all_ids) - seen - set(history)
    assert pipeline.recommend(RecommendRequest(user_id="new", history=all_ids, k=5)).items == []
    assert pipeline.recommend(RecommendRequest(user_id="new", exclude_items=all_ids, k=5)).items == []
    kept = pipeline.recommend(RecommendRequest(user_id="new", history=all_ids, k=5, exclude_seen=False))
    assert len(kept.items) == 5  # exclude_seen=False: the history is only a signal
    # exclude_items holds whatever exclude_seen says
    assert 3 not in _ids(pipeline.recommend(RecommendRequest(k=150, exclude_seen=False, exclude_items=[3])))


def test_history_ids_unknown_duplicated_unicode_or_text_typed(pipeline):
    answer = pipeline.recommend(
        RecommendRequest(user_id="ünïcødé-👤", history=[3, 3, "3", "ü-item", "007", "5"], k=150)
    )
    assert answer.path == "cold_start" and answer.user_id == "ünïcødé-👤"
    assert answer.ignored_history == ["ü-item", "007"]  # "007" is not item 7 (ids.py), "5" is item 5
    assert {3, 5}.isdisjoint(_ids(answer)) and 7 in _ids(answer)
    assert len(answer.items) == 148 and len(set(_ids(answer))) == 148


def test_filters_matching_nothing_or_also_in_history(pipeline):
    for filters in ({"genres": ["no-such-genre"]}, {"genres": []}, {"genres": [None]}, {"year": [10**30]}):
        answer = pipeline.recommend(RecommendRequest(user_id=7, filters=filters))
        assert answer.items == [], filters
    table = pipeline.exported.items
    year = int(table["year"].iloc[0])
    matching = set(table["item_id"][table["year"] == year].tolist())
    only = min(matching)
    request = {"user_id": "new", "history": [only], "k": 150}
    hidden = pipeline.recommend(RecommendRequest(**request, filters={"year": [year]}))
    assert len(matching) > 1 and set(_ids(hidden)) == matching - {only}
    shown = pipeline.recommend(RecommendRequest(**request, filters={"year": [str(year)]}, exclude_seen=False))
    assert set(_ids(shown)) == matching  # a filter value typed as text matches the integer column
    with pytest.raises(RequestError, match="cannot filter on 'item_id'.*genres"):
        pipeline.recommend(RecommendRequest(filters={"item_id": [3]}))


def test_cold_start_feature_values_of_unknown_or_odd_types_are_out_of_vocabulary(pipeline):
    """An unknown categorical value, a number or a bool where a segment name is expected: all map to
    out-of-vocabulary, as a missing feature does; a list is refused."""
    baseline = _ids(pipeline.recommend(RecommendRequest(user_id="new")))
    for value in ["no-such-segment", 5, True, None, float("inf"), "ü"]:
        answer = pipeline.recommend(RecommendRequest(user_id="new", features={"segment": value}))
        assert answer.path == "cold_start" and _ids(answer) == baseline, value
    with pytest.raises(RequestError, match="takes one value"):
        pipeline.recommend(RecommendRequest(user_id="new", features={"segment": ["s1", "s2"]}))
    known = pipeline.recommend(RecommendRequest(user_id=7, features={"segment": "s2"}))
    assert known.path == "known" and _ids(known) == _ids(pipeline.recommend(RecommendRequest(user_id=7)))


def test_history_actions_of_the_wrong_type_or_length():
    from pydantic import ValidationError

    for actions in (["a"], [1.5], "01", [[1]]):
        with pytest.raises(ValidationError, match="history_actions"):
            RecommendRequest(history=[1], history_actions=actions)
    with pytest.raises(ValidationError, match="k"):
        RecommendRequest(k=MAX_K + 1)


class _StubRanker:
    """A ranker whose relevance logit is a fixed function of the catalogue index."""

    def __init__(self, logit):
        self.logit = logit

    def score(self, query, item_idx, item_embeddings):
        return self.logit(item_idx).float()


def test_rerank_orders_by_the_rankers_logit_ties_to_the_lower_index(pipeline):
    import dataclasses

    exported = pipeline.exported
    stub = Pipeline(dataclasses.replace(exported, ranker=_StubRanker(lambda i: i // 10)), retrieve_n=40)
    retrieved = pipeline.recommend(RecommendRequest(user_id=7, k=40))
    answer = stub.recommend(RecommendRequest(user_id=7, k=12))
    assert answer.reranked and len(answer.items) == 12
    positions = pipeline.item_positions(_ids(retrieved))
    want = sorted(positions, key=lambda p: (-(p // 10), p))[:12]
    assert pipeline.item_positions(_ids(answer)) == want
    assert all(i.score == i.rank_score and i.light_score is None for i in answer.items)
    by_id = {i.item_id: i.retrieval_score for i in retrieved.items}
    assert all(i.retrieval_score == by_id[i.item_id] for i in answer.items)
    plain = stub.recommend(RecommendRequest(user_id=7, k=12, rerank=False))
    assert not plain.reranked and _ids(plain) == _ids(retrieved)[:12]
    empty = stub.recommend(RecommendRequest(user_id=7, filters={"genres": ["none"]}))
    assert empty.items == []


def test_a_malformed_numeric_user_id_takes_the_cold_start_path(pipeline):
    assert pipeline.recommend(RecommendRequest(user_id="--7")).path == "cold_start"


def test_a_light_ranker_never_returns_fewer_than_k_items(pipeline):
    import dataclasses

    exported = dataclasses.replace(
        pipeline.exported, ranker=_StubRanker(lambda i: i), light_ranker=_StubRanker(lambda i: -i)
    )
    funnel = Pipeline(exported, retrieve_n=60, light_n=20)
    assert len(funnel.recommend(RecommendRequest(user_id=7, k=50, exclude_seen=False)).items) == 50
    defaults = Pipeline(exported)  # retrieve_n 500, light_n 100
    assert len(defaults.recommend(RecommendRequest(user_id=7, k=140, exclude_seen=False)).items) == 140


def test_filter_answers_do_not_depend_on_the_previous_request(pipeline):
    """On a high-cardinality column (scanned and cached) [None] and ["None"] are different filters."""
    import dataclasses

    tags = ["None" if i % 2 else "x" for i in range(150)]
    tags[0] = "|".join(f"t{j}" for j in range(10_001))  # > 10 000 distinct values: the scan + cache path
    exported = dataclasses.replace(pipeline.exported, items=pipeline.exported.items.assign(tag=tags))

    def count(p, value):
        request = RecommendRequest(user_id=7, k=1000, exclude_seen=False, filters={"tag": [value]})
        return len(p.recommend(request).items)

    fresh = Pipeline(exported)
    assert (count(fresh, None), count(Pipeline(exported), "None")) == (0, 75)
    assert count(fresh, "None") == 75  # not the cached answer for [None]


def test_an_integer_filter_matches_a_float_column_with_a_missing_cell(pipeline):
    """One missing year makes pandas read the column as float (1974.0): {"year": [1974]} matched nothing."""
    import dataclasses

    import pandas as pd

    from twotower.pipeline import _matching

    table = pipeline.exported.items
    year = int(table["year"].iloc[0])
    years = table["year"].astype(float)
    years.iloc[1] = float("nan")
    want = set(table["item_id"][years == year].tolist())
    assert want
    p = Pipeline(dataclasses.replace(pipeline.exported, items=table.assign(year=years)))
    assert "year" in p._inverted  # the inverted-index path
    for values in ([year], [float(year)], [str(year)]):
        request = RecommendRequest(user_id=7, k=1000, exclude_seen=False, filters={"year": values})
        assert set(_ids(p.recommend(request))) == want, values
    # the scan path (high-cardinality columns), by hand: 1974.0 and 1974 match, 1974.5 and NaN do not
    column = pd.Series([1974.0, float("nan"), 1974.5, 1980.0])
    assert _matching(column, [1974]).tolist() == [0]
    assert _matching(column, [1974.0, "1980"]).tolist() == [0, 3]
    assert _matching(pd.Series([1974, 1980]), [1980.0]).tolist() == [1]
