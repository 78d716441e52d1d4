"""Position-debiased retrieval labels: hand-worked weights and residuals, then a planted click log.

The hand-worked log has two requests of three slots seen with p = 1, 1/2, 1/4. The integration test
simulates clicks p(click) = (1 / position)^eta(device) * sigmoid(affinity - 4) (eta 1 on desktop, 2 on
mobile) over a logger whose order is unrelated to the user, so relevance does not depend on position
and a correct debiasing makes the weighted click rate flat across positions.
"""

import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError

from twotower.config import FileSource
from twotower.data.dataset import load_raw
from twotower.data.impression_sim import DEFAULT_ETA, examination, simulate_impressions
from twotower.data.synthetic import SyntheticWorld
from twotower.debiased_labels import DebiasConfig, debiased_labels, examination_propensity
from twotower.demo import demo_config
from twotower.experiment import train_run
from twotower.ranking import DebiasedRanker, RankerConfig
from twotower.recommender import Retriever
from twotower.reranker import RunRanker, RunRankerConfig, fit_run_ranker

pytestmark = pytest.mark.usefixtures("one_torch_thread")

P = {1: 1.0, 2: 0.5, 3: 0.25}


def _log(clicks: list[int], device: list[str] | None = None) -> pd.DataFrame:
    """Requests a, b (users 7, 8) of three slots, items 10, 11, ...; an index that is not 0..n-1."""
    n = len(clicks) // 3
    frame = pd.DataFrame(
        {
            "request_id": np.repeat(["a", "b"][:n], 3),
            "item_id": np.arange(10, 10 + 3 * n),
            "position": np.tile([1, 2, 3], n),
            "click": clicks,
            "user_id": np.repeat([7, 8][:n], 3),
        },
        index=np.arange(100, 100 + 3 * n),
    )
    if device is not None:
        frame["device"] = np.repeat(device, 3)
    return frame


def test_ipw_weights_clipping_and_normalisation_by_hand():
    frame = _log([1, 0, 1, 0, 1, 1])  # clicks at p = 1, 1/4 (request a); 1/2, 1/4 (request b)
    by_pos = lambda position, context: P[position]  # noqa: E731
    out = debiased_labels(frame, None, DebiasConfig(normalize=False), propensities=by_pos)
    assert list(out.columns) == ["user_id", "item_id", "clicked", "weight"]
    assert out.index.tolist() == frame.index.tolist() and out["clicked"].dtype == bool
    assert out["clicked"].tolist() == [True, False, True, False, True, True]
    assert out["user_id"].tolist() == [7, 7, 7, 8, 8, 8] and out["item_id"].tolist() == list(range(10, 16))
    # Clicked: 1/p; impressed-not-clicked negatives: 1.
    assert out["weight"].tolist() == [1.0, 1.0, 4.0, 1.0, 2.0, 4.0]
    # Clip 3: 1/p = 4 becomes 3.
    out = debiased_labels(frame, None, DebiasConfig(normalize=False, clip=3.0), propensities=by_pos)
    assert out["weight"].tolist() == [1.0, 1.0, 3.0, 1.0, 2.0, 3.0]
    # Normalised: the clicks' weights 1, 4, 2, 4 have mean 11/4 -> 4/11, 16/11, 8/11, 16/11; skips stay 1.
    out = debiased_labels(frame, None, DebiasConfig(), propensities=by_pos)
    assert out["weight"].to_numpy() == pytest.approx([4 / 11, 1, 16 / 11, 1, 8 / 11, 16 / 11])
    assert out["weight"][out["clicked"]].mean() == pytest.approx(1.0)
    # Clip before normalising: 1, 3, 2, 3 (mean 9/4).
    out = debiased_labels(frame, None, DebiasConfig(clip=3.0), propensities=by_pos)
    assert out["weight"].to_numpy() == pytest.approx([4 / 9, 1, 12 / 9, 1, 8 / 9, 12 / 9])
    # A per-row array gives the same; p = 0 is floored at min_propensity (1 / 0.05 = 20 without a clip).
    array = np.array([1.0, 0.5, 0.25, 1.0, 0.5, 0.25])
    same = debiased_labels(frame, None, DebiasConfig(normalize=False), propensities=array)
    assert same["weight"].tolist() == [1.0, 1.0, 4.0, 1.0, 2.0, 4.0]
    floored = debiased_labels(
        frame,
        None,
        DebiasConfig(normalize=False, clip=math.inf, min_propensity=0.05),
        propensities=array * [1, 1, 0, 1, 1, 1],
    )
    assert floored["weight"].tolist() == [1.0, 1.0, 20.0, 1.0, 2.0, 4.0]
    # none: raw clicks, weight 1, no propensities needed.
    raw = debiased_labels(frame, None, DebiasConfig(method="none"))
    assert raw["weight"].tolist() == [1.0] * 6 and raw["clicked"].sum() == 4


