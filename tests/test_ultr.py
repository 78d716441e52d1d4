import numpy as np
import pandas as pd
import pytest
import torch

from twotower.data.click_log import simulate_click_log
from twotower.data.click_models import ClickModel
from twotower.data.ltr import RankingData
from twotower.ultr import METHODS, UltrConfig, evaluate_ranker, method_config, session_batches, train_ranker


def _planted(num_queries: int, seed: int) -> RankingData:
    """Relevance lives in feature 0; feature 1 is irrelevant (the misleading logging policy uses it)."""
    rng = np.random.default_rng(seed)
    per_query = 8
    d = num_queries * per_query
    x = rng.normal(size=(d, 2)).astype(np.float32)
    labels = np.clip(np.round(1.5 + 1.2 * x[:, 0]), 0, 4).astype(np.int64)
    return RankingData("planted", x, labels, np.arange(0, d + 1, per_query), 4, ["rel", "noise"])


def _config(**sim) -> UltrConfig:
    return UltrConfig.model_validate(
        {
            "simulation": {"top_n": 5, "sessions_per_query": 12, "intervention_share": 0.2,
                           "click_model": {"devices": {"desktop": {}, "mobile": {"eta": 2.0}}}, **sim},
            "ranker": {"layers": [16], "dropout": 0.0, "item_embedding_dim": 0},
            "train": {"epochs": 10, "batch_size": 128, "lr": 0.02},
        }
    )  # fmt: skip


def _logged(policy: str):
    train, test = _planted(600, seed=0), _planted(150, seed=1)
    cfg = _config()
    if policy == "random":  # position alone drives the click rate
        scores = [np.random.default_rng(s).random(len(d.labels)) for s, d in ((5, train), (6, test))]
    else:  # ranked by the irrelevant feature: the naive model learns to like it
        scores = [d.features[:, 1].astype(float) for d in (train, test)]
    log = simulate_click_log(train, scores[0], cfg.simulation, seed=0)
    test_log = simulate_click_log(test, scores[1], cfg.simulation, seed=1, sessions_per_query=2)
    truth = ClickModel(cfg.simulation.click_model, 4, 5).curves
    return train, test, log, test_log, cfg, truth


@pytest.fixture(scope="module")
def planted():
    return _logged("misleading")


def test_the_bias_tower_recovers_the_planted_curve():
    train, test, log, test_log, cfg, truth = _logged("random")
    model = train_ranker("two-tower-pal", train, log, cfg, seed=0)
    metrics, curves = evaluate_ranker(model, test, test_log, truth)
    assert set(curves) == {"desktop", "mobile"}
    assert metrics["curve_max_abs_error"] < 0.05, curves
    assert curves["desktop"][0] == pytest.approx(1.0)


def test_methods_start_without_dropout_and_take_shared_rates_their_names_do_not_fix():
    def rates(shared):
        return {m: (c.position_dropout, c.bias_dropout) for m in METHODS
                for c in [method_config(m, shared)] if c.combination != "none"}  # fmt: skip

    plain = rates({})  # not RankerConfig's defaults (.1 / .5): a name says which regulariser is on
    assert plain["two-tower-pal"] == plain["two-tower-additive"] == (0.0, 0.0)
    assert plain["two-tower-pal+position-dropout"] == (0.1, 0.0)
    assert plain["two-tower-additive+bias-dropout"] == (0.0, 0.5)
    # A shared rate reaches the methods that do not name it (bench/ultr.py's rates part), not the others.
    shared = rates({"bias_dropout": 0.2})
    assert shared["two-tower-pal"] == (0.0, 0.2) and shared["two-tower-pal+position-dropout"] == (0.1, 0.2)
    assert shared["two-tower-pal+bias-dropout"] == (0.0, 0.5)


def test_two_towers_beat_naive_under_a_misleading_logging_policy(planted):
    train, test, log, test_log, cfg, truth = planted
    model = train_ranker("two-tower-pal", train, log, cfg, seed=0)
    metrics, _ = evaluate_ranker(model, test, test_log, truth)
    naive = train_ranker("naive", train, log, cfg, seed=0)
    naive_metrics, naive_curves = evaluate_ranker(naive, test, test_log, truth)
    assert naive_curves == {}
    # Debiasing pays: the naive model learnt the logging policy's feature.
    assert metrics["ndcg@10"] > naive_metrics["ndcg@10"] + 0.02
    x = torch.from_numpy(test.features)
    leak = [np.corrcoef(m.score(x).numpy(), test.features[:, 1])[0, 1] for m in (model, naive)]
    assert leak[1] > leak[0] + 0.2, leak
    assert metrics["click_loglik"] > naive_metrics["click_loglik"]
    assert 0.5 < metrics["click_auc"] <= 1.0


