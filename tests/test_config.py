import pytest
import yaml

from twotower.config import ConfigError, apply_overrides, load_config, parse_config, save_config


def test_defaults_validate_and_round_trip(tmp_path):
    cfg = load_config(None)
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert again.data.source == "synthetic" and again.eval.protocol == "msrec"


def test_misspelt_key_is_an_error_naming_the_key_and_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 3\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "run.yaml" in str(err.value) and "train.learning_rate" in str(err.value)


def test_misspelt_nested_feature_and_world_keys_are_errors():
    with pytest.raises(ConfigError, match="features.user.0"):
        parse_config({"features": {"user": [{"type": "id", "name": "user_id", "dimm": 3}]}})
    with pytest.raises(ConfigError, match="num_userz"):
        parse_config({"data": {"source": "synthetic", "world": {"num_userz": 5}}})
    with pytest.raises(ConfigError, match="data"):
        parse_config({"data": {"source": "kaggle"}})
    # numpy's generators (the validation holdout) take no negative seed: refused here, naming the key.
    with pytest.raises(ConfigError, match="train.seed"):
        parse_config({"train": {"seed": -1}})
    # Sparse tables take Adagrad without weight decay; anything else failed at the first step.
    with pytest.raises(ConfigError, match=r"model.item_tower.sparse needs train.optimizer adagrad.*adamw"):
        parse_config({"model": {"item_tower": {"sparse": True}}})
    with pytest.raises(ConfigError, match="weight_decay 0"):
        parse_config(
            {
                "model": {"user_tower": {"sparse": True}},
                "train": {"optimizer": "adagrad", "weight_decay": 0.1},
            }
        )
    sparse = {"model": {"item_tower": {"sparse": True}}, "train": {"optimizer": "adagrad"}}
    assert parse_config(sparse).model.item_tower.sparse


def test_overrides_parse_yaml_values_and_reject_bad_forms(tmp_path):
    raw = apply_overrides(
        {"train": {"epochs": 1}}, ["train.epochs=5", "model.user_tower.layers=[64, 32]", "task.logq=counts"]
    )
    assert raw == {
        "train": {"epochs": 5},
        "model": {"user_tower": {"layers": [64, 32]}},
        "task": {"logq": "counts"},
    }
    cfg = parse_config(raw)
    assert cfg.train.epochs == 5 and cfg.model.user_tower.layers == [64, 32]
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["train.epochs"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"train": 3}, ["train.epochs=2"])
    with pytest.raises(ConfigError, match="train.epochs"):
        parse_config(apply_overrides({}, ["train.epochs=-1"]))


def test_bad_yaml_and_non_mapping_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(listy)


def test_shipped_configs_validate():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        load_config(path)


@pytest.mark.parametrize("text", ["[]", "false", "0", "''"])
def test_a_falsy_non_mapping_top_level_is_an_error_not_the_defaults(tmp_path, text):
    # `raw or {}` used to turn an empty list / false / 0 into "all defaults".
    path = tmp_path / "run.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match="run.yaml: the top level must be a mapping"):
        load_config(path)