def test_residual_labels_by_hand():
    # Clicks at p = 1 (a) and 1/2, 1/4 (b): c = 3 clicks / 3.5 = 6/7, expected clicks 6/7, 3/7, 3/14.
    frame = _log([1, 0, 0, 0, 1, 1])
    out = debiased_labels(
        frame, None, DebiasConfig(method="residual", normalize=False), propensities=list(P.values()) * 2
    )
    assert list(out.columns) == ["user_id", "item_id", "clicked", "weight", "label"]
    labels = [1 / 7, -3 / 7, -3 / 14, -6 / 7, 4 / 7, 11 / 14]
    assert out["label"].to_numpy() == pytest.approx(labels)
    assert out["label"].sum() == pytest.approx(0.0)
    # A click weighs what its slot does not explain; skips weigh 1.
    assert out["weight"].to_numpy() == pytest.approx([1 / 7, 1, 1, 1, 4 / 7, 11 / 14])
    normalised = debiased_labels(
        frame, None, DebiasConfig(method="residual"), propensities=list(P.values()) * 2
    )
    assert normalised["weight"].to_numpy() == pytest.approx([2 / 7, 1, 1, 1, 8 / 7, 11 / 7])  # /(1/2)
    assert normalised["label"].to_numpy() == pytest.approx(labels)  # labels are not rescaled
    # The scale of p cancels (c doubles when p halves).
    half = debiased_labels(frame, None, DebiasConfig(method="residual"), propensities=[0.5, 0.25, 0.125] * 2)
    assert half["label"].to_numpy() == pytest.approx(labels)

    # c per context: desktop 1 / 1.75 = 4/7 (expected 4/7, 2/7, 1/7); mobile 2 / 1.75 = 8/7, whose
    # expected click at p = 1 is capped at 1 (then 4/7, 2/7).
    by_device = debiased_labels(
        _log([1, 0, 0, 0, 1, 1], ["desktop", "mobile"]), None,
        DebiasConfig(method="residual", context="device"), propensities=lambda position, device: P[position],
    )  # fmt: skip
    assert by_device["label"].to_numpy() == pytest.approx([3 / 7, -2 / 7, -1 / 7, -1.0, 3 / 7, 5 / 7])


def test_callable_propensities_get_none_without_a_context():
    # Documented: p(position, context value or None). Without a context column it used to get NaN.
    calls = []

    def p(position, context):
        calls.append((position, context))
        return 1.0 if context is None else 0.1  # a NaN context would count as a device

    out = debiased_labels(_log([1, 0, 1, 0, 1, 1]), None, DebiasConfig(normalize=False), propensities=p)
    assert sorted(calls) == [(1, None), (2, None), (3, None)]  # once per distinct pair
    assert out["weight"].tolist() == [1.0] * 6
    calls.clear()
    debiased_labels(_log([1, 0, 1, 0, 1, 1], ["desktop", "mobile"]), None, DebiasConfig(context="device"),
                    propensities=p)  # fmt: skip
    assert sorted(calls) == [(pos, d) for pos in (1, 2, 3) for d in ("desktop", "mobile")]


