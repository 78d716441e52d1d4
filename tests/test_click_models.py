import numpy as np
import pytest
from pydantic import ValidationError

from twotower.data.click_models import (
    ULTRA_EXAMINATION,
    ClickModel,
    ClickModelConfig,
    ExaminationConfig,
    examination_curve,
    relevance_click_probability,
)


def test_examination_curves():
    ultra = examination_curve(ExaminationConfig(), 12)
    assert ultra[:10] == pytest.approx(ULTRA_EXAMINATION)
    assert ultra[10:] == pytest.approx([0.06, 0.06])  # ranks past the table reuse its last value
    assert examination_curve(ExaminationConfig(eta=2.0), 2) == pytest.approx([0.68**2, 0.61**2])
    assert examination_curve(ExaminationConfig(kind="inverse", eta=0.5), 4) == pytest.approx(
        [1.0, 0.5**0.5, (1 / 3) ** 0.5, 0.5]
    )
    table = ExaminationConfig(kind="table", table=[0.9, 0.5])
    assert examination_curve(table, 3) == pytest.approx([0.9, 0.5, 0.5])
    with pytest.raises(ValidationError):
        ExaminationConfig(kind="table")
    with pytest.raises(ValidationError):
        ExaminationConfig(kind="table", table=[0.5, 1.5])
    with pytest.raises(ValidationError):
        ClickModelConfig(devices={}, model="pbm")
    with pytest.raises(ValidationError):
        ClickModelConfig(modle="pbm")  # a misspelt key is an error


def test_relevance_to_click_mapping_by_hand():
    # eps + (1 - eps) (2^y - 1) / 15 with eps = .1: y=0 .1, y=1 .16, y=2 .28, y=4 1; padding 0.
    got = relevance_click_probability(np.array([0, 1, 2, 4, -1]), max_label=4, epsilon=0.1)
    assert got == pytest.approx([0.1, 0.16, 0.28, 1.0, 0.0])


def _single_device(**kw) -> ClickModelConfig:
    return ClickModelConfig(devices={"all": ExaminationConfig()}, **kw)


def test_pbm_click_rate_by_position_and_relevance_matches_the_model():
    rng = np.random.default_rng(0)
    model = ClickModel(ClickModelConfig(), max_label=4, num_positions=10)
    n = 60_000
    labels = rng.integers(0, 5, size=(n, 10))
    device = model.sample_devices(n, rng)
    assert np.bincount(device) / n == pytest.approx([0.5, 0.5], abs=0.01)
    clicks = model.simulate(labels, device, rng)
    expected = model.click_probability(labels, device)
    # Exact probabilities are theta_device(k) * P(R | y).
    p_rel = relevance_click_probability(labels, 4)
    assert expected == pytest.approx(model.curves[device] * p_rel)
    for d in range(2):
        for k in (0, 2, 9):
            for y in (0, 4):
                cell = (device == d) & (labels[:, k] == y)
                p = model.curves[d, k] * relevance_click_probability(np.array([y]), 4)[0]
                tol = 5 * np.sqrt(p * (1 - p) / cell.sum())
                assert clicks[cell, k].mean() == pytest.approx(p, abs=tol)


def test_cascade_probabilities_by_hand_and_by_simulation():
    # Classic cascade (continue always, stop after a click), eps = 0, max_label 1: P(R) = y.
    # Labels [0, 1, 1]: rank 1 examined w.p. .68 (the curve's start), never clicked; rank 2 examined
    # w.p. .68 and clicked w.p. 1; rank 3 is reached only without a click at rank 2: 0.
    cfg = _single_device(model="cascade", epsilon=0.0, continuation="always")
    model = ClickModel(cfg, max_label=1, num_positions=3)
    labels = np.array([[0, 1, 1]])
    assert model.examination(labels, np.array([0]))[0] == pytest.approx([0.68, 0.68, 0.0])
    assert model.click_probability(labels, np.array([0]))[0] == pytest.approx([0.0, 0.68, 0.0])

    # Graded, eps = .1, curve continuation: P(R) = [.1, .28, 1] for y = [0, 2, 4];
    # exam(1) = .68; exam(2) = .68 * (.9 * .61/.68) = .549; exam(3) = .549 * (.72 * .48/.61) = .31104.
    cfg = _single_device(model="cascade")
    model = ClickModel(cfg, max_label=4, num_positions=3)
    labels = np.array([[0, 2, 4]])
    exam = model.examination(labels, np.array([0]))[0]
    assert exam == pytest.approx([0.68, 0.549, 0.549 * 0.72 * 0.48 / 0.61])
    rng = np.random.default_rng(1)
    n = 100_000
    many = np.repeat(labels, n, axis=0)
    clicks = model.simulate(many, np.zeros(n, dtype=np.int64), rng)
    assert clicks.sum(axis=1).max() == 1  # at most one click with stop_after_click = 1
    expected = exam * np.array([0.1, 0.28, 1.0])
    assert clicks.mean(axis=0) == pytest.approx(expected, abs=0.006)


