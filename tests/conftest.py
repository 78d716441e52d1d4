from pathlib import Path

import pytest

from twotower.config import RunConfig

SHARED = Path(__file__).resolve().parents[2] / "shared"
ML100K = SHARED / "data" / "ml-100k"


def tiny_config(**train) -> RunConfig:
    """A synthetic run that trains in about a second: ids plus side features on both towers."""
    return RunConfig.model_validate(
        {
            "data": {"source": "synthetic", "world": {"num_users": 300, "num_items": 150, "seed": 1}},
            "features": {
                "user": [{"type": "id", "name": "user_id"}, {"type": "categorical", "name": "segment"}],
                "item": [{"type": "id", "name": "item_id"}, {"type": "multi_hot", "name": "genres"}],
            },
            "model": {
                "temperature": 0.1,
                "user_tower": {"embedding_dim": 16, "layers": [32, 16], "dropout": 0.1},
                "item_tower": {"embedding_dim": 16, "layers": [32, 16], "dropout": 0.1},
            },
            "task": {"logq": "streaming"},
            "train": {"epochs": 3, "batch_size": 256, "lr": 0.01, "seed": 3, **train},
            "eval": {"protocol": "temporal"},
        }
    )


@pytest.fixture
def ml100k() -> Path:
    if not (ML100K / "u.data").exists():
        pytest.skip(f"MovieLens 100K not found at {ML100K} (the shared data folder beside the repo)")
    return ML100K


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models train faster on one intra-op thread: on a busy 2-core machine a second costs up to
    10x. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