def test_every_method_trains_and_evaluates(planted):
    train, test, log, test_log, cfg, truth = planted
    quick = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1})})
    for method in METHODS:
        model = train_ranker(method, train, log, quick, seed=0)
        metrics, _ = evaluate_ranker(model, test, test_log, truth)
        assert set(metrics) >= {"ndcg@1", "ndcg@3", "ndcg@5", "ndcg@10", "mrr@10"}, method
        assert ("click_loglik" in metrics) == (method_config(method).loss == "clicks"), method
        assert ("curve_max_abs_error" in metrics) == method.startswith("two-tower"), method
    with pytest.raises(ValueError, match="unknown method"):
        method_config("two-tower")


def test_fresh_clicks_are_redrawn_after_the_first_epoch(planted):
    train, _, log, _, cfg, _ = planted
    model = ClickModel(cfg.simulation.click_model, 4, 5)
    batches = session_batches(train, log, None, batch_size=10_000, seed=0, click_model=model)
    first = next(iter(batches(1)))
    second = next(iter(batches(2)))
    order1 = np.random.default_rng([0, 1, 31]).permutation(log.num_sessions)
    assert torch.equal(first["clicks"], torch.from_numpy(log.clicks[order1]))
    assert not torch.equal(second["clicks"].sum(), first["clicks"].sum()) or not torch.equal(
        second["clicks"], first["clicks"]
    )
    assert first["features"].shape == (log.num_sessions, 5, 2)


def test_a_logged_impression_file_trains_a_ranker(tmp_path):
    """CSV impressions + an item table -> queries and sessions -> a PAL ranker that finds the curve."""
    from twotower.data.click_log import from_impressions
    from twotower.data.impressions import ImpressionColumns, read_impressions

    rng = np.random.default_rng(7)
    n_items, n_req, n = 200, 4000, 5
    x = rng.normal(size=(n_items, 2))
    grade = np.clip(np.round(1.5 + 1.2 * x[:, 0]), 0, 4).astype(np.int64)
    items = pd.DataFrame({"item_id": np.arange(n_items) + 1000, "rel": x[:, 0], "noise": x[:, 1],
                          "kind": np.where(x[:, 1] > 0, "a", "b")})  # fmt: skip
    shown = np.stack([rng.choice(n_items, n, replace=False) for _ in range(n_req)])
    cfg = _config().simulation.click_model
    clicker = ClickModel(cfg, 4, n)
    device = clicker.sample_devices(n_req, rng)
    clicks = clicker.simulate(grade[shown], device, rng)
    frame = pd.DataFrame({
        "request_id": np.repeat(np.arange(n_req), n), "item_id": (shown + 1000).ravel(),
        "position": np.tile(np.arange(1, n + 1), n_req), "click": clicks.ravel().astype(int),
        "device": np.repeat(np.array(clicker.device_names)[device], n),
    })  # fmt: skip
    frame.to_csv(tmp_path / "impressions.csv", index=False)
    lists = read_impressions(tmp_path / "impressions.csv", ImpressionColumns(context=["device"])).to_lists()
    data, log = from_impressions(lists, items, context="device")
    assert data.num_queries == n_req and log.device_names == ["desktop", "mobile"]
    assert data.feature_names == ["rel", "noise", "kind=a", "kind=b"]
    assert np.array_equal(log.clicks, clicks)
    mean, std = data.feature_stats()
    data = data.standardized(mean, std)
    model = train_ranker("two-tower-pal", data, log, _config(), seed=0)  # fresh_clicks is ignored
    _, curves = evaluate_ranker(model, data, log, None)
    truth = clicker.curves / clicker.curves[:, :1]
    assert np.abs(np.array([curves["desktop"], curves["mobile"]]) - truth).max() < 0.08, curves
    scores = model.score(torch.from_numpy(data.features), torch.from_numpy(data.item_index)).numpy()
    assert np.corrcoef(scores, data.features[:, 0])[0, 1] > 0.8
    with pytest.raises(ValueError, match="missing from the item table"):
        from_impressions(lists, items.iloc[1:])


def test_held_out_queries_keep_each_query_whole_and_are_seeded(planted):
    from twotower.ultr import held_out_queries

    _, _, log, _, _, _ = planted
    held = held_out_queries(log, 0.25, seed=3)
    queries = np.unique(log.query)
    assert np.isin(queries, log.query[held]).sum() == round(0.25 * len(queries))
    assert not np.isin(log.query[held], log.query[~held]).any()  # no query on both sides
    assert np.array_equal(held, held_out_queries(log, 0.25, seed=3))
    assert not np.array_equal(held, held_out_queries(log, 0.25, seed=4))


