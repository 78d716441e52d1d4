"""Run configuration: one YAML file, validated by pydantic, with dotted command-line overrides.

Every section forbids unknown keys, so a misspelt key is an error that names it - never silently
ignored. ``load_config("run.yaml", ["train.lr=1e-3"])`` reads the file, applies overrides (values are
parsed as YAML, so ``1e-3``, ``[64, 32]`` and ``null`` mean what they look like), then validates. The
resolved config is written into every run directory (``save_config``) so a run can be repeated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from twotower.data.loader import InteractionColumns
from twotower.data.synthetic import WorldConfig
from twotower.features import FeatureSpec, IdFeature
from twotower.retrieval import ModelConfig
from twotower.storage import atomic_write_text
from twotower.task_config import TaskConfig


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SectionDefaults(_Strict):
    """A config whose sections default to other values than their own classes do (a ranker's training
    runs 5 epochs of 256, not TrainConfig's 10 of 1024).

    ``section_defaults = {"train": {...}}`` fills a section given in part - a YAML section or a
    ``--set train.lr=...`` - before the section's class fills the rest: otherwise setting one key
    would silently reset the others to the class's defaults. Also the defaults of an absent section.
    """

    section_defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _fill_sections(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for key, base in cls.section_defaults.items():
                given = data.get(key, {})
                if isinstance(given, dict):  # an instance (built in code) is taken as it is
                    data[key] = {**base, **given}
        return data


class MovieLensSource(_Strict):
    source: Literal["movielens"] = "movielens"
    name: Literal["ml-100k", "ml-1m", "ml-20m", "ml-25m"] = "ml-100k"
    path: str | None = Field(None, description="local folder or zip; None downloads into the cache")
    cache_dir: str | None = None


class SyntheticSource(_Strict):
    source: Literal["synthetic"] = "synthetic"
    world: WorldConfig = Field(default_factory=WorldConfig)


class FileSource(_Strict):
    source: Literal["files"] = "files"
    interactions: str = Field(description="CSV or Parquet interaction log")
    columns: InteractionColumns = Field(default_factory=InteractionColumns)
    users: str | None = Field(None, description="optional user feature table keyed by user_key")
    items: str | None = Field(None, description="optional item feature table keyed by item_key")
    user_key: str = "user_id"
    item_key: str = "item_id"
    on_bad_rows: Literal["raise", "skip"] = "raise"


DataConfig = Annotated[MovieLensSource | SyntheticSource | FileSource, Field(discriminator="source")]


def _id_feature(name: str) -> list[FeatureSpec]:
    return [IdFeature(name=name)]


class FeaturesConfig(_Strict):
    """Features of each side; the default is the entity id alone (matrix factorisation)."""

    user: list[FeatureSpec] = Field(default_factory=lambda: _id_feature("user_id"))
    item: list[FeatureSpec] = Field(default_factory=lambda: _id_feature("item_id"))


class EarlyStoppingConfig(_Strict):
    metric: str = "ndcg@10"
    patience: int = Field(3, ge=1)


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(1024, ge=2)
    optimizer: Literal["adamw", "adagrad"] = "adamw"
    lr: float = Field(1e-2, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    seed: int = Field(0, ge=0, description="seeds torch and numpy (numpy takes no negative seed)")
    early_stopping: EarlyStoppingConfig | None = None
    valid_fraction: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="share of training rows held out for early stopping when the "
        "protocol has no validation split of its own",
    )
    threads: int | None = Field(None, ge=1, description="torch intra-op threads; None keeps the default")
    prefetch: int = Field(
        0,
        ge=0,
        description="batches built ahead on a background thread (0: none). In-memory batches are two "
        "index ops: a third thread then only competes with the compute threads (ML-100K on 2 cores: "
        "55k instead of 88k examples/s); it pays when building a batch is slow (history features, "
        "Parquet streaming)",
    )
    compile: bool = Field(
        False,
        description="torch.compile the user and item towers (dynamic shapes). Off by default: on CPU it "
        "did not pay (the 1M-item model: 30.4k vs 32.6k examples/s eager, after 5.6 s of compiling; "
        "the ML-100K towers are one lookup each); meant for GPUs",
    )


class EvalConfig(_Strict):
    protocol: Literal["msrec", "tfrs", "temporal"] = "msrec"
    ks: list[Annotated[int, Field(ge=1)]] | None = Field(
        None, min_length=1, description="cut-offs; None: the protocol's own"
    )


class RunConfig(_Strict):
    data: DataConfig = Field(default_factory=SyntheticSource)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @model_validator(mode="after")
    def _sparse_tables_need_adagrad(self) -> RunConfig:
        # Checked here, not at the first step (torch's own error, after config.yaml was written).
        sparse = [
            f"model.{side}.sparse"
            for side in ("user_tower", "item_tower")
            if getattr(self.model, side).sparse
        ]
        if sparse and (self.train.optimizer != "adagrad" or self.train.weight_decay > 0):
            raise ValueError(
                f"{sparse[0]} needs train.optimizer adagrad and train.weight_decay 0 (got "
                f"{self.train.optimizer}, {self.train.weight_decay}): no other update takes sparse gradients"
            )
        return self


class ConfigError(ValueError):
    """A config file that does not validate; the message names the file and every bad key."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects a key given twice in one mapping: PyYAML keeps the last value, which
    would silently ignore the first - the fate the strict schema exists to prevent."""

    def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:  # before flatten_mapping: merge (<<) keys may be overridden
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    duplicate = key in seen
                    seen.add(key)
                except TypeError:  # an unhashable key: the constructor below reports it
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}",
                        key_node.start_mark,
                    )  # fmt: skip
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass


def _unshared(node: Any) -> Any:
    """A copy of nested dicts and lists in which no two places share one object. YAML aliases
    (``item_tower: *tower``) load as one object in two places, and a YAML round trip or
    ``copy.deepcopy`` keeps them shared: an override of one place would silently change the other."""
    if isinstance(node, dict):
        return {key: _unshared(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_unshared(value) for value in node]
    return node


def _list_index(items: list[Any], part: str, override: str) -> int:
    if not part.isdecimal() or int(part) >= len(items):
        raise ConfigError(
            f"override {override!r}: {part!r} is not an index of a list of {len(items)} entries"
        )
    return int(part)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with ``"a.b.c=value"`` overrides applied (value parsed as YAML); an
    entry of a list the config spells out is addressed by its index (``features.user.1.embedding_dim=8``)."""
    result = _unshared(raw or {})
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        node: Any = result
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if isinstance(node, list):  # an entry of a list the config spells out: features.user.1.name
                child = node[_list_index(node, part, item)]
            else:
                child = node.get(part)
                # A null section (``early_stopping: null``, as every resolved config.yaml spells an unset
                # optional section) is an empty one to override into, not an error: validation decides.
                if child is None:
                    child = node[part] = {}
            if not isinstance(child, (dict, list)):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        slot = _list_index(node, parts[-1], item) if isinstance(node, list) else parts[-1]
        try:
            node[slot] = _load_yaml(value)
        except yaml.YAMLError as exc:  # e.g. "layers=[64," - an error naming the override, not a traceback
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {exc}") from None
    return result


def parse_config(raw: dict[str, Any], source: str = "<config>", model: type[BaseModel] | None = None) -> Any:
    """Validate ``raw`` as ``model`` (default: a :class:`RunConfig`); errors name the source and keys."""
    try:
        return (model or RunConfig).model_validate(raw)
    except ValidationError as exc:
        problems = "\n".join(
            f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"{source}: invalid config\n{problems}") from None


def load_config(
    path: str | Path | None, overrides: list[str] | None = None, model: type[BaseModel] | None = None
) -> Any:
    """Read, override and validate a config (a :class:`RunConfig` unless ``model``). ``path=None``
    starts from the defaults."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:  # missing, a directory, unreadable, not text
            raise ConfigError(f"{path}: cannot read the config: {exc}") from None
        try:
            raw = _load_yaml(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        # Only an empty file (or one of comments) means "all defaults": `[]`, `0` or `false` are not
        # mappings and must not pass as an empty one (``raw or {}`` let them through).
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return parse_config(apply_overrides(raw, overrides or []), source, model)


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    return config.model_dump(mode="json")


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the fully resolved config (every default spelled out) as YAML, atomically."""
    atomic_write_text(Path(path), yaml.safe_dump(config_to_dict(config), sort_keys=False))


def with_absolute_paths(config: RunConfig) -> RunConfig:
    """``config`` with its data paths made absolute (relative to the working directory), so the
    config written into a run directory still finds its data from any other directory."""
    data = config.data
    fields = {"files": ("interactions", "users", "items"), "movielens": ("path", "cache_dir")}
    update = {
        name: str(Path(value).expanduser().absolute())
        for name in fields.get(data.source, ())
        if (value := getattr(data, name)) is not None
    }
    return config.model_copy(update={"data": data.model_copy(update=update)}) if update else config