def test_cascade_without_clicks_follows_the_curve_and_skips_padding():
    cfg = _single_device(model="cascade", epsilon=0.0)
    model = ClickModel(cfg, max_label=4, num_positions=10)
    labels = np.zeros((1, 10), dtype=np.int64)
    assert model.examination(labels, np.array([0]))[0] == pytest.approx(ULTRA_EXAMINATION)
    labels[0, 3] = -1  # an empty slot is neither examined nor in the way
    exam = model.examination(labels, np.array([0]))[0]
    assert exam[3] == 0.0
    assert exam[4] == pytest.approx(ULTRA_EXAMINATION[3])  # the walk goes on through the empty slot


def test_trust_bias_probabilities():
    # P(C) = theta(k) (eps_plus P(R) + eps_minus(k) (1 - P(R))), eps_minus(k) = .65 / k.
    cfg = _single_device(model="trust")
    model = ClickModel(cfg, max_label=4, num_positions=2)
    labels = np.array([[0, 4]])
    got = model.click_probability(labels, np.array([0]))[0]
    assert got == pytest.approx([0.68 * (0.1 + 0.65 * 0.9), 0.61 * 1.0])
    rng = np.random.default_rng(2)
    many = np.repeat(labels, 80_000, axis=0)
    clicks = model.simulate(many, np.zeros(80_000, dtype=np.int64), rng)
    assert clicks.mean(axis=0) == pytest.approx(got, abs=0.008)


def test_padding_is_never_clicked_and_shapes_are_checked():
    model = ClickModel(ClickModelConfig(), max_label=4, num_positions=3)
    labels = np.array([[4, -1, 4]] * 1000)
    clicks = model.simulate(labels, np.zeros(1000, dtype=np.int64), np.random.default_rng(3))
    assert clicks[:, 1].sum() == 0
    with pytest.raises(ValueError, match="labels must be"):
        model.simulate(
            np.zeros((2, 4), dtype=np.int64), np.zeros(2, dtype=np.int64), np.random.default_rng(0)
        )
    with pytest.raises(ValueError, match="device must be"):
        model.click_probability(np.zeros((2, 3), dtype=np.int64), np.zeros(3, dtype=np.int64))


def test_degenerate_tables_and_label_scales_are_refused():
    # An empty table passed validation (all([]) is True) and failed later with an IndexError.
    with pytest.raises(ValidationError, match="at least one rank"):
        ExaminationConfig(kind="table", table=[])
    # max_label 0 made the gain 0/0: every click probability nan, so no click was ever drawn.
    with pytest.raises(ValueError, match="max_label must be >= 1"):
        relevance_click_probability(np.array([0, 0]), max_label=0)
    # y = 0 gives eps and y = ymax gives 1 for any scale; labels above ymax count as ymax.
    assert relevance_click_probability(np.array([0, 1, 2]), max_label=1, epsilon=0.2) == pytest.approx(
        [0.2, 1.0, 1.0]
    )


def test_ultra_table_past_rank_ten_and_eta_zero():
    curve = examination_curve(ExaminationConfig(eta=1.0), 25)
    assert curve[9:] == pytest.approx([0.06] * 16)
    assert examination_curve(ExaminationConfig(eta=0.0), 12) == pytest.approx([1.0] * 12)  # no bias
    # The cascade's examination below a certain click is 0 at every later rank, past 10 included.
    cfg = _single_device(model="cascade", epsilon=0.0, continuation="always")
    model = ClickModel(cfg, max_label=1, num_positions=12)
    labels = np.zeros((1, 12), dtype=np.int64)
    labels[0, 10] = 1
    exam = model.examination(labels, np.array([0]))[0]
    assert exam[:11] == pytest.approx([0.68] * 11) and exam[11] == 0.0


def test_device_indices_outside_the_configured_devices_are_refused():
    model = ClickModel(ClickModelConfig(), max_label=1, num_positions=2)  # desktop, mobile
    labels = np.ones((1, 2), dtype=np.int64)
    # -1 used to pick mobile's curve silently (numpy counts from the end); 2 failed with an IndexError.
    for device in ([-1], [2], [0.0]):
        with pytest.raises(ValueError, match=r"device indices 0\.\.1"):
            model.click_probability(labels, np.array(device))
    assert model.click_probability(labels, np.array([1]))[0] == pytest.approx([0.68**2, 0.61**2])