@pytest.mark.parametrize("method", ["two-tower-pal", "oracle", "ipw-estimated"])
def test_valid_share_chooses_the_epoch_on_held_out_training_sessions(planted, method, monkeypatch):
    import twotower.ultr as ultr

    train, _, log, _, cfg, _ = planted
    cfg = cfg.model_copy(update={"valid_share": 0.2, "patience": 2})
    seen = {}
    real_fit = ultr.fit

    def fit(model, batches, config, run_dir, validate=None, progress=False):
        seen["config"], seen["validate"] = config, validate
        seen["trained_sessions"] = sum(len(b["clicks"]) for b in batches(1))
        result = real_fit(model, batches, config, run_dir, validate=validate, progress=progress)
        seen["result"] = result
        return result

    monkeypatch.setattr(ultr, "fit", fit)
    model = train_ranker(method, train, log, cfg, seed=0)
    held = ultr.held_out_queries(log, 0.2, seed=0)
    assert seen["trained_sessions"] == int((~held).sum())  # the held-out queries are not trained on
    assert seen["config"].early_stopping.metric == "objective"
    history = seen["result"].history
    assert all("valid_objective" in h for h in history)
    best = max(history, key=lambda h: h["valid_objective"])
    assert seen["result"].best_epoch == best["epoch"]
    # The model handed back holds the best epoch's weights: its held-out objective is the best one.
    assert seen["validate"]()["objective"] == pytest.approx(best["valid_objective"], rel=1e-6)
    assert not model.training


def test_refit_bias_moves_only_the_bias_tower_and_reaches_the_optimum(planted):
    from twotower.ultr import _session_batch, refit_bias

    train, test, log, test_log, cfg, truth = planted
    quick = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1})})
    model = train_ranker("two-tower-pal", train, log, quick, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    full = _session_batch(train, log)
    with torch.no_grad():
        loss_before = model.compute_loss(full).item()
    refit_bias(model, train, log, log.clicks)
    after = model.state_dict()
    for k, v in before.items():
        if k.startswith("relevance."):
            assert torch.equal(after[k], v), k  # frozen
    assert any(not torch.equal(after[k], v) for k, v in before.items() if k.startswith("bias."))
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.bias.parameters())
    assert not model.training
    loss = model.compute_loss(full)
    assert loss.item() < loss_before
    # An optimum: no direction of the bias tower's parameters lowers the loss any further.
    loss.backward()
    assert max(p.grad.abs().max().item() for p in model.bias.parameters()) < 1e-5
    model.zero_grad(set_to_none=True)


def test_refit_bias_recovers_a_planted_curve_exactly(planted):
    """Click rates made by this very relevance tower times a known examination curve: the exact refit
    must give back that curve (the bias tower can represent any per-(position, device) logit)."""
    from twotower.ultr import _session_batch, learned_curves, refit_bias

    train, test, log, test_log, cfg, _ = planted
    quick = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1})})
    model = train_ranker("two-tower-pal", train, log, quick, seed=0)
    theta = np.array([[0.9, 0.6, 0.4, 0.3, 0.2], [0.7, 0.3, 0.15, 0.1, 0.05]])  # desktop, mobile
    with torch.no_grad():
        relevant = torch.sigmoid(model.relevance_logit(_session_batch(train, log))).numpy()
    rates = np.where(log.mask, relevant * theta[log.device], 0.0).astype(np.float32)
    refit_bias(model, train, log, rates)
    learned = learned_curves(model, _session_batch(test, test_log), test_log)
    np.testing.assert_allclose(learned, theta / theta[:, :1], atol=2e-3)


def test_mean_clicks_averages_fresh_draws_and_keeps_a_real_log(planted):
    from twotower.ultr import mean_clicks

    train, test, log, test_log, cfg, _ = planted
    click_model = ClickModel(cfg.simulation.click_model, 4, 5)
    assert mean_clicks(log, None, 7, seed=0) is not log.clicks
    np.testing.assert_array_equal(mean_clicks(log, None, 7, seed=0), log.clicks)
    rates = mean_clicks(log, click_model, 200, seed=0)
    assert set(np.unique(rates * 200).round(3)) <= set(np.arange(201.0))  # means of 200 0/1 draws
    expected = click_model.click_probability(log.labels, log.device)
    m = log.mask
    # Means of 200 Bernoulli draws: their squared deviations from the probabilities add up to the
    # binomial variance (36,000 slots: within 5 %), and their average per rank matches.
    variance = (expected * (1 - expected) / 200)[m].sum()
    assert ((rates - expected)[m] ** 2).sum() == pytest.approx(variance, rel=0.05)
    np.testing.assert_allclose(rates.mean(0), expected.mean(0), atol=2e-3)
    assert np.all(rates[~log.mask] == 0)
    np.testing.assert_array_equal(rates, mean_clicks(log, click_model, 200, seed=0))  # seeded