def test_empty_log_keeps_every_column():
    empty = _log([1, 0, 0]).iloc[:0]
    for method, columns in (("ipw", []), ("residual", ["label"]), ("none", [])):
        out = debiased_labels(empty, None, DebiasConfig(method=method), None if method == "none" else [])
        assert list(out.columns) == ["user_id", "item_id", "clicked", "weight", *columns] and not len(out)


def test_unclicked_rows_weigh_one_and_positions_past_the_curve_take_its_last_value():
    # Additive curve of 3 positions: a click at position 7 is weighted as one at 3; skips weigh 1 there
    # too; the clip bounds 1/p from above (p = 1/16 -> 10) and min_propensity from below p.
    ranker = _ranker("additive", {"mobile": [1.0, 0.25, 0.0625]}, ["mobile"])
    frame = _log([1, 0, 1, 1, 0, 0], ["mobile", "mobile"]).assign(position=[1, 7, 7, 3, 9, 2])
    out = debiased_labels(frame, ranker, DebiasConfig(normalize=False))
    assert out["weight"].tolist() == [1.0, 1.0, 10.0, 10.0, 1.0, 1.0]
    floored = debiased_labels(frame, ranker, DebiasConfig(normalize=False, clip=math.inf, min_propensity=0.1))
    assert floored["weight"].tolist() == [1.0, 1.0, 10.0, 10.0, 1.0, 1.0]
    unclipped = debiased_labels(frame, ranker, DebiasConfig(normalize=False, clip=math.inf))
    assert unclipped["weight"].tolist() == [1.0, 1.0, 16.0, 16.0, 1.0, 1.0]


def test_output_is_what_the_retrieval_loader_reads(tmp_path):
    frame = _log([1, 0, 1, 0, 1, 1]).assign(timestamp=[5, 5, 5, 9, 9, 9])
    out = debiased_labels(frame, None, DebiasConfig(method="residual"), propensities=list(P.values()) * 2)
    out.to_csv(tmp_path / "labels.csv", index=False)
    columns = {"clicked": "clicked", "weight": "weight", "timestamp": "timestamp"}
    source = FileSource(interactions=str(tmp_path / "labels.csv"), columns=columns)
    raw = load_raw(source)
    # Clicks become the positives with their weights; the skips become impression negatives.
    assert raw.interactions["item_id"].tolist() == [10, 12, 14, 15]
    assert raw.interactions["weight"].to_numpy() == pytest.approx(out["weight"][out["clicked"]].to_numpy())
    assert raw.impressions is not None and raw.impressions["item_id"].tolist() == [11, 13]
    assert raw.interactions["timestamp"].tolist() == [5, 5, 9, 9]


def _ranker(combination: str, curves: dict[str, list[float]] | None, vocabulary: list[str]) -> RunRanker:
    config = RankerConfig(combination=combination, layers=[4], position_dropout=0.5)
    model = DebiasedRanker(6, 0, 3, {"device": len(vocabulary)}, config)
    return RunRanker(model, RunRankerConfig(), 2, 0, "device", vocabulary, curves, "0" * 64)


def test_additive_propensity_is_the_examination_curve_and_unknown_context_the_mean():
    curves = {"desktop": [1.0, 0.5, 0.25], "mobile": [1.0, 0.25, 0.0625]}
    ranker = _ranker("additive", curves, ["desktop", "mobile"])
    p = examination_propensity(
        ranker, [1, 2, 3, 2, 3, 5], ["desktop", "desktop", "mobile", "tablet", "tablet", "mobile"]
    )
    # Unknown "tablet": the plain mean curve 1, 0.375, 0.15625; position 5 > 3 takes position 3's value.
    assert p.tolist() == [1.0, 0.5, 0.0625, 0.375, 0.15625, 0.0625]
    assert examination_propensity(ranker, [1, 2, 3], None).tolist() == [1.0, 0.375, 0.15625]
    # Through debiased_labels: the ranker's context column is used, unknown values fall back.
    frame = _log([0, 1, 1, 0, 1, 1], ["mobile", "tablet"])
    out = debiased_labels(frame, ranker, DebiasConfig(normalize=False, clip=math.inf))
    assert out["weight"].tolist() == [1.0, 4.0, 16.0, 1.0, 1 / 0.375, 1 / 0.15625]
    # A ranker trained without a context has one curve, whatever the log's contexts say.
    plain = RunRanker(ranker.model, ranker.config, 2, 0, None, ["all"], {"all": [1.0, 0.8, 0.4]}, "0" * 64)
    assert examination_propensity(plain, [2, 3], ["mobile", "tablet"]).tolist() == [0.8, 0.4]


