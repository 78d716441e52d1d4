"""The aligned funnel experiment on its smallest configuration (the quick world, one ranker epoch, two
alignment epochs of one step each, 300 requests): what each stage leaves in the run directory, that
every alignment variant is an independent copy fine-tuned for the same epochs, the returned results,
and that a seed fixes them. test_demo.py covers the same run through the CLI and its report; the
stage logic and metrics on hand-built rankers are in test_funnel.py.

A run takes about 3-5 s here, so the module shares one (plus one more for determinism).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from twotower.align import AlignConfig, Teacher
from twotower.data.dataset import build_retrieval_data
from twotower.data.impression_sim import simulate_impressions
from twotower.data.impressions import ImpressionColumns, read_impressions
from twotower.data.synthetic import SyntheticWorld
from twotower.demo import demo_config
from twotower.distillation import AlignmentConfig
from twotower.funnel import FunnelConfig, evaluate_funnel, run_funnel
from twotower.funnel_experiment import (
    VARIANTS,
    FunnelExperimentConfig,
    retrieval_config,
    run_funnel_experiment,
)
from twotower.recommender import Retriever
from twotower.reranker import RunRanker
from twotower.storage import read_json

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ORACLES = [
    "oracle funnel (true top k)",
    "learned retrieval + oracle rankers",
    "oracle retrieval + learned rankers",
]
# The learned-model rows for k=5, retrieve_n=20, light_n=10, recall_at=[10].
MODEL_METRICS = {
    "ranker_top5_recall@10", "ranker_top5_recall@20", "light_ranker_top5_recall@10",
    "spearman_retrieval_ranker", "retrieval_ndcg@5", "served_ndcg@5",
}  # fmt: skip


def small_config(**update) -> FunnelExperimentConfig:
    """The smallest run the experiment supports: quick world, few requests, one step per align epoch."""
    fields = {
        "quick": True,
        "seed": 0,
        "requests": 300,
        "shown": 6,
        "candidates": 30,
        "ranker_epochs": 1,
        "funnel": FunnelConfig(retrieve_n=20, light_n=10, k=5, recall_at=[10]),
        "align": AlignConfig(epochs=2, users_per_step=600, candidates=20, random=20),
    }
    return FunnelExperimentConfig(**(fields | update))


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("funnel_experiment") / "run"
    config = small_config()
    lines: list[str] = []
    result = run_funnel_experiment(config, run_dir, echo=lines.append)
    return config, run_dir, result, lines


def test_variants_table_is_the_documented_one() -> None:
    none = AlignmentConfig()
    distill = AlignmentConfig(distill_weight=1.0)
    reward = AlignmentConfig(reward_weight=1.0, reward_form="reinforce")
    both = AlignmentConfig(distill_weight=1.0, reward_weight=1.0, reward_form="reinforce")
    documented = {
        "control": (None, none),
        "+raw-clicks": ("raw", none),
        "+debiased-labels": ("debiased", none),
        "+distillation": (None, distill),
        "+reward": (None, reward),
        "+all": ("debiased", both),
    }
    assert documented == VARIANTS
    assert FunnelExperimentConfig().variants == list(VARIANTS)


def test_config_is_strict_and_bounded() -> None:
    with pytest.raises(ValueError, match="extra"):
        FunnelExperimentConfig(request=100)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="greater than or equal to 10"):
        FunnelExperimentConfig(requests=9)
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        FunnelExperimentConfig(ranker_epochs=0)
    # an unknown variant is refused up front, not in stage 5 after the training
    with pytest.raises(ValueError, match=r"unknown variants \['nope'\]; choose from \['control'"):
        FunnelExperimentConfig(variants=["control", "nope"])


def test_retrieval_config_is_the_demo_run_with_the_experiment_seed() -> None:
    for quick in (True, False):
        run = retrieval_config(FunnelExperimentConfig(quick=quick, seed=7))
        assert run.train.seed == 7 and run.data.world.seed == 7  # type: ignore[union-attr]
        expected = demo_config(quick).model_dump()
        expected["train"]["seed"] = expected["data"]["world"]["seed"] = 7
        assert run.model_dump() == expected
    quick = retrieval_config(FunnelExperimentConfig(quick=True)).data.world
    assert (quick.num_users, quick.num_items) == (600, 300)  # type: ignore[union-attr]


def test_stages_echo_in_order_and_leave_a_run_with_both_rankers(experiment) -> None:
    config, run_dir, result, lines = experiment
    assert [line[:5] for line in lines] == [f"[{i}/6]" for i in range(1, 7)]
    assert lines[0].startswith("[1/6] world: 600 users, 300 items")
    metrics = read_json(run_dir / "metrics.json")
    assert f"recall@10 {metrics['recall@10']:.4f}" in lines[1]
    # The run's retrieval metrics are returned: the @-metrics of metrics.json, nothing else.
    assert result["retrieval_metrics"] == {k: v for k, v in metrics.items() if "@" in k}
    assert "recall@10" in result["retrieval_metrics"]
    rankers = {stage: RunRanker.load(run_dir, stage) for stage in ("ranker", "light_ranker")}
    for stage, ranker in rankers.items():  # load checks each sits on the run's model.safetensors
        assert ranker is not None, stage
        assert ranker.context_column == "device" and set(ranker.context_vocabulary) == {"desktop", "mobile"}
        assert ranker.config.ranker.combination == "pal"
        assert ranker.config.train.epochs == config.ranker_epochs
    # The light one is small: one hidden layer and no item embedding.
    assert rankers["light_ranker"].config.ranker.layers == [32]  # type: ignore[union-attr]
    assert rankers["light_ranker"].config.ranker.item_embedding_dim == 0  # type: ignore[union-attr]
    assert rankers["ranker"].config.ranker.item_embedding_dim > 0  # type: ignore[union-attr]
    assert result["learned_examination"] == rankers["ranker"].examination_curve  # type: ignore[union-attr]


def test_impressions_are_the_taste_simulation_over_the_runs_own_retrieval(experiment) -> None:
    config, run_dir, _, lines = experiment
    logged = pd.read_parquet(run_dir / "impressions.parquet")
    world = SyntheticWorld.generate(retrieval_config(config).data.world)  # type: ignore[arg-type]
    expected = simulate_impressions(
        Retriever.load(run_dir), world, config.requests, seed=config.seed, shown=config.shown,
        candidates=config.candidates, offset=config.click_offset, relevance="taste",
    ).drop(columns="true_affinity")  # fmt: skip
    pd.testing.assert_frame_equal(logged, expected)
    assert len(logged) == 300 * 6
    read = read_impressions(
        run_dir / "impressions.parquet", ImpressionColumns(user="user_id", context=["device"])
    )
    assert read.skipped == 0 and len(read.frame) == 300 * 6
    assert lines[2] == f"[3/6] 300 logged requests, click rate {logged['click'].mean():.3f}"


def test_every_variant_is_fine_tuned_for_the_same_epochs_with_its_own_terms(experiment) -> None:
    _, _, result, _ = experiment
    history = result["alignment_history"]
    assert list(history) == list(VARIANTS)  # the default variants, in order
    terms = {
        "control": set(),
        "+raw-clicks": set(),
        "+debiased-labels": set(),
        "+distillation": {"distill", "alignment"},
        "+reward": {"reward", "alignment"},
        "+all": {"distill", "reward", "alignment"},
    }
    for name, records in history.items():
        assert [r["epoch"] for r in records] == [1, 2], name  # align.epochs each
        for record in records:
            assert set(record) == {"epoch", "retrieval"} | terms[name], (name, record)
            assert all(np.isfinite(v) for v in record.values())
    # Added click positives change the retrieval loss the control sees; IPW weights change it again.
    first_loss = {history[n][0]["retrieval"] for n in ("control", "+raw-clicks", "+debiased-labels")}
    assert len(first_loss) == 3


def test_funnel_rows_and_metrics_follow_the_configured_stage_sizes(experiment) -> None:
    _, _, result, _ = experiment
    funnel = result["funnel"]
    assert list(funnel) == ["retrieval", *VARIANTS, "retrieval, light ranker distilled", *ORACLES]
    for name in ["retrieval", *VARIANTS, "retrieval, light ranker distilled"]:
        row = funnel[name]
        assert set(row) == MODEL_METRICS, name
        assert all(0.0 <= v <= 1.0 for k, v in row.items() if "recall" in k or "ndcg" in k), (name, row)
        assert -1.0 <= row["spearman_retrieval_ranker"] <= 1.0
    for name in ORACLES:
        assert set(funnel[name]) == {"served_ndcg@5"}
        assert 0.0 <= funnel[name]["served_ndcg@5"] <= 1.0
    assert funnel["oracle funnel (true top k)"]["served_ndcg@5"] == pytest.approx(1.0)
    # Distilling the light ranker leaves retrieval alone: the retrieval-only metrics are the base row's.
    for metric in (
        "ranker_top5_recall@10",
        "ranker_top5_recall@20",
        "spearman_retrieval_ranker",
        "retrieval_ndcg@5",
    ):
        assert funnel["retrieval, light ranker distilled"][metric] == funnel["retrieval"][metric]
    assert result["protocol"] == "funnel-full-catalogue" and result["seed"] == 0


def test_true_examination_is_the_planted_curve_over_the_shown_positions(experiment) -> None:
    _, _, result, _ = experiment
    truth = result["true_examination"]
    assert truth["desktop"] == pytest.approx([1, 1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6])
    assert truth["mobile"] == pytest.approx([1, 1 / 4, 1 / 9, 1 / 16, 1 / 25, 1 / 36])
    # The learned curves are relative to position 1, over the positions the log showed (6 of the
    # ranker's max_position 10: deeper ones were never trained, so they have no curve).
    learned = result["learned_examination"]
    assert set(learned) == {"desktop", "mobile"}
    assert all(len(curve) == 6 and curve[0] == pytest.approx(1.0) for curve in learned.values())
    seconds = result["seconds"]
    assert list(seconds) == ["retrieval", "impressions", "rankers", "alignment", "evaluation", "total"]
    assert all(v >= 0 for v in seconds.values()) and seconds["total"] >= seconds["retrieval"]


def test_the_run_keeps_the_base_retrieval_and_the_distilled_light_ranker(experiment) -> None:
    """Re-serving the saved model through the saved rankers reproduces the distilled light ranker's row:
    the variants were copies (the run's model is the unaligned one) and the distilled ranker was saved."""
    config, run_dir, result, _ = experiment
    retriever = Retriever.load(run_dir)
    model = retriever.model.eval()
    ranker, light = RunRanker.load(run_dir, "ranker"), RunRanker.load(run_dir, "light_ranker")
    teacher = Teacher(ranker, model.user_embeddings(), model.item_embeddings())  # type: ignore[arg-type]
    world = SyntheticWorld.generate(retrieval_config(config).data.world)  # type: ignore[arg-type]
    uid, iid = retriever.user_ids.astype(np.int64), retriever.item_ids.astype(np.int64)  # = world rows

    def relevance(rows: np.ndarray) -> np.ndarray:  # the documented truth: p(click | seen)
        return 1.0 / (1.0 + np.exp(-(world.taste(uid[rows][:, None], iid[None, :]) - config.click_offset)))

    with torch.no_grad():
        lists = run_funnel(model, teacher, light, config.funnel)
        metrics = evaluate_funnel(lists, teacher, relevance, config.funnel)
    expected = result["funnel"]["retrieval, light ranker distilled"]
    assert metrics == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_a_seed_fixes_every_result_whatever_the_variant_order(experiment, tmp_path) -> None:
    """A second run with the same seed, the data built beforehand (as the demo does) and two variants in
    the reverse order: each variant is a copy of the same model, so its row is the same."""
    config, run_dir, first, _ = experiment
    again_config = small_config(variants=["+distillation", "control"])
    data = build_retrieval_data(retrieval_config(again_config))
    again = run_funnel_experiment(again_config, tmp_path / "run", echo=lambda _: None, data=data)
    rows = ["retrieval", "+distillation", "control", "retrieval, light ranker distilled", *ORACLES]
    assert list(again["funnel"]) == rows
    for name, row in again["funnel"].items():
        assert row == first["funnel"][name], name
    for name in ("+distillation", "control"):
        assert again["alignment_history"][name] == first["alignment_history"][name], name
    assert again["learned_examination"] == first["learned_examination"]
    logs = [pd.read_parquet(path / "impressions.parquet") for path in (run_dir, tmp_path / "run")]
    pd.testing.assert_frame_equal(*logs)


def test_progress_reaches_the_rankers_training(tmp_path, monkeypatch) -> None:
    """The rankers train for about a minute of the full demo: with progress asked for, they show it too
    (they used to train silently between [3/6] and [4/6])."""
    import twotower.funnel_experiment as funnel_experiment

    asked: list[bool] = []

    class Stop(Exception):
        pass

    def stop(*args, progress: bool = False, **kwargs):
        asked.append(progress)
        raise Stop  # enough is known: the retrieval run is all this test needs to pay for

    monkeypatch.setattr(funnel_experiment, "train_run_ranker", stop)
    with pytest.raises(Stop):
        run_funnel_experiment(small_config(), tmp_path / "run", echo=lambda _: None, progress=True)
    assert asked == [True]