def test_bias_refit_is_an_option_of_train_ranker(planted):
    train, test, log, test_log, cfg, truth = planted
    quick = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1})})
    plain = train_ranker("two-tower-pal", train, log, quick, seed=0)
    refit = train_ranker(
        "two-tower-pal", train, log, quick.model_copy(update={"bias_refit_epochs": 2}), seed=0
    )
    x = torch.from_numpy(test.features)
    assert torch.equal(plain.score(x), refit.score(x))  # same relevance tower
    assert not torch.equal(plain.bias.out.weight, refit.bias.out.weight)
    naive = train_ranker("naive", train, log, quick.model_copy(update={"bias_refit_epochs": 2}), seed=0)
    assert naive.bias is None  # no bias tower: nothing to refit
    with pytest.raises(ValueError):
        UltrConfig.model_validate({"bias_refit_epochs": -1})


def test_estimated_propensities_never_see_the_held_out_validation_queries(planted, monkeypatch):
    """ipw-estimated with valid_share: the RandTop-N curves come from the trained sessions only, and the
    held-out sessions' propensities are those curves at their devices."""
    import twotower.ultr as ultr

    train, _, log, _, cfg, _ = planted
    cfg = cfg.model_copy(update={"valid_share": 0.2, "train": cfg.train.model_copy(update={"epochs": 1})})
    held = ultr.held_out_queries(log, 0.2, seed=0)
    fitted_on = []
    real = ultr.estimate_propensities

    def estimate(part):
        fitted_on.append(part)
        return real(part)

    monkeypatch.setattr(ultr, "estimate_propensities", estimate)
    ultr.train_ranker("ipw-estimated", train, log, cfg, seed=0)
    assert fitted_on
    for part in fitted_on:
        assert part.num_sessions == int((~held).sum())
        assert not np.isin(part.query, log.query[held]).any()


def test_held_out_queries_always_leave_a_query_to_train_on(planted):
    from twotower.ultr import held_out_queries

    _, _, log, _, _, _ = planted
    two = log.take(np.flatnonzero(np.isin(log.query, np.unique(log.query)[:2])))
    held = held_out_queries(two, 0.75, seed=0)  # round(.75 * 2) = 2 queries would leave none
    assert len(np.unique(two.query[held])) == 1 and (~held).any()
    one = log.take(np.flatnonzero(log.query == log.query[0]))
    assert not held_out_queries(one, 0.5, seed=0).any()


def test_ipw_true_refuses_a_real_log(planted):
    """A real log's examination is unknown (all zero): IPW with it would weight every click by the clip."""
    import dataclasses

    train, _, log, _, cfg, _ = planted
    real = dataclasses.replace(log, examination=np.zeros_like(log.examination), simulated=False)
    quick = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1})})
    with pytest.raises(ValueError, match="ipw-true needs the simulator's examination"):
        train_ranker("ipw-true", train, real, quick, seed=0)


@pytest.mark.parametrize("adversary", ["mlp", "linear"])
def test_valid_share_chooses_the_adversarial_method_on_its_click_likelihood_alone(
    planted, adversary, monkeypatch
):
    """The adversary's term (its squared error, which the bias tower is paid to raise; or the linear
    penalty) is no fit to the clicks: the held-out objective is the click log-likelihood alone."""
    import twotower.ultr as ultr

    train, _, log, _, cfg, _ = planted
    ranker = {**cfg.ranker, "adversary": adversary}
    train_config = cfg.train.model_copy(update={"epochs": 2})
    cfg = cfg.model_copy(update={"valid_share": 0.2, "patience": 2, "ranker": ranker, "train": train_config})
    seen = {}
    real_fit = ultr.fit

    def fit(model, batches, config, run_dir, validate=None, progress=False):
        seen["validate"] = validate
        return real_fit(model, batches, config, run_dir, validate=validate, progress=progress)

    monkeypatch.setattr(ultr, "fit", fit)
    model = train_ranker("two-tower-additive+adversarial", train, log, cfg, seed=0)
    held = ultr.held_out_queries(log, 0.2, seed=0)
    valid = ultr._session_batch(train, log.take(np.flatnonzero(held)))
    with torch.no_grad():
        (log_p, log_not), r, raw = model._click_log_probs(valid)
        clicks, mask = valid["clicks"], valid["mask"]
        loglik = (clicks * log_p + (1.0 - clicks) * log_not)[mask].mean().item()
        assert model.adversary_loss(r, raw, mask).item() > 1e-4  # the term that must not count
    assert seen["validate"]()["objective"] == pytest.approx(loglik, rel=1e-5)