def test_an_empty_file_or_comments_only_means_the_defaults(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("# nothing set\n")
    assert load_config(path) == load_config(None)


def test_a_duplicate_key_is_an_error_not_a_silent_last_wins(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  epochs: 1\n  lr: 0.1\n  epochs: 2\n")
    with pytest.raises(ConfigError, match="(?s)run.yaml.*duplicate key 'epochs'"):
        load_config(path)
    merged = tmp_path / "merge.yaml"  # a YAML merge key that is then overridden is not a duplicate
    merged.write_text("train: {<<: {epochs: 1, lr: 0.1}, epochs: 4}\n")
    assert load_config(merged).train.epochs == 4


def test_unreadable_config_files_are_config_errors_naming_the_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: cannot read"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path)  # a directory
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"train:\n  seed: \xff\xfe\n")
    with pytest.raises(ConfigError, match="binary.yaml: cannot read"):
        load_config(binary)


def test_an_override_whose_value_is_not_yaml_is_a_config_error_naming_it():
    with pytest.raises(ConfigError, match=r"override 'model.user_tower.layers=\[64,'.*not valid YAML"):
        load_config(None, ["model.user_tower.layers=[64,"])


def test_overrides_reach_into_a_null_section_as_the_resolved_config_writes_it(tmp_path):
    # A saved config.yaml spells unset optional sections `early_stopping: null`: --set must fill them.
    save_config(load_config(None), tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["early_stopping"] is None
    cfg = load_config(tmp_path / "config.yaml", ["train.early_stopping.metric=recall@10"])
    assert cfg.train.early_stopping.metric == "recall@10" and cfg.train.early_stopping.patience == 3
    with pytest.raises(ConfigError, match="train.early_stopping.metrc"):
        load_config(tmp_path / "config.yaml", ["train.early_stopping.metrc=recall@10"])


def test_a_rich_resolved_config_round_trips_to_an_identical_config(tmp_path):
    cfg = parse_config(
        {
            "data": {"source": "files", "interactions": "dir with space/log.csv", "columns": {"user": "uid"}},
            "features": {"user": [{"type": "id", "name": "user_id"}, {"type": "categorical", "name": "job"}]},
            "model": {"history": {"enabled": True, "pooling": "attention"}, "user_tower": {"layers": [8]}},
            "task": {"logq": "streaming", "negatives": {"sampler": "uniform", "num_sampled": 16}},
            "train": {"lr": 1e-3, "early_stopping": {"metric": "recall@10"}, "valid_fraction": 0.1},
            "eval": {"protocol": "temporal", "ks": [5, 10]},
        }
    )
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("ks", [[0, 10], [], [5, -1]])
def test_eval_cut_offs_must_be_positive_and_not_empty(ks):
    # they used to pass the config and fail after training, with the run directory already written
    with pytest.raises(ConfigError, match="eval.ks"):
        parse_config({"eval": {"ks": ks}})


def test_setting_one_key_of_a_section_keeps_the_sections_other_defaults():
    # `twotower train-ranker RUN log.csv --set ranker.layers=[16]` (the README's light ranker) used to
    # rebuild the section from RankerConfig's own defaults: an additive ranker trained 10 epochs of 1024
    from twotower.run_ranker import RunRankerConfig
    from twotower.ultr import UltrConfig

    default = RunRankerConfig()
    assert (default.ranker.combination, default.train.epochs, default.columns.user) == ("pal", 5, "user_id")
    overrides = ["ranker.layers=[16]", "train.lr=0.01", "columns.context=[device]"]
    got = load_config(None, overrides, RunRankerConfig)
    assert (got.ranker.combination, got.ranker.loss, got.ranker.layers) == ("pal", "clicks", [16])
    assert (got.train.epochs, got.train.batch_size, got.train.lr) == (5, 256, 0.01)
    assert (got.columns.user, got.columns.context) == ("user_id", ["device"])
    assert RunRankerConfig.model_validate(got.model_dump()) == got  # a saved config reads back the same
    with pytest.raises(ConfigError, match="columns.user must name"):
        load_config(None, ["columns.user=null"], RunRankerConfig)  # an explicit value still wins
    ultr = load_config(None, ["train.epochs=16"], UltrConfig)
    assert (ultr.train.epochs, ultr.train.batch_size, ultr.train.lr) == (16, 256, 3e-3)


def test_an_override_of_a_yaml_aliased_section_changes_that_section_alone(tmp_path):
    # A YAML alias loads as one object in two places, and the YAML round trip that copied the config
    # kept it shared: --set model.user_tower.dropout=0.3 silently set the item tower's dropout too.
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  user_tower: &tower {embedding_dim: 16, layers: [32, 16]}\n  item_tower: *tower\n"
    )
    cfg = load_config(path, ["model.user_tower.dropout=0.3"])
    assert (cfg.model.user_tower.dropout, cfg.model.item_tower.dropout) == (0.3, 0.0)
    assert cfg.model.item_tower.layers == [32, 16]  # the alias itself still applies


def test_overrides_index_into_lists_the_config_spells_out(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "features:\n  user: [{type: id, name: user_id}, {type: categorical, name: job}]\n"
        "model:\n  user_tower: {layers: [32, 16]}\n  item_tower: {layers: [32, 16]}\n"
    )
    cfg = load_config(path, ["features.user.1.embedding_dim=8", "model.user_tower.layers.0=64"])
    assert cfg.features.user[1].embedding_dim == 8 and cfg.features.user[0].name == "user_id"
    assert cfg.model.user_tower.layers == [64, 16]
    for bad in ("features.user.2.name=x", "features.user.first.name=x", "features.user.-1.name=x"):
        with pytest.raises(ConfigError, match=r"is not an index of a list of 2 entries"):
            load_config(path, [bad])
    # an entry's misspelt key is still an error naming it, down to the union member
    with pytest.raises(ConfigError, match=r"features.user.1.categorical.nmae"):
        load_config(path, ["features.user.1.nmae=job"])


def _models_reachable_from(annotation, seen: set) -> set:
    """Every pydantic model a field of ``annotation`` can hold: through lists, optionals, unions
    (discriminated ones too) and Annotated."""
    import typing

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if annotation not in seen:
            seen.add(annotation)
            for field in annotation.model_fields.values():
                _models_reachable_from(field.annotation, seen)
    else:
        for arg in typing.get_args(annotation):
            _models_reachable_from(arg, seen)
    return seen


def test_every_section_reachable_from_the_run_config_forbids_unknown_keys():
    from twotower.config import RunConfig
    from twotower.feature_specs import HashedIdFeature
    from twotower.task_config import StreamingConfig
    from twotower.towers import TowerConfig

    models = _models_reachable_from(RunConfig, set())
    assert {HashedIdFeature, StreamingConfig, TowerConfig} <= models  # the walk reaches unions and nesting
    lax = sorted(m.__qualname__ for m in models if m.model_config.get("extra") != "forbid")
    assert lax == [], f"sections that would silently ignore a misspelt key: {lax}"
