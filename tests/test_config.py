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