def test_pal_propensity_is_sigmoid_of_the_bias_logit():
    planted = {"desktop": [0.8, 0.4, 0.2], "mobile": [0.6, 0.3, 0.15]}
    ranker = _ranker("pal", None, ["desktop", "mobile"])
    bias = ranker.model.bias
    with torch.no_grad():  # b = the cross embedding's first coordinate, set to logit(p)
        for table in [bias.position, bias.context["device"], bias.cross["device"]]:
            table.weight.zero_()
        bias.out.weight.zero_()
        bias.out.bias.zero_()
        bias.out.weight[0, 2 * bias.position.embedding_dim] = 1.0
        for code, curve in enumerate(planted.values()):
            for position, p in enumerate(curve, start=1):
                bias.cross["device"].weight[code * 4 + position, 0] = math.log(p / (1 - p))
    ranker.model.train()  # position dropout would hide positions: the propensity must run without it
    p = examination_propensity(ranker, [1, 2, 3, 1, 3], ["desktop", "desktop", "mobile", "tv", "tv"])
    assert p == pytest.approx([0.8, 0.4, 0.15, 0.7, 0.175])
    assert bias.training  # the caller's mode is restored
    out = debiased_labels(_log([1, 1, 1], ["mobile"]), ranker, DebiasConfig(normalize=False))
    assert out["weight"].to_numpy() == pytest.approx([1 / 0.6, 1 / 0.3, 1 / 0.15])


def test_clear_errors():
    frame = _log([1, 0, 0])
    with pytest.raises(ValueError, match="pass a trained ranker or explicit propensities"):
        debiased_labels(frame, None, DebiasConfig())
    with pytest.raises(ValueError, match="not both"):
        debiased_labels(
            frame, _ranker("additive", {"d": [1, 1, 1]}, ["d"]), DebiasConfig(), propensities=[1, 1, 1]
        )
    with pytest.raises(ValueError, match="no bias tower"):
        debiased_labels(frame, _ranker("none", None, ["d"]), DebiasConfig(method="residual"))
    with pytest.raises(ValueError, match=r"no column \['click'\]"):
        debiased_labels(frame.drop(columns="click"), None, DebiasConfig(method="none"))
    with pytest.raises(ValueError, match="click must be 0/1"):
        debiased_labels(frame.assign(click=[1, 2, 0]), None, DebiasConfig(method="none"))
    with pytest.raises(ValueError, match="whole numbers >= 1"):
        debiased_labels(frame.assign(position=[0, 1, 2]), None, DebiasConfig(), propensities=[1, 1, 1])
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]: 1.5 for log row 1"):
        debiased_labels(frame, None, DebiasConfig(), propensities=[1.0, 1.5, 0.2])
    with pytest.raises(ValueError, match="probabilities"):
        debiased_labels(frame, None, DebiasConfig(), propensities=lambda position, context: math.nan)
    with pytest.raises(ValueError, match="shape"):
        debiased_labels(frame, None, DebiasConfig(), propensities=[1.0, 0.5])
    with pytest.raises(ValueError, match="config.context='device'"):
        debiased_labels(frame, None, DebiasConfig(context="device"), propensities=[1.0, 0.5, 0.2])
    with pytest.raises(ValidationError, match="extra"):
        DebiasConfig.model_validate({"methd": "ipw"})
    with pytest.raises(ValidationError):
        DebiasConfig(clip=0.5)  # every 1/p is >= 1: a clip below 1 would flatten all weights


