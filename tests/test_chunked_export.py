"""Chunked item-embedding export: equal to the one-shot embedding, a standard safetensors file, atomic."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from twotower.chunked_export import (
    SafetensorsAppender,
    embed_item_chunks,
    open_embeddings,
    write_item_embeddings,
)
from twotower.features import FieldInfo
from twotower.retrieval import ModelConfig, TwoTowerModel

N_ITEMS = 1000


def _model() -> TwoTowerModel:
    torch.manual_seed(0)
    tower = {"embedding_dim": 8, "layers": [32, 16], "dropout": 0.5}
    config = ModelConfig.model_validate({"user_tower": tower, "item_tower": tower})
    item_fields = [
        FieldInfo("item_id", "categorical", N_ITEMS + 1, None),
        FieldInfo("genres", "multi_hot", 12, 4),
        FieldInfo("year", "numeric", 0, None),
    ]
    items = {
        "item_id": torch.arange(1, N_ITEMS + 1),
        "genres": torch.randint(0, 12, (N_ITEMS, 3)),
        "year": torch.randn(N_ITEMS),
    }
    users = {"user_id": torch.arange(1, 51)}
    model = TwoTowerModel(config, [FieldInfo("user_id", "categorical", 51, None)], item_fields, users, items)
    model.train()  # dropout on: the export must switch it off and restore the mode
    return model


def test_chunked_equals_one_shot_embedding(tmp_path):
    model = _model()
    written = write_item_embeddings(model, tmp_path / "items.safetensors", chunk_size=96)
    assert model.training  # mode restored
    model.eval()
    assert torch.equal(written, model.item_embeddings(batch_size=96))  # same chunks: bit for bit
    torch.testing.assert_close(written, model.item_embeddings())  # other chunking: same values
    assert torch.equal(load_file(tmp_path / "items.safetensors")["embeddings"], written)
    chunks = list(embed_item_chunks(model, chunk_size=400))
    assert [len(c) for c in chunks] == [400, 400, 200]


def test_file_is_byte_identical_to_safetensors_save_file(tmp_path):
    model = _model()
    write_item_embeddings(model, tmp_path / "chunked.safetensors", chunk_size=128, metadata={"run": "x"})
    save_file(
        {"embeddings": open_embeddings(tmp_path / "chunked.safetensors").clone()},
        tmp_path / "oneshot.safetensors",
        metadata={"run": "x"},
    )
    assert (tmp_path / "chunked.safetensors").read_bytes() == (tmp_path / "oneshot.safetensors").read_bytes()


def test_memory_map_is_copy_on_write(tmp_path):
    path = tmp_path / "e.safetensors"
    with SafetensorsAppender(path, "embeddings", (4, 2)) as out:
        out.append(torch.ones(3, 2))
        out.append(torch.zeros(1, 2))
    mapped = open_embeddings(path)
    mapped[0, 0] = 42.0
    assert load_file(path)["embeddings"][0, 0] == 1.0
    with pytest.raises(KeyError, match="no tensor"):
        open_embeddings(path, "other")


def test_failures_leave_the_previous_file_untouched_and_no_temporary(tmp_path):
    path = tmp_path / "e.safetensors"
    save_file({"embeddings": torch.full((2, 2), 7.0)}, path)
    with (
        pytest.raises(ValueError, match="1 rows written, 4 declared"),
        SafetensorsAppender(path, "embeddings", (4, 2)) as out,
    ):
        out.append(torch.ones(1, 2))
    with pytest.raises(RuntimeError, match="boom"), SafetensorsAppender(path, "embeddings", (4, 2)) as out:
        out.append(torch.ones(2, 2))
        raise RuntimeError("boom")
    with pytest.raises(ValueError, match="more than"), SafetensorsAppender(path, "embeddings", (1, 2)) as out:
        out.append(torch.ones(2, 2))
    with pytest.raises(ValueError, match="shape"), SafetensorsAppender(path, "embeddings", (1, 2)) as out:
        out.append(torch.ones(1, 3))
    assert torch.equal(load_file(path)["embeddings"], torch.full((2, 2), 7.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.safetensors"]