@pytest.fixture(scope="module")
def planted_log():
    """A 1-epoch demo run, 3000 simulated requests of 10 slots, and a PAL ranker trained on them."""
    with tempfile.TemporaryDirectory(prefix="debias-") as tmp:
        run_dir = Path(tmp) / "run"
        config = demo_config(quick=True)
        config = config.model_copy(
            update={"train": config.train.model_copy(update={"epochs": 1, "early_stopping": None})}
        )
        train_run(config, run_dir, progress=False)
        world = SyntheticWorld.generate(config.data.world)
        frame = simulate_impressions(Retriever.load(run_dir), world, 3000, seed=1)
        frame.drop(columns="true_affinity").to_csv(Path(tmp) / "log.csv", index=False)
        ranker_config = RunRankerConfig.model_validate(
            {
                "columns": {"user": "user_id", "context": ["device"]},
                "ranker": {"combination": "pal", "layers": [64, 32], "dropout": 0.0},
                "train": {"epochs": 6, "batch_size": 128, "lr": 0.02},
            }
        )
        ranker, _ = fit_run_ranker(run_dir, Path(tmp) / "log.csv", ranker_config)
    return frame, ranker


def _rate_by_position(frame: pd.DataFrame, values: np.ndarray) -> np.ndarray:
    positions = frame["position"].to_numpy()
    return np.bincount(positions, values)[1:] / np.bincount(positions)[1:]


def test_ipw_with_learned_propensities_flattens_the_click_rate(planted_log):
    frame, ranker = planted_log
    raw = _rate_by_position(frame, frame["click"].to_numpy(float))
    # Position bias in the raw clicks: 8.6x from position 1 to 5, 18x over the 10 positions.
    assert raw[0] / raw[4] > 6 and raw.max() / raw.min() > 10, raw.round(3)

    def weighted(config: DebiasConfig, propensities=None) -> np.ndarray:
        out = debiased_labels(frame, None if propensities is not None else ranker, config, propensities)
        assert out["weight"][out["clicked"]].mean() == pytest.approx(1.0)
        return _rate_by_position(frame, (out["weight"] * out["clicked"]).to_numpy())

    # Unclipped, the learned curve flattens it: position 1 over 5 is 1.09 here (1.10-1.45 over five
    # other seeds of the simulation and the ranker), the spread over all positions 1.30 (1.28-1.79).
    unclipped = weighted(DebiasConfig(clip=math.inf))
    assert 0.5 <= unclipped[0] / unclipped[4] <= 2.0, unclipped.round(3)
    assert unclipped.max() / unclipped.min() < 2.5, unclipped.round(3)
    # The default clip (10) is below mobile's 1/p = 25 at position 5 and leaves part of the bias, by
    # design: 1.48 here (1.47-2.07 over five seeds; 1.45-1.65 with the true propensities).
    clipped = weighted(DebiasConfig())
    assert clipped[0] / clipped[4] < raw[0] / raw[4] / 3, (clipped.round(3), raw.round(3))
    # The planted propensities do the same (0.99 here, 0.98-1.22 over five seeds).
    true_p = examination(frame["position"], frame["device"].map(DEFAULT_ETA).to_numpy())
    truth = weighted(DebiasConfig(clip=math.inf), true_p)
    assert 0.7 <= truth[0] / truth[4] <= 1.4, truth.round(3)


def test_residual_labels_leave_no_position_effect(planted_log):
    frame, ranker = planted_log
    out = debiased_labels(frame, ranker, DebiasConfig(method="residual"))
    per_position = _rate_by_position(frame, out["label"].to_numpy())
    raw = _rate_by_position(frame, frame["click"].to_numpy(float))
    # Raw click rate falls 0.48 -> 0.03; the mean residual per position stays within 0.014 of 0 here
    # (0.06 over five seeds), and sums to 0 per device by construction.
    assert raw[0] - raw[-1] > 0.4 and np.abs(per_position).max() < 0.1, per_position.round(3)
    for _, labels in out["label"].groupby(frame["device"]):
        assert labels.sum() == pytest.approx(0.0, abs=1e-9)
